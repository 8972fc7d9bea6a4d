"""Decision thresholds. Label-free ones never look at a defective image or a test label.

- :func:`false_alarm_threshold`: the image threshold for a false-alarm target, an order statistic of
  out-of-sample scores of defect-free images, with its expected false-alarm rate and an upper bound, and
  a plain warning when there are too few images for the target (docs/thresholds.md).
- :func:`false_alarm_estimate`: the false-alarm rate of a given threshold on defect-free scores it was
  not chosen on (a calibrated or typed-in threshold), with a Clopper-Pearson upper bound.
- :func:`calibrate_threshold`: the image threshold for a goal (``recall>=0.95``, ``false_alarm<=0.1``,
  ``f1``) on a few labelled shots, with their confusion matrix (used by ``ebmad-predict calibrate=...``).
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
import re
from typing import Any

import numpy as np
from scipy import signal, stats

from ebmad.evaluation.aupro import Maps
from ebmad.evaluation.metrics import binary_curve, flatten


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


# ----------------------------------------------------------------- false-alarm target (order statistics)
def _good_scores(scores: Maps, what: str) -> np.ndarray:
    s = flatten(scores).astype(np.float64, copy=False)
    if s.size == 0:
        raise ValueError(f"{what}: no scores of defect-free images were given")
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or infinite values")
    return s


def _check_rate(rate: float, confidence: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ValueError(f"thresholds.false_alarm_rate must be in (0, 1), got {rate}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"thresholds.confidence must be in (0, 1), got {confidence}")


def order_statistic_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided ``confidence`` upper bound on the false-alarm rate of the k-th largest of n good scores.

    For continuous scores, the rate p = P(new good score >= X_(n-k+1)) is Beta(k, n - k + 1) distributed
    over the draw of the n images (mean k / (n + 1)); the bound is that Beta's ``confidence`` quantile.
    """
    if not 1 <= k <= n:
        raise ValueError(f"order_statistic_bound: need 1 <= k <= n, got k={k}, n={n}")
    return float(stats.beta.ppf(confidence, k, n - k + 1))


def images_needed(rate: float, confidence: float = 0.95) -> tuple[int, int]:
    """(n for an expected false-alarm rate <= ``rate``, n for the ``confidence`` bound to be <= ``rate``).

    The first: the maximum of n scores has expected rate 1 / (n + 1) <= rate. The second: its bound
    1 - (1 - confidence)^(1/n) <= rate. For 1 % at 95 %: 99 and 299 images.
    """
    _check_rate(rate, confidence)
    expected = math.ceil(1.0 / rate - 1.0 - 1e-9)
    bound = math.ceil(math.log(1.0 - confidence) / math.log1p(-rate) - 1e-9)
    return max(1, expected), max(1, bound)


def false_alarm_threshold(good_scores: Maps, rate: float = 0.01, confidence: float = 0.95) -> dict[str, Any]:
    """The image threshold for a false-alarm ``rate`` from out-of-sample scores of n defect-free images.

    Threshold t = the k-th largest score with k = floor(rate * (n + 1)): a new defect-free image (same
    distribution, continuous scores) is flagged (score >= t) with probability Beta(k, n - k + 1), whose
    mean k / (n + 1) meets the target and whose ``confidence`` quantile is ``upper_bound``. With
    n + 1 < 1 / rate no order statistic meets the target: the fit falls back to the maximum (k = 1,
    expected rate 1 / (n + 1) > rate), sets ``enough`` False and says so in ``note``.
    Returns a JSON-ready dict (threshold, target, confidence, n, k, expected_rate, upper_bound, enough,
    n_needed, n_needed_for_bound, note).
    """
    _check_rate(rate, confidence)
    s = np.sort(_good_scores(good_scores, "false_alarm_threshold"))[::-1]
    n = int(s.size)
    k_target = int(math.floor(rate * (n + 1) + 1e-9))
    k = max(1, k_target)
    need, need_bound = images_needed(rate, confidence)
    fit = {
        "threshold": float(s[k - 1]),
        "target": float(rate),
        "confidence": float(confidence),
        "n": n,
        "k": k,
        "expected_rate": k / (n + 1),
        "upper_bound": order_statistic_bound(k, n, confidence),
        "enough": k_target >= 1,
        "n_needed": need,
        "n_needed_for_bound": need_bound,
    }
    fit["note"] = false_alarm_note(fit)
    return fit


def _pct(x: float) -> str:
    return f"{100 * x:.3g} %"


def false_alarm_note(fit: dict[str, Any]) -> str:
    """One plain sentence on what a :func:`false_alarm_threshold` fit means, or why it misses its target."""
    n, k = fit["n"], fit["k"]
    conf = _pct(fit["confidence"]).replace(" ", "")
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    rank = "the highest score" if k == 1 else f"the {k}{suffix} highest score"
    if not fit["enough"]:
        return (
            f"too few defect-free images for a {_pct(fit['target'])} false-alarm rate: {n} cannot estimate it "
            f"(needs >= {fit['n_needed']}, and >= {fit['n_needed_for_bound']} for the {conf} bound to reach "
            f"it); using the strictest threshold they support, {rank}: expected false-alarm rate "
            f"{_pct(fit['expected_rate'])}, up to {_pct(fit['upper_bound'])} ({conf} bound)"
        )
    return (
        f"threshold = {rank} of {n} defect-free images: expected false-alarm rate "
        f"{_pct(fit['expected_rate'])} (target {_pct(fit['target'])}), up to {_pct(fit['upper_bound'])} "
        f"({conf} bound)"
    )


def false_alarm_estimate(good_scores: Maps, threshold: float, confidence: float = 0.95) -> dict[str, Any]:
    """False-alarm rate of a fixed ``threshold`` on defect-free scores it was not chosen on.

    m of n scores >= threshold: rate m / n and the one-sided Clopper-Pearson ``confidence`` bounds: upper
    the Beta(m + 1, n - m) quantile (1 when m = n), lower the Beta(m, n - m + 1) quantile at 1 - confidence
    (0 when m = 0). Only valid when the threshold did not come from these scores (e.g. calibrated on other
    images, or typed in).
    """
    s = _good_scores(good_scores, "false_alarm_estimate")
    n, m = int(s.size), int(np.count_nonzero(s >= threshold))
    bound = 1.0 if m >= n else float(stats.beta.ppf(confidence, m + 1, n - m))
    lower = 0.0 if m == 0 else float(stats.beta.ppf(1 - confidence, m, n - m + 1))
    return {"threshold": float(threshold), "n": n, "false_alarms": m, "rate": m / n, "upper_bound": bound,
            "lower_bound": lower, "confidence": float(confidence)}  # fmt: skip


# ----------------------------------------------------------------- calibration on a few labelled shots
GOAL_PATTERN = re.compile(r"^\s*(recall|false_alarm)\s*(>=|<=)\s*([0-9.]+)\s*$|^\s*f1\s*$")


def parse_goal(goal: str) -> tuple[str, float]:
    """``recall>=R`` | ``false_alarm<=F`` | ``f1`` -> (kind, value); an error names the accepted forms."""
    m = GOAL_PATTERN.match(str(goal))
    ok = m is not None and (m.group(1) is None or (m.group(1), m.group(2)) in (("recall", ">="),
                                                                              ("false_alarm", "<=")))  # fmt: skip
    value = float(m.group(3)) if ok and m.group(1) else float("nan")
    if not ok or (m.group(1) and not 0.0 <= value <= 1.0):
        raise ValueError(f"calibrate_goal={goal!r}: use 'recall>=R' (fewest false alarms that catch at least R of "
                         "the defective shots), 'false_alarm<=F' (most defects caught with at most F of the good "
                         "shots flagged) or 'f1' (best F1), with R, F in [0, 1]")  # fmt: skip
    return (m.group(1), value) if m.group(1) else ("f1", float("nan"))


def confusion(scores: Maps, labels: Maps, threshold: float) -> dict[str, int]:
    """Counts at ``threshold`` (score >= threshold: defective): tp, fn, fp, tn."""
    s, y = flatten(scores), flatten(labels) != 0
    pred = s >= threshold
    return {"tp": int(np.count_nonzero(pred & y)), "fn": int(np.count_nonzero(~pred & y)),
            "fp": int(np.count_nonzero(pred & ~y)), "tn": int(np.count_nonzero(~pred & ~y))}  # fmt: skip


def calibrate_threshold(scores: Maps, labels: Maps, goal: str = "recall>=0.95") -> dict[str, Any]:
    """The image threshold meeting ``goal`` on labelled shots (label 1: defective, 0: good).

    Candidate cuts lie between consecutive distinct scores. ``recall>=R``: the highest cut that catches at
    least R of the defective shots (so the fewest false alarms); ``false_alarm<=F``: the cut catching the
    most defective shots with at most F of the good shots flagged (the highest such); ``f1``: the best F1
    (the highest such). The threshold is placed halfway between the lowest score flagged and the next lower
    score, so the decisions on the shots are those of the cut (above every score when nothing is flagged).
    Returns threshold, goal, counts, the confusion matrix, recall and false-alarm rate on the shots.
    """
    kind, value = parse_goal(goal)
    s = flatten(scores).astype(np.float64)
    y = flatten(labels) != 0
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or (kind != "recall" and n_neg == 0):
        raise ValueError(f"calibration needs defective shots{'' if kind == 'recall' else ' and good shots'} "
                         f"(got {n_pos} defective, {n_neg} good)")  # fmt: skip
    c = binary_curve(s, y)
    # cut j = 0: nothing flagged; cut j >= 1: the scores >= c.thresholds[j - 1] flagged
    tp, fp = np.concatenate(([0], c.tp)), np.concatenate(([0], c.fp))
    if kind == "recall":
        j = int(np.argmax(tp >= value * n_pos - 1e-9))  # tp grows with j: the first cut that meets R
    elif kind == "false_alarm":
        ok = fp <= value * n_neg + 1e-9  # fp grows with j: a prefix of cuts
        j = int(np.argmax(np.where(ok, tp, -1)))  # the most tp, the first (highest) such cut
    else:
        j = int(np.argmax(2 * tp / (tp + fp + n_pos)))
    if j == 0:
        threshold = float(np.nextafter(c.thresholds[0], np.inf))
    elif j < len(c.thresholds):
        mid = (c.thresholds[j - 1] + c.thresholds[j]) / 2
        threshold = float(mid if mid > c.thresholds[j] else c.thresholds[j - 1])  # adjacent floats
    else:
        threshold = float(c.thresholds[-1])
    cm = confusion(s, y, threshold)
    return {"threshold": threshold, "goal": str(goal).strip(), "n_defective": n_pos, "n_good": n_neg,
            "confusion": cm, "recall": cm["tp"] / n_pos,
            "false_alarm_rate": cm["fp"] / n_neg if n_neg else float("nan")}  # fmt: skip
