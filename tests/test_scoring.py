import math

import pytest
import torch

from ebmad.evaluation.metrics import PixelAUROC, image_auroc
from ebmad.models.ebm.scoring import MomentAccumulator, compute_scores, energy_and_grad


def test_energy_and_grad_is_minus_dE_dx_even_under_no_grad():
    w = torch.randn(1, 2, 3, 3)

    def energy(x):
        return (w * x).flatten(1).sum(1) + (x**2).flatten(1).sum(1)

    x = torch.randn(4, 2, 3, 3)
    with torch.no_grad():
        e, g = energy_and_grad(energy, x)
    assert torch.allclose(e, energy(x))
    assert torch.allclose(g, -(w + 2 * x))


def test_energy_and_grad_refuses_inference_mode():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        energy_and_grad(lambda x: x.sum((1, 2, 3)), torch.zeros(1, 1, 2, 2))


def test_scores_match_hand_computation_of_equations_2_and_3():
    # one image, C=2 channels, 1x2 pixels
    g = torch.tensor([[[[3.0, -1.0]], [[-4.0, 2.0]]]])  # (1, 2, 1, 2)
    mean = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    std = torch.tensor([[[2.0, 1.0]], [[4.0, 0.5]]])
    images, maps = compute_scores(torch.tensor([7.0]), g, mean, std, eps=0.0)
    # raw: pixel 0 -> (3, -4), pixel 1 -> (-1, 2)
    assert maps["a_raw_l1"].tolist() == [[[7.0, 3.0]]]
    assert torch.allclose(maps["a_raw_l2"], torch.tensor([[[5.0, math.sqrt(5)]]]))
    assert images["A_raw_l1"].item() == pytest.approx(10.0)
    assert images["A_raw_l2"].item() == pytest.approx(math.sqrt(25 + 5))
    # standardized: pixel 0 -> ((3-1)/2, (-4-0)/4) = (1, -1); pixel 1 -> ((-1-0)/1, (2-1)/0.5) = (-1, 2)
    assert torch.allclose(maps["a_std_l1"], torch.tensor([[[2.0, 3.0]]]))
    assert torch.allclose(maps["a_std_l2"], torch.tensor([[[math.sqrt(2), math.sqrt(5)]]]))
    assert images["A_std_l1"].item() == pytest.approx(5.0)
    assert images["A_std_l2"].item() == pytest.approx(math.sqrt(7))
    assert images["energy"].item() == 7.0


def test_moment_accumulator_matches_direct_statistics_and_reduces_sums():
    x = torch.randn(10, 2, 3, 3)
    acc = MomentAccumulator((2, 3, 3))
    for chunk in x.split(3):
        acc.update(chunk)
    mean, std = acc.mean_std()
    assert torch.allclose(mean, x.double().mean(0))
    assert torch.allclose(std, x.double().std(0, unbiased=False))
    # two "ranks" holding halves give the same result after summing the raw moments
    a, b = MomentAccumulator((2, 3, 3)), MomentAccumulator((2, 3, 3))
    a.update(x[:7])
    b.update(x[7:])
    others = iter([b.sum, b.sumsq, b.count])  # all_reduce sums sum, sumsq, count in this order
    a.all_reduce(lambda t: t + next(others))
    assert torch.allclose(a.mean_std()[1], std)


def mann_whitney(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_image_auroc_is_exact_for_large_scores():
    # torchmetrics would treat these as logits and saturate them; ours must not
    torch.manual_seed(0)
    labels = torch.tensor([0] * 20 + [1] * 15)
    scores = 1000 + 50 * torch.randn(35) + 30 * labels
    assert image_auroc(scores, labels) == pytest.approx(mann_whitney(scores.tolist(), labels.tolist()))
    assert math.isnan(image_auroc(scores[:5], labels[:5]))


def test_pixel_auroc_exact_and_binned():
    torch.manual_seed(0)
    target = torch.rand(6, 16, 16) < 0.1
    maps = (40 + 10 * torch.randn(6, 16, 16) + 15 * target).clamp_min(0)
    exact, binned = PixelAUROC(), PixelAUROC(thresholds=2000, scale=40.0)
    for m, t in zip(maps.split(2), target.split(2), strict=True):
        exact.update(m, t)
        binned.update(m, t)
    ref = mann_whitney(maps.flatten().tolist(), target.flatten().tolist())
    assert float(exact.compute()) == pytest.approx(ref, abs=1e-6)
    assert float(binned.compute()) == pytest.approx(ref, abs=5e-3)
