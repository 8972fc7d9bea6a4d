"""AUROC with torchmetrics, guarded against its logit handling.

torchmetrics treats any prediction outside [0, 1] as a logit and applies a sigmoid, which in float32
saturates for scores above ~17 and silently turns anomaly scores into ties (AUROC 0.5). Every score
is therefore mapped into [0, 1] by a strictly increasing transform in float64 first; AUROC depends
only on the ranks, so the values are exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc


def minmax_unit(scores: torch.Tensor) -> torch.Tensor:
    """Affine map of a complete set of scores onto [0, 1] (float64, order kept)."""
    s = scores.detach().double()
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)


def positive_unit(scores: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """s / (s + scale) for non-negative scores (streaming-safe: needs no global min/max)."""
    s = scores.detach().double()
    return s / (s + scale)


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact AUROC of a full set of image scores; NaN when only one class is present."""
    labels = labels.long()
    if labels.numel() == 0 or labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(minmax_unit(scores), labels))


class PixelAUROC(BinaryAUROC):
    """Streaming pixel AUROC of non-negative maps: exact (``thresholds=None``) or binned (bounded memory).

    ``scale`` is a typical map value; with binned thresholds it spreads the scores over [0, 1].
    """

    def __init__(self, thresholds: int | None = None, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(thresholds=thresholds, **kwargs)
        self.scale = scale

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(positive_unit(preds.flatten(), self.scale), target.flatten().long())
