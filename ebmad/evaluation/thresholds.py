"""Label-free decision thresholds: they never look at a defective image or a test label.

- :func:`quantile_threshold`: the q-quantile of scores (image scores or map pixels) of held-out
  defect-free images.
- :func:`three_sigma_threshold`: the paper's three-sigma rule (Genc et al., Fig. 3) carried over to the
  Lr-over-channels maps of standardized gradients.

Three-sigma rule. Standardization makes every channel value g_std[c, i, j] zero-mean, unit-variance over
the training images, and the paper calls a standardized value anomalous beyond 3 sigma: |z| > 3, a
two-sided false-alarm rate of p3 = erfc(3 / sqrt 2) = 0.27 % for z ~ N(0, 1). The pixel map, however, is
a_r = (sum_c |z_c|^r)^(1/r) over C channels, so "a_r > 3" is only that rule for C = 1. We keep the rule's
meaning, its false-alarm rate: the cut is the (1 - p3)-quantile of a_r for C independent N(0, 1) channels.
For r = 2, a_2^2 is chi-square with C degrees of freedom, so the cut is the chi(C) quantile: 3 (C = 1),
3.44 (C = 2), 3.76 (C = 3). For r = 1 it is the quantile of a sum of C half-normals (computed
numerically). The two naive readings are off: "a_2 > 3" fires on 2.9 % of normal RGB pixels (10x the
rule), "a_2 > 3 sqrt(C)" on 6e-6 (only right if the channels were perfectly correlated). Real gradient
channels are correlated and not exactly Gaussian; ``quantile_threshold(good_pixels, THREE_SIGMA_QUANTILE)``
is the distribution-free version of the same rule, measured on held-out defect-free images.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import signal, stats

from ebmad.evaluation.aupro import Maps
from ebmad.evaluation.metrics import flatten


def gaussian_tail(k: float = 3.0) -> float:
    """P(|z| > k) for z ~ N(0, 1)."""
    return math.erfc(k / math.sqrt(2.0))


THREE_SIGMA_TAIL = gaussian_tail(3.0)  # 0.0026998
THREE_SIGMA_QUANTILE = 1.0 - THREE_SIGMA_TAIL  # 0.9973002


def quantile_threshold(scores_of_good: Maps, q: float) -> float:
    """The ``q``-quantile (linear interpolation) of scores of held-out defect-free images only.

    ``scores_of_good``: image scores (N,) or maps (N, H, W) / a sequence of maps (then per pixel).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile_threshold: q must be in [0, 1], got {q}")
    s = flatten(scores_of_good).astype(np.float64, copy=False)
    if s.size == 0:
        raise ValueError("quantile_threshold: no scores of defect-free images were given")
    if not np.isfinite(s).all():
        raise ValueError("quantile_threshold: scores contain NaN or infinite values")
    return float(np.quantile(s, q))


def _half_normal_sum_isf(tail: float, channels: int, dx: float = 1e-4) -> float:
    """Upper ``tail`` quantile of sum of ``channels`` iid |N(0, 1)| (error below channels * dx / 2)."""
    top = stats.halfnorm.isf(1e-15) * channels
    edges = np.arange(0.0, top + dx, dx)
    pmf = np.diff(stats.halfnorm.cdf(edges))  # mass of each cell, represented at its midpoint
    total = pmf
    for _ in range(channels - 1):
        total = np.clip(signal.fftconvolve(total, pmf), 0.0, None)
    sf = np.cumsum(total[::-1])[::-1]  # P(sum of midpoints >= value of cell j)
    j = int(np.searchsorted(-sf, -tail, side="left"))  # first cell whose survival drops to <= tail
    return (j + 0.5 * channels) * dx


def three_sigma_threshold(channels: int, norm: int = 2, k: float = 3.0) -> float:
    """Cut on an Lr-over-channels map of standardized values with the false-alarm rate of |z| > k.

    ``channels``: C of the standardized gradient (3 for RGB, 1 for grayscale); ``norm``: r in {1, 2} of
    the pixel map (paper eq. 2). Returns k for C = 1. Assumes independent N(0, 1) channels; see the module
    docstring for the derivation and the distribution-free alternative.
    """
    if channels < 1:
        raise ValueError(f"three_sigma_threshold: channels must be >= 1, got {channels}")
    if norm not in (1, 2):
        raise ValueError(f"three_sigma_threshold: norm must be 1 or 2, got {norm}")
    if k <= 0:
        raise ValueError(f"three_sigma_threshold: k must be > 0, got {k}")
    if channels == 1:
        return float(k)
    tail = gaussian_tail(k)
    if norm == 2:
        return float(stats.chi.isf(tail, channels))
    return _half_normal_sum_isf(tail, channels)
