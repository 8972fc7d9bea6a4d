"""Image- and pixel-level anomaly metrics on complete score sets, model-agnostic.

Conventions: a higher score means more anomalous; at threshold t a sample is predicted anomalous when
its score is >= t (the convention of precision-recall curves in sklearn/torchmetrics, so the F1 at the
F1-max threshold reproduces F1-max). Image AUROC goes through :func:`image_auroc` (below), which
maps scores into [0, 1] first (torchmetrics would otherwise treat them as logits). Pixel metrics share one
descending sort of all pixels (:class:`~ebmad.evaluation.aupro.PixelTable`): pixel AUROC, AP, F1-max and
exact AUPRO read the same sorted arrays, and per-defect subsets filter that order instead of re-sorting.

AUROC with torchmetrics, guarded against its logit handling (:func:`image_auroc`, :class:`PixelAUROC`):
torchmetrics treats any prediction outside [0, 1] as a logit and applies a sigmoid, which in float32
saturates for scores above ~17 and silently turns anomaly scores into ties (AUROC 0.5). Every score
is therefore mapped into [0, 1] by a strictly increasing transform in float64 first; AUROC depends
only on the ranks, so the values are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc

from ebmad.evaluation.aupro import Maps, PixelTable, aupro, normalized_area, sorted_pro_curve, to_numpy

GOOD = "good"


# ----------------------------------------------------------------------------------------- AUROC, guarded
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


@dataclass
class BinaryCurve:
    """Counts at every distinct threshold, thresholds decreasing: tp[k], fp[k] = #(score >= t[k])."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int


def flatten(x: Maps) -> np.ndarray:
    """All values of a tensor/array or of a sequence of them, as one flat array."""
    if isinstance(x, torch.Tensor | np.ndarray):
        return to_numpy(x).ravel()
    return np.concatenate([to_numpy(v).ravel() for v in x]) if len(x) else np.zeros(0)


def binary_curve(scores: Maps, labels: Maps) -> BinaryCurve:
    """True/false positive counts at each distinct score (ties are one threshold)."""
    s, y = flatten(scores), flatten(labels) != 0
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    order = np.argsort(s)[::-1]
    return sorted_binary_curve(s[order], y[order])


def sorted_binary_curve(scores: np.ndarray, positive: np.ndarray) -> BinaryCurve:
    """:func:`binary_curve` of scores already sorted in decreasing order."""
    tp = np.cumsum(positive, dtype=np.int64)
    fp = np.arange(1, len(tp) + 1, dtype=np.int64) - tp
    last = np.append(scores[1:] != scores[:-1], True)
    n_pos = int(tp[-1]) if len(tp) else 0
    return BinaryCurve(scores[last], tp[last], fp[last], n_pos, len(tp) - n_pos)


def average_precision(scores: Maps, labels: Maps, curve: BinaryCurve | None = None) -> float:
    """Average precision, sum_k (R_k - R_{k-1}) P_k over decreasing thresholds (sklearn/torchmetrics AP).

    NaN when there is no positive.
    """
    c = curve or binary_curve(scores, labels)
    if c.n_pos == 0:
        return float("nan")
    precision = c.tp / (c.tp + c.fp)
    recall_step = np.diff(c.tp, prepend=0) / c.n_pos
    return float(np.sum(recall_step * precision))


def f1_max(scores: Maps, labels: Maps, curve: BinaryCurve | None = None) -> tuple[float, float]:
    """(max over thresholds of F1, the highest threshold reaching it); (NaN, NaN) without positives."""
    c = curve or binary_curve(scores, labels)
    if c.n_pos == 0:
        return float("nan"), float("nan")
    f1 = 2 * c.tp / (c.tp + c.fp + c.n_pos)  # = 2PR / (P + R), with FN = n_pos - TP
    k = int(np.argmax(f1))
    return float(f1[k]), float(c.thresholds[k])


def precision_recall_f1(scores: Maps, labels: Maps, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 when score >= ``threshold`` is predicted anomalous (0 when undefined)."""
    s, y = flatten(scores), flatten(labels) != 0
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def roc_curve(scores: Maps, labels: Maps, curve: BinaryCurve | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) from (0, 0) to (1, 1); NaN rates for a missing class."""
    return curve_roc(curve or binary_curve(scores, labels))


def curve_roc(c: BinaryCurve) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) points of a curve, starting at (0, 0)."""
    fpr = np.concatenate(([0.0], c.fp / c.n_neg)) if c.n_neg else np.full(len(c.fp) + 1, np.nan)
    tpr = np.concatenate(([0.0], c.tp / c.n_pos)) if c.n_pos else np.full(len(c.tp) + 1, np.nan)
    return fpr, tpr


def auroc(scores: Maps, labels: Maps) -> float:
    """Exact AUROC via :func:`image_auroc`; NaN when only one class is present.

    Scores are mapped into [0, 1] first, so torchmetrics never reads them as logits. For image scores;
    pixel sets use :func:`curve_auroc` on their shared sorted curve.
    """
    s = torch.from_numpy(np.ascontiguousarray(flatten(scores), dtype=np.float64))
    return image_auroc(s, torch.from_numpy(flatten(labels) != 0))


def curve_auroc(curve: BinaryCurve) -> float:
    """Exact AUROC from a tie-merged curve: trapezoid under (FPR, TPR), ties counting one half.

    Equal to torchmetrics' exact ``binary_auroc`` and to the Mann-Whitney statistic; works on raw
    scores of any range, so no [0, 1] mapping is needed. NaN when only one class is present.
    """
    if curve.n_pos == 0 or curve.n_neg == 0:
        return float("nan")
    fpr, tpr = curve_roc(curve)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def pixel_auroc(maps: Maps, masks: Maps) -> float:
    """Exact pixel AUROC over all pixels of all images (one sort of all pixels)."""
    return curve_auroc(binary_curve(maps, masks))


def _pixel_curve_and_aupro(
    table: PixelTable, images: np.ndarray | None, maps: Maps, masks: Maps, aupro_bins: int | None
) -> tuple[BinaryCurve, float]:
    """Pixel curve and AUPRO of all images or of a subset, reusing the table's single sort."""
    order = table.order() if images is None else table.subset_order(images)
    scores, ok = table.scores[order], table.ok[order]
    curve = sorted_binary_curve(scores, ~ok)
    if curve.n_pos == 0:
        return curve, float("nan")
    if aupro_bins is None:
        n_regions = int(table.regions.sum() if images is None else table.regions[images].sum())
        return curve, normalized_area(*sorted_pro_curve(scores, ok, table.weight[order], n_regions))
    sub = (maps, masks) if images is None else (_take(maps, images), _take(masks, images))
    return curve, aupro(*sub, bins=aupro_bins)


def _take(x: Maps, idx: np.ndarray) -> Maps:
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx, dtype=torch.long, device=x.device)]
    if isinstance(x, np.ndarray):
        return x[idx]
    return [x[i] for i in idx]


def _per_defect(
    table: PixelTable,
    image_scores: Maps,
    labels: Maps,
    maps: Maps,
    masks: Maps,
    defect_types: Sequence[str],
    aupro_bins: int | None,
) -> dict[str, float]:
    types = np.asarray(defect_types)
    s, y = flatten(image_scores), flatten(labels)
    good = types == GOOD
    out: dict[str, float] = {}
    for d in sorted(set(defect_types) - {GOOD}):
        idx = np.flatnonzero(good | (types == d))
        curve, area = _pixel_curve_and_aupro(table, idx, maps, masks, aupro_bins)
        out[f"per_defect/{d}/image_auroc"] = auroc(s[idx], y[idx])
        out[f"per_defect/{d}/pixel_auroc"] = curve_auroc(curve)
        out[f"per_defect/{d}/aupro"] = area
    return out


def per_defect_metrics(
    image_scores: Maps,
    labels: Maps,
    maps: Maps,
    masks: Maps,
    defect_types: Sequence[str],
    aupro_bins: int | None = None,
) -> dict[str, float]:
    """Each defect type against all good images: image AUROC, pixel AUROC and AUPRO.

    Keys ``per_defect/<type>/{image_auroc,pixel_auroc,aupro}``; AUPRO is NaN for a type whose masks are
    all empty.
    """
    table = PixelTable.build(maps, masks)
    return _per_defect(table, image_scores, labels, maps, masks, defect_types, aupro_bins)


def _threshold_given(t: float | torch.Tensor | None) -> float | None:
    if t is None:
        return None
    t = float(t)
    return t if np.isfinite(t) else None  # NaN: a model's threshold buffer that was never fitted


def _check_inputs(
    image_scores: Maps, labels: Maps, maps: Maps, masks: Maps, defect_types: Sequence[str]
) -> None:
    n = len(flatten(image_scores))
    lens = {
        "labels": len(flatten(labels)),
        "maps": len(maps),
        "masks": len(masks),
        "defect_types": len(defect_types),
    }
    bad = {k: v for k, v in lens.items() if v != n}
    if bad:
        raise ValueError(f"evaluate_all: {n} image scores but {bad}")
    y = flatten(labels) != 0
    types = np.asarray(defect_types)
    wrong = np.flatnonzero(y != (types != GOOD))
    if len(wrong):
        i = int(wrong[0])
        raise ValueError(
            f"evaluate_all: image {i} has label {int(y[i])} but defect type {str(types[i])!r} "
            f"(label must be 1 exactly when the type is not {GOOD!r})"
        )
    for i in np.flatnonzero(~y):
        if (to_numpy(masks[int(i)]) != 0).any():
            raise ValueError(f"evaluate_all: good image {int(i)} has a non-empty ground-truth mask")


def evaluate_all(
    image_scores: Maps,
    labels: Maps,
    maps: Maps,
    masks: Maps,
    defect_types: Sequence[str],
    image_threshold: float | torch.Tensor | None = None,
    pixel_threshold: float | torch.Tensor | None = None,
    aupro_bins: int | None = None,
) -> dict[str, float]:
    """Every image and pixel metric of one test set, as a flat dict.

    ``image_scores`` (N,), ``labels`` (N,) 0/1, ``maps``/``masks`` (N, H, W) (or sequences of (H, W),
    e.g. from :func:`resize_maps_native`), ``defect_types`` one name per image (``"good"`` for good).
    Thresholds (``None``/NaN: not reported) are label-free values fitted beforehand (see
    :mod:`ebmad.evaluation.thresholds`); they are only applied here. AUPRO is exact unless ``aupro_bins``
    is set, and NaN when no pixel is defective.
    """
    _check_inputs(image_scores, labels, maps, masks, defect_types)
    out: dict[str, float] = {}
    img = binary_curve(image_scores, labels)
    out["image_auroc"] = auroc(image_scores, labels)
    out["image_ap"] = average_precision(image_scores, labels, img)
    out["image_f1_max"], out["image_f1_max_threshold"] = f1_max(image_scores, labels, img)
    table = PixelTable.build(maps, masks)
    curve, out["aupro"] = _pixel_curve_and_aupro(table, None, maps, masks, aupro_bins)
    out["pixel_auroc"] = curve_auroc(curve)
    out["pixel_ap"] = average_precision(maps, masks, curve)
    out["pixel_f1_max"], out["pixel_f1_max_threshold"] = f1_max(maps, masks, curve)
    for level, scores, target, thr in (
        ("image", image_scores, labels, _threshold_given(image_threshold)),
        ("pixel", maps, masks, _threshold_given(pixel_threshold)),
    ):
        if thr is not None:
            out[f"{level}_threshold"] = thr
            for k, v in precision_recall_f1(scores, target, thr).items():
                out[f"{level}_{k}@thr"] = v
    out.update(_per_defect(table, image_scores, labels, maps, masks, defect_types, aupro_bins))
    return out


def resize_maps_native(
    maps: Maps, sizes: Sequence[tuple[int, int]] | tuple[int, int]
) -> torch.Tensor | list[torch.Tensor]:
    """Bilinear upsampling of each (h, w) map to its mask's original (H, W) (``eval.resolution=native``).

    ``sizes``: one (H, W) for all maps or one per map. Returns an (N, H, W) float32 tensor when all sizes
    are equal, else a list of (H_i, W_i) tensors.
    """
    n = len(maps)
    if len(sizes) == 2 and all(isinstance(v, int | np.integer) for v in sizes):
        sizes = [(int(sizes[0]), int(sizes[1]))] * n  # type: ignore[index]
    sizes = [(int(h), int(w)) for h, w in sizes]  # type: ignore[misc]
    if len(sizes) != n:
        raise ValueError(f"resize_maps_native: {n} maps but {len(sizes)} sizes")
    if isinstance(maps, torch.Tensor | np.ndarray) and len(set(sizes)) == 1:
        t = torch.as_tensor(to_numpy(maps), dtype=torch.float32)
        if t.ndim != 3:
            raise ValueError(f"resize_maps_native: maps must be (N, H, W), got {tuple(t.shape)}")
        return _bilinear(t[:, None], sizes[0])[:, 0]
    out: list[torch.Tensor] = []
    for m, size in zip(maps, sizes, strict=True):
        t = torch.as_tensor(to_numpy(m), dtype=torch.float32)
        if t.ndim != 2:
            raise ValueError(f"resize_maps_native: maps must be (H, W), got {tuple(t.shape)}")
        out.append(_bilinear(t[None, None], size)[0, 0])
    if out and all(o.shape == out[0].shape for o in out):
        return torch.stack(out)
    return out


def _bilinear(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(t, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
