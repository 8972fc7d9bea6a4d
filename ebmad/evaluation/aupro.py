"""AUPRO, the area under the per-region-overlap curve, as the official MVTec AD evaluation defines it.

Reference: Bergmann et al., MVTec AD evaluation code (``generic_util.py``: ``compute_pro``, ``trapezoid``).

- Ground-truth regions are the 8-connected components of each mask (``scipy.ndimage.label`` with a 3x3
  structure), counted over all test images.
- At a threshold t a pixel is positive when its score is >= t. FPR(t) is the fraction of positives among
  all defect-free pixels of all test images (pixels outside every region, in good and defective images).
  PRO(t) is the mean over ALL regions of the fraction of the region's pixels that are positive.
- Exact mode: every distinct score is a threshold (ties form one threshold). The curve runs from (0, 0)
  through the (FPR, PRO) points in increasing FPR to (1, 1); it is integrated with the trapezoid rule up
  to FPR 0.3, the PRO at 0.3 linearly interpolated between its neighbours, and divided by 0.3.
- Binned mode (``bins=N``): N equidistant thresholds over the score range, accumulated as histograms one
  batch of images at a time (memory does not grow with the number of pixels).

Deviation from the official code: cumulative sums are float64 (the official casts FPRs to float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

INTEGRATION_LIMIT = 0.3
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)

ArrayLike = torch.Tensor | np.ndarray
Maps = ArrayLike | Sequence[ArrayLike]


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A NumPy view/copy of a tensor (any device) or array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _pairs(maps: Maps, masks: Maps) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(map, bool mask) per image, checked for matching shapes and finite scores."""
    if len(maps) != len(masks):
        raise ValueError(f"AUPRO: {len(maps)} anomaly maps but {len(masks)} masks")
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m, g = to_numpy(m), to_numpy(g)
        if m.ndim != 2 or m.shape != g.shape:
            raise ValueError(f"AUPRO: map {i} has shape {m.shape}, its mask {g.shape}; expected equal (H, W)")
        if not np.isfinite(m).all():
            raise ValueError(f"AUPRO: anomaly map {i} contains NaN or infinite values")
        yield m, g != 0


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """For one (H, W) bool mask: flat defect-free pixels, flat per-pixel PRO weights, number of regions.

    A pixel of a region of n pixels weighs 1/n, so summing the weights of the positives of a region gives
    its overlap; defect-free pixels weigh 0.
    """
    labeled, n_regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    labeled = labeled.ravel()
    sizes = np.bincount(labeled, minlength=n_regions + 1).astype(np.float64)
    sizes[0] = np.inf  # defect-free pixels: weight 0
    return labeled == 0, 1.0 / sizes[labeled], int(n_regions)


def _check_counts(n_ok: int, n_regions: int) -> None:
    if n_regions == 0:
        raise ValueError(
            "AUPRO is undefined: the test set has no defective pixel (every ground-truth mask is empty)"
        )
    if n_ok == 0:
        raise ValueError("AUPRO is undefined: the test set has no defect-free pixel")


def _close_curve(fprs: np.ndarray, pros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fprs, pros = np.clip(fprs, 0.0, 1.0), np.clip(pros, 0.0, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


@dataclass
class PixelTable:
    """All pixels of a test set, flat: score, defect-free flag, PRO weight and image index.

    Sorting is the expensive part of every exact pixel metric; :meth:`order` sorts once, and
    :meth:`subset_order` gives the descending order of a subset of images without sorting again.
    """

    scores: np.ndarray
    ok: np.ndarray
    weight: np.ndarray
    image: np.ndarray
    regions: np.ndarray  # number of regions per image
    _order: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def build(cls, maps: Maps, masks: Maps) -> PixelTable:
        scores, ok, weights, image, regions = [], [], [], [], []
        for i, (m, g) in enumerate(_pairs(maps, masks)):
            o, w, n = region_weights(g)
            scores.append(m.ravel())
            ok.append(o)
            weights.append(w)
            image.append(np.full(m.size, i, dtype=np.int32))
            regions.append(n)
        if not scores:
            raise ValueError("AUPRO: no anomaly maps were given")
        cat = np.concatenate
        return cls(cat(scores), cat(ok), cat(weights), cat(image), np.asarray(regions, dtype=np.int64))

    def order(self) -> np.ndarray:
        """Pixel indices by decreasing score (computed once)."""
        if self._order is None:
            self._order = np.argsort(self.scores)[::-1]
        return self._order

    def subset_order(self, images: np.ndarray) -> np.ndarray:
        """Decreasing-score order of the pixels of ``images`` (indices), filtered from :meth:`order`."""
        member = np.zeros(len(self.regions), dtype=bool)
        member[images] = True
        o = self.order()
        return o[member[self.image[o]]]

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact (FPR, PRO) curve of all images."""
        o = self.order()
        return sorted_pro_curve(self.scores[o], self.ok[o], self.weight[o], int(self.regions.sum()))


def sorted_pro_curve(
    scores: np.ndarray, ok: np.ndarray, weight: np.ndarray, n_regions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve from pixels sorted by decreasing score; each tie group is one threshold."""
    n_ok = int(ok.sum())
    _check_counts(n_ok, n_regions)
    fp = np.cumsum(ok, dtype=np.int64)
    pro = np.cumsum(weight)
    last = np.append(scores[1:] != scores[:-1], True)  # the last pixel of each tie group holds that threshold
    return _close_curve(fp[last] / n_ok, pro[last] / n_regions)


class BinnedPRO:
    """PRO curve at ``bins`` equidistant thresholds in [lo, hi], accumulated one batch at a time.

    Scores outside [lo, hi] are valid: below ``lo`` never positive, above ``hi`` always positive.
    """

    def __init__(self, bins: int, lo: float, hi: float) -> None:
        if bins < 2:
            raise ValueError(f"AUPRO: bins must be >= 2, got {bins}")
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError(f"AUPRO: invalid score range [{lo}, {hi}]")
        self.thresholds = np.linspace(lo, hi, bins)
        self.fp_hist = np.zeros(bins, dtype=np.int64)
        self.pro_hist = np.zeros(bins, dtype=np.float64)
        self.n_ok = 0
        self.n_regions = 0

    def update(self, maps: Maps, masks: Maps) -> None:
        bins = len(self.thresholds)
        for m, g in _pairs(maps, masks):
            ok, w, n = region_weights(g)
            # idx = number of thresholds <= score; dropping idx 0 (below all), bin k holds [t_k, t_{k+1})
            idx = np.searchsorted(self.thresholds, m.ravel(), side="right")
            self.fp_hist += np.bincount(idx[ok], minlength=bins + 1)[1:]
            self.pro_hist += np.bincount(idx[~ok], weights=w[~ok], minlength=bins + 1)[1:]
            self.n_ok += int(ok.sum())
            self.n_regions += n

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) from (0, 0) to (1, 1), thresholds in decreasing order."""
        _check_counts(self.n_ok, self.n_regions)
        fp = np.cumsum(self.fp_hist[::-1])  # positives at t_k: all bins >= k
        pro = np.cumsum(self.pro_hist[::-1])
        return _close_curve(fp / self.n_ok, pro / self.n_regions)

    def compute(self, limit: float = INTEGRATION_LIMIT) -> float:
        return normalized_area(*self.curve(), limit)


def _chunks(maps: Maps, masks: Maps, size: int) -> Iterable[tuple[Maps, Maps]]:
    for start in range(0, len(maps), size):
        yield maps[start : start + size], masks[start : start + size]


def pro_curve(
    maps: Maps, masks: Maps, bins: int | None = None, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve (FPR, PRO), FPR increasing from 0 to 1; exact, or at ``bins`` thresholds."""
    if bins is None:
        return PixelTable.build(maps, masks).pro_curve()
    lo, hi = np.inf, -np.inf
    for m, _ in _pairs(maps, masks):
        lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
    acc = BinnedPRO(bins, lo, hi)
    for m, g in _chunks(maps, masks, batch_size):
        acc.update(m, g)
    return acc.curve()


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under (x, y) from x[0] to ``x_max`` by the trapezoid rule (``x`` non-decreasing).

    As the official ``trapezoid``: when ``x_max`` is not a sample, y at ``x_max`` is interpolated between
    the last sample with x <= x_max and the next one.
    """
    keep = x <= x_max
    area = float(np.sum(0.5 * (y[keep][1:] + y[keep][:-1]) * np.diff(x[keep])))
    if x_max not in x:
        i = int(np.searchsorted(x, x_max, side="right"))  # first x > x_max
        if not 0 < i < len(x):
            raise ValueError(f"trapezoid: x_max={x_max} lies outside [{x[0]}, {x[-1]}]")
        y_max = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += 0.5 * (y_max + y[i - 1]) * (x_max - x[i - 1])
    return area


def normalized_area(fprs: np.ndarray, pros: np.ndarray, limit: float = INTEGRATION_LIMIT) -> float:
    """Area under the PRO curve up to FPR ``limit``, divided by ``limit`` (clipped to [0, 1])."""
    if not 0 < limit <= 1:
        raise ValueError(f"AUPRO: the integration limit must be in (0, 1], got {limit}")
    return float(np.clip(trapezoid(fprs, pros, limit) / limit, 0.0, 1.0))


def aupro(
    maps: Maps, masks: Maps, bins: int | None = None, limit: float = INTEGRATION_LIMIT, batch_size: int = 16
) -> float:
    """Normalized area under the PRO curve up to FPR ``limit`` (official MVTec AD definition).

    ``maps``/``masks``: (N, H, W) tensors/arrays or sequences of (H, W) ones (sizes may differ per image);
    a mask pixel != 0 is defective. ``bins=None`` is exact; ``bins=N`` uses N thresholds over the score
    range with per-batch histograms (``batch_size`` images at a time). Raises ``ValueError`` when no
    pixel is defective.
    """
    return normalized_area(*pro_curve(maps, masks, bins, batch_size), limit)
