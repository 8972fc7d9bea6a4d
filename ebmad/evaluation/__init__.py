"""Evaluation: AUPRO (official MVTec AD definition), image/pixel metrics, label-free thresholds, figures.

Figures live in :mod:`ebmad.evaluation.figures` (imported on demand: it pulls in matplotlib).
"""

from ebmad.evaluation.aupro import aupro, pro_curve
from ebmad.evaluation.metrics import (
    average_precision,
    evaluate_all,
    f1_max,
    per_defect_metrics,
    pixel_auroc,
    precision_recall_f1,
    resize_maps_native,
)
from ebmad.evaluation.thresholds import (
    THREE_SIGMA_QUANTILE,
    quantile_threshold,
    three_sigma_threshold,
)

__all__ = [
    "THREE_SIGMA_QUANTILE",
    "aupro",
    "average_precision",
    "evaluate_all",
    "f1_max",
    "per_defect_metrics",
    "pixel_auroc",
    "precision_recall_f1",
    "pro_curve",
    "quantile_threshold",
    "resize_maps_native",
    "three_sigma_threshold",
]
