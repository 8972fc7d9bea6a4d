"""Image thresholds for a false-alarm target: order statistic, its bound (hand computation and simulation),
the small-n warning, calibration on labelled shots, and the pooling of leave-out scores in fit_thresholds."""

import math

import numpy as np
import pytest
import torch

from ebmad.evaluation.thresholds import (
    calibrate_threshold,
    confusion,
    false_alarm_estimate,
    false_alarm_threshold,
    images_needed,
    order_statistic_bound,
    parse_goal,
)
from ebmad.models.base import AnomalyModule


# ------------------------------------------------------------------ order statistic and its bound
def binomial_tail(n: int, k: int, p: float) -> float:
    """P(Binomial(n, p) >= k), summed by hand."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


def bisect(f, lo: float, hi: float) -> float:
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_threshold_is_the_kth_largest_with_k_over_n_plus_1_meeting_the_target():
    scores = np.random.default_rng(0).permutation(np.arange(199.0))  # 0..198, shuffled
    fit = false_alarm_threshold(scores, rate=0.01)
    # k = floor(0.01 * 200) = 2: the 2nd largest score; expected false-alarm rate 2 / 200 = 1 %
    assert (fit["k"], fit["threshold"], fit["expected_rate"], fit["enough"]) == (2, 197.0, 0.01, True)
    # the bound: the 95 % quantile of Beta(2, 198), i.e. the p with P(Binomial(199, p) >= 2) = 0.95
    by_hand = bisect(lambda p: binomial_tail(199, 2, p) - 0.95, 0.0, 1.0)
    assert fit["upper_bound"] == pytest.approx(by_hand, abs=1e-9)
    assert fit["upper_bound"] == pytest.approx(0.02362, abs=1e-4)
    # a 5 % target on the same scores: k = 10, the 10th largest
    fit5 = false_alarm_threshold(scores, rate=0.05)
    assert (fit5["k"], fit5["threshold"], fit5["expected_rate"]) == (10, 189.0, 10 / 200)


def test_maximum_of_n_has_the_closed_form_bound():
    # k = 1: P(rate <= p) = 1 - (1 - p)^n, so the 95 % bound is 1 - 0.05^(1/n)
    for n in (5, 17, 42):
        assert order_statistic_bound(1, n, 0.95) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-10)


@pytest.mark.parametrize("n,rate", [(50, 0.05), (120, 0.02), (30, 0.1)])
def test_simulation_the_false_alarm_rate_stays_under_the_bound_at_the_stated_confidence(n, rate):
    """10,000 seeded draws of n defect-free scores: the true false-alarm rate of the fitted threshold has mean
    k / (n + 1) and lies under the 95 % bound in 95 % of the draws."""
    rng = np.random.default_rng(1234)
    fit = false_alarm_threshold(rng.normal(size=n), rate)  # k, expected rate and bound depend on n only
    k, bound = fit["k"], fit["upper_bound"]
    draws = rng.standard_normal((10_000, n))  # scores of good images ~ N(0, 1), any continuous law would do
    thresholds = -np.partition(-draws, k - 1, axis=1)[:, k - 1]  # the k-th largest of each draw
    from scipy.stats import norm

    true_rates = norm.sf(thresholds)  # P(new good score >= threshold)
    assert true_rates.mean() == pytest.approx(k / (n + 1), abs=4 * true_rates.std() / 100)
    covered = float((true_rates <= bound).mean())
    assert abs(covered - 0.95) < 4 * math.sqrt(0.95 * 0.05 / 10_000), covered  # 95 % within sampling noise
    # and new good images: each draw's threshold applied to fresh scores flags about k / (n + 1)
    fresh = rng.standard_normal((10_000, 20))
    flagged = (fresh >= thresholds[:, None]).mean()
    assert flagged == pytest.approx(k / (n + 1), rel=0.05)


def test_too_few_images_say_so_name_how_many_and_use_the_maximum():
    scores = np.linspace(1.0, 2.0, 17)
    fit = false_alarm_threshold(scores, rate=0.01)
    assert not fit["enough"] and fit["k"] == 1 and fit["threshold"] == 2.0
    assert fit["expected_rate"] == pytest.approx(1 / 18)
    assert fit["upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 17))  # 16.2 %
    assert (fit["n_needed"], fit["n_needed_for_bound"]) == (99, 299)
    note = fit["note"]
    assert "too few" in note and "17" in note and "99" in note and "299" in note and "5.56 %" in note
    assert images_needed(0.1) == (9, 29)
    assert false_alarm_threshold(np.arange(99.0), 0.01)["enough"]  # 99 images: the maximum meets 1 %
    assert not false_alarm_threshold(np.arange(98.0), 0.01)["enough"]


def test_bad_settings_are_errors_naming_them():
    with pytest.raises(ValueError, match="thresholds.false_alarm_rate"):
        false_alarm_threshold([1.0, 2.0], rate=0.0)
    with pytest.raises(ValueError, match="thresholds.confidence"):
        false_alarm_threshold([1.0, 2.0], rate=0.1, confidence=1.0)
    with pytest.raises(ValueError, match="NaN"):
        false_alarm_threshold([1.0, float("nan")], rate=0.1)


def test_estimate_of_a_fixed_threshold_is_clopper_pearson():
    est = false_alarm_estimate(np.arange(100.0), 95.0)  # 5 of 100 at or above
    assert (est["false_alarms"], est["n"], est["rate"]) == (5, 100, 0.05)
    by_hand = bisect(lambda p: binomial_tail(100, 6, p) - 0.95, 0.0, 1.0)  # P(Bin(100, p) <= 5) = 0.05
    assert est["upper_bound"] == pytest.approx(by_hand, abs=1e-9)
    lower = bisect(lambda p: binomial_tail(100, 5, p) - 0.05, 0.0, 1.0)  # P(Bin(100, p) >= 5) = 0.05
    assert est["lower_bound"] == pytest.approx(lower, abs=1e-9)
    assert false_alarm_estimate([1.0, 2.0], 0.0)["upper_bound"] == 1.0
    assert false_alarm_estimate([1.0, 2.0], 5.0)["lower_bound"] == 0.0


# ------------------------------------------------------------------ calibration on labelled shots
# scores of 6 good (label 0) and 6 defective (label 1) shots; sorted: g1 g2 d3 g4 g5 d6 d7 g8 d9 d10 g11 d12
SHOTS = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0])
LABELS = np.array([0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1])


def test_calibration_for_a_recall_goal_picks_the_highest_threshold_that_meets_it():
    # recall >= 0.8 of 6 defective: 5 caught; the 5th highest defective score is 6 -> cut between 5 and 6
    c = calibrate_threshold(SHOTS, LABELS, "recall>=0.8")
    assert c["threshold"] == 5.5
    assert c["confusion"] == {"tp": 5, "fn": 1, "fp": 2, "tn": 4}
    assert c["recall"] == pytest.approx(5 / 6) and c["false_alarm_rate"] == pytest.approx(2 / 6)
    # recall >= 0.95: all 6, down to the defective score 3: cut between 2 and 3
    c = calibrate_threshold(SHOTS, LABELS, "recall >= 0.95")
    assert c["threshold"] == 2.5 and c["confusion"] == {"tp": 6, "fn": 0, "fp": 4, "tn": 2}


def test_calibration_for_a_false_alarm_goal_and_for_f1():
    # at most 1 of 6 good flagged (<= 0.2): flag 12, 11(g), 10, 9 -> 3 tp; the next cut adds g8
    c = calibrate_threshold(SHOTS, LABELS, "false_alarm<=0.2")
    assert c["threshold"] == 8.5 and c["confusion"] == {"tp": 3, "fn": 3, "fp": 1, "tn": 5}
    c = calibrate_threshold(SHOTS, LABELS, "false_alarm<=0")  # no false alarm: only 12
    assert c["threshold"] == 11.5 and c["confusion"]["tp"] == 1 and c["confusion"]["fp"] == 0
    # F1 by hand over the cuts: >= 6 gives tp 5, fp 2: F1 = 10 / 13, the best
    c = calibrate_threshold(SHOTS, LABELS, "f1")
    assert c["threshold"] == 5.5 and c["confusion"] == {"tp": 5, "fn": 1, "fp": 2, "tn": 4}
    assert confusion(SHOTS, LABELS, c["threshold"]) == c["confusion"]


def test_calibration_edge_cases_and_goal_errors():
    # every cut flags a good shot first: the false-alarm goal catches nothing, above every score
    c = calibrate_threshold([5.0, 1.0], [0, 1], "false_alarm<=0")
    assert c["threshold"] > 5.0 and c["confusion"] == {"tp": 0, "fn": 1, "fp": 0, "tn": 1}
    assert calibrate_threshold([5.0, 1.0], [0, 1], "recall>=1")["threshold"] == 1.0  # the lowest score
    for bad in ("recall<=0.9", "precision>=0.9", "recall>=2", "best"):
        with pytest.raises(ValueError, match="calibrate_goal"):
            parse_goal(bad)
    with pytest.raises(ValueError, match="defective shots"):
        calibrate_threshold([1.0, 2.0], [0, 0], "recall>=0.9")


# ------------------------------------------------------------------ pooling leave-out scores in fit_thresholds
class MeanDistance(AnomalyModule):
    """A tiny fit-only method: the distance of an image to the mean training image. Its leave-out score of a
    training image is the distance to the mean of the others (closed form)."""

    MODEL_TYPE = "mean_distance"
    IMAGE_SCORES = ("dist",)
    PIXEL_MAPS = ("sq",)
    DEFAULT_IMAGE_SCORE = "dist"
    DEFAULT_PIXEL_MAP = "sq"

    def __init__(self, seed: int = 0, image_size: int = 4, in_channels: int = 1, pixel_auroc_thresholds=None,
                 n_examples: int = 0, leave_out: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("mean", torch.zeros(1, in_channels, image_size, image_size))
        self._init_base()

    def fit_statistics(self, batches, reduce_sum=None):
        self.mean = torch.cat([b["image"] for b in batches]).mean(0, keepdim=True)
        return {}

    def score(self, x):
        sq = ((x - self.mean) ** 2).sum(1)
        return {"dist": sq.flatten(1).sum(1).sqrt()}, {"sq": sq}

    def leave_out_scores(self, batches):
        if not self.hparams.leave_out:
            return None
        x = torch.cat([b["image"] for b in batches])
        others = (x.sum(0, keepdim=True) - x) / (len(x) - 1)  # mean without image i, for each i
        return ((x - others) ** 2).flatten(1).sum(1).sqrt()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_leave_out_scores_equal_a_refit_without_that_image():
    train = images(12, seed=0)
    model = MeanDistance()
    model.fit_statistics([{"image": train}])
    left_out = model.leave_out_scores([{"image": train}])
    for i in range(len(train)):
        refit = MeanDistance()
        refit.fit_statistics([{"image": torch.cat([train[:i], train[i + 1 :]])}])
        torch.testing.assert_close(refit.score(train[i : i + 1])[0]["dist"][0], left_out[i])
    assert (
        left_out > model.score(train)[0]["dist"]
    ).all()  # out-of-sample scores are higher (less optimistic)


def test_fit_thresholds_pools_held_out_and_leave_out_scores_and_records_them():
    train, val = images(40, seed=0), images(9, seed=1)
    model = MeanDistance()
    model.fit_statistics([{"image": train}])
    model.fit_thresholds([{"image": val}], 0.05, 1.0, held_out=True, train_batches=[{"image": train}])
    fit = model.threshold_fit
    assert fit["sources"] == [{"source": "held_out", "n": 9}, {"source": "leave_out", "n": 40}]
    pooled = torch.cat([model.score(val)[0]["dist"], model.leave_out_scores([{"image": train}])])
    expected = false_alarm_threshold(pooled, 0.05)
    assert fit["n"] == 49 and fit["k"] == 2 and fit["threshold"] == pytest.approx(expected["threshold"])
    assert float(model.image_threshold) == pytest.approx(expected["threshold"])
    assert fit["scores"] == pytest.approx(sorted(pooled.tolist())) and not fit["in_sample"]
    # the pixel threshold still comes from the held-out images' maps (here their maximum)
    assert float(model.pixel_threshold) == pytest.approx(float(model.score(val)[1]["sq"].max()))

    # no held-out images: the leave-out scores alone
    model.fit_thresholds([{"image": train}], 0.05, 1.0, held_out=False, train_batches=[{"image": train}])
    assert model.threshold_fit["sources"] == [{"source": "leave_out", "n": 40}]
    # neither: the training images in sample, flagged as optimistic
    plain = MeanDistance(leave_out=False)
    plain.fit_statistics([{"image": train}])
    plain.fit_thresholds([{"image": train}], 0.05, 1.0, held_out=False, train_batches=[{"image": train}])
    assert plain.threshold_fit["sources"] == [{"source": "training_in_sample", "n": 40}]
    assert plain.threshold_fit["in_sample"] and "optimistic" in plain.threshold_fit["note"]


def test_threshold_fit_travels_in_the_checkpoint_and_old_checkpoints_load(tmp_path):
    model = MeanDistance()
    model.fit_statistics([{"image": images(20, seed=0)}])
    model.fit_thresholds([{"image": images(20, seed=0)}], 0.1, 1.0, held_out=False,
                         train_batches=[{"image": images(20, seed=0)}])  # fmt: skip
    ckpt: dict = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")
    loaded = torch.load(tmp_path / "m.ckpt", weights_only=True)  # plain types only
    fresh = MeanDistance()
    fresh.on_load_checkpoint(loaded)
    assert fresh.threshold_fit == model.threshold_fit
    old = {"state_dict": {}}  # written before thresholds and their provenance existed
    fresh.on_load_checkpoint(old)
    assert fresh.threshold_fit == {} and math.isnan(float(old["state_dict"]["image_threshold"]))
