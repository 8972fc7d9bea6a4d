"""Evaluation metrics against independent brute-force computations, thresholds, figures."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchmetrics.functional.classification import binary_average_precision

from ebmad.evaluation import figures
from ebmad.evaluation.aupro import BinnedPRO, aupro
from ebmad.evaluation.metrics import (
    auroc,
    average_precision,
    evaluate_all,
    f1_max,
    pixel_auroc,
    precision_recall_f1,
    resize_maps_native,
)
from ebmad.evaluation.thresholds import (
    THREE_SIGMA_QUANTILE,
    THREE_SIGMA_TAIL,
    quantile_threshold,
    three_sigma_threshold,
)

# ---------------------------------------------------------------- brute force, written independently


def flood_fill_regions(mask: np.ndarray, connectivity: int = 8) -> list[list[tuple[int, int]]]:
    """Connected regions of a 2-D bool mask by an explicit breadth-first flood fill."""
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    if connectivity == 4:
        steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            seen[y0, x0] = True
            queue, region = deque([(y0, x0)]), []
            while queue:
                y, x = queue.popleft()
                region.append((y, x))
                for dy, dx in steps:
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            regions.append(region)
    return regions


def brute_aupro(maps, masks, limit: float = 0.3, connectivity: int = 8) -> float:
    """Every distinct score a threshold, FPR/PRO counted per threshold, trapezoid cut at ``limit``."""
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    masks = [np.asarray(g, dtype=bool) for g in masks]
    regions = [(i, r) for i, g in enumerate(masks) for r in flood_fill_regions(g, connectivity)]
    ok_scores = np.concatenate([m[~g] for m, g in zip(maps, masks, strict=True)])
    points = [(0.0, 0.0)]
    for t in sorted({float(v) for m in maps for v in m.ravel()}, reverse=True):
        fpr = float(np.mean(ok_scores >= t))
        pro = sum(np.mean([maps[i][y, x] >= t for y, x in r]) for i, r in regions) / len(regions)
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < limit:
                y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += 0.5 * (y0 + y_lim) * (limit - x0)
            break
    return area / limit


def mann_whitney_auroc(scores, labels) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), over all pairs."""
    s, y = np.ravel(np.asarray(scores, dtype=np.float64)), np.ravel(np.asarray(labels)).astype(bool)
    pos, neg = s[y][:, None], s[~y][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


# ---------------------------------------------------------------------------------------- fixtures


def border_and_diagonal_fixture():
    """3 images 8x8: a region touching the border, two blocks touching diagonally, a good image; ties."""
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, 0:2, 5:8] = True  # touches the top and right border
    masks[0, 5:8, 0] = True  # touches the bottom and left border
    masks[1, 1:3, 1:3] = True  # these two 2x2 blocks touch only at a corner -> ONE region
    masks[1, 3:5, 3:5] = True
    maps = rng.integers(0, 6, size=(3, 8, 8)).astype(np.float32)  # few levels: many ties
    maps[masks] += rng.integers(0, 4, size=int(masks.sum()))
    maps[1, 3:5, 3:5] += 3  # the second diagonal block scores higher than the first
    return maps, masks


def random_fixture(seed: int, n: int = 8, size: int = 16, levels: int | None = None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 3, 2)
            a, b = rng.integers(1, 6, 2)
            masks[i, y : y + a, x : x + b] = True
    maps = rng.random((n, size, size)) + masks * rng.uniform(0.0, 1.0)
    if levels:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


def labelled_set(seed: int = 0):
    """9 images 8x8 (3 good, 3 'spot', 3 'scratch') with image scores, labels, maps, masks, types."""
    rng = np.random.default_rng(seed)
    types = ["good"] * 3 + ["spot"] * 3 + ["scratch"] * 3
    masks = np.zeros((9, 8, 8), dtype=bool)
    for i in range(3, 6):
        y, x = rng.integers(0, 6, 2)
        masks[i, y : y + 2, x : x + 2] = True
    for i in range(6, 9):
        y = rng.integers(0, 8)
        masks[i, y, 1:7] = True
    maps = rng.random((9, 8, 8)) + 0.7 * masks
    labels = np.array([int(t != "good") for t in types])
    scores = maps.reshape(9, -1).max(1) + 0.1 * rng.standard_normal(9)
    return scores, labels, maps.astype(np.float32), masks, types


# ------------------------------------------------------------------------------------------ AUPRO


def test_flood_fill_merges_diagonal_neighbours():
    _, masks = border_and_diagonal_fixture()
    assert len(flood_fill_regions(masks[0])) == 2
    assert len(flood_fill_regions(masks[1])) == 1
    assert len(flood_fill_regions(masks[1], connectivity=4)) == 2


def test_aupro_hand_computed():
    # one region {0.9, 0.1}; defect-free 0.5, 0.2 (image A) and 0.3, 0.05 x3 (good image B).
    # Curve (0,0) (0,.5) (1/6,.5) (1/3,.5) ...: area to 0.3 is 0.5 * 0.3 -> AUPRO 0.5
    maps = np.array([[[0.9, 0.1, 0.5, 0.2]], [[0.3, 0.05, 0.05, 0.05]]])
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]]], dtype=bool)
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert brute_aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


def test_aupro_equals_brute_force_border_diagonal_ties():
    maps, masks = border_and_diagonal_fixture()
    expected = brute_aupro(maps, masks)
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(expected, abs=1e-12)
    # the diagonal pair counted as two regions gives another value: the fixture can tell them apart
    assert abs(brute_aupro(maps, masks, connectivity=4) - expected) > 1e-3


@pytest.mark.parametrize("seed, levels", [(0, None), (1, 4), (2, 10), (3, None)])
def test_aupro_equals_brute_force_random(seed, levels):
    maps, masks = random_fixture(seed, levels=levels)
    assert aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks), abs=1e-12)


def test_aupro_images_of_different_sizes():
    maps_a, masks_a = random_fixture(4, n=3, size=10)
    maps_b, masks_b = random_fixture(5, n=3, size=6)
    maps, masks = [*maps_a, *maps_b], [*masks_a, *masks_b]
    assert aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks), abs=1e-12)


def test_aupro_without_defective_pixels_is_a_clear_error():
    maps = np.random.default_rng(0).random((3, 8, 8))
    masks = np.zeros((3, 8, 8), dtype=bool)
    for bins in (None, 100):
        with pytest.raises(ValueError, match="no defective pixel"):
            aupro(maps, masks, bins=bins)


def test_aupro_in_unit_interval():
    for seed in range(10):
        maps, masks = random_fixture(seed, levels=3 if seed % 2 else None)
        for bins in (None, 50):
            assert 0.0 <= aupro(maps, masks, bins=bins) <= 1.0
    _, masks = random_fixture(0)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)  # perfect maps
    assert aupro(masks.astype(np.float32), masks) <= 1.0
    assert aupro(-masks.astype(np.float32), masks) == pytest.approx(0.0)  # inverted maps


def test_aupro_bins_close_to_exact_and_streaming_invariant():
    maps, masks = random_fixture(7, n=20, size=32)
    exact = aupro(maps, masks)
    assert aupro(maps, masks, bins=2000) == pytest.approx(exact, abs=2e-3)
    assert aupro(maps, masks, bins=2000, batch_size=3) == aupro(maps, masks, bins=2000, batch_size=20)
    # the accumulator with a preset range, fed batch by batch, equals the one-shot binned result
    acc = BinnedPRO(2000, float(maps.min()), float(maps.max()))
    for i in range(0, 20, 6):
        acc.update(maps[i : i + 6], masks[i : i + 6])
    assert acc.compute() == pytest.approx(aupro(maps, masks, bins=2000), abs=1e-12)


# ----------------------------------------------------------------------------------- AP and F1


def test_ap_f1_hand_computed():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5])
    y = np.array([1, 0, 1, 1, 0, 0])
    # precision at each recall step: 1 (R 1/3), 2/3 (R 2/3), 3/4 (R 1)
    assert average_precision(s, y) == pytest.approx(1 / 3 + 2 / 9 + 1 / 4)
    f1, thr = f1_max(s, y)
    assert (f1, thr) == (pytest.approx(6 / 7), 0.6)  # P 3/4, R 1 at score >= 0.6
    assert precision_recall_f1(s, y, thr) == {"precision": 0.75, "recall": 1.0, "f1": pytest.approx(6 / 7)}
    assert precision_recall_f1(s, y, 0.95) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_ap_f1_with_ties_hand_computed():
    s, y = np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1])
    assert average_precision(s, y) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert f1_max(s, y) == (pytest.approx(0.8), 0.2)


def test_ap_matches_torchmetrics():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(500), 2) * 40  # ties, and values far outside [0, 1]
    y = rng.random(500) < 0.3
    expected = binary_average_precision(torch.from_numpy(s / 40), torch.from_numpy(y).long())
    assert average_precision(s, y) == pytest.approx(float(expected), abs=1e-6)


def test_pixel_auroc_equals_torchmetrics_route():
    rng = np.random.default_rng(3)
    maps = np.round(rng.random((4, 16, 16)), 2) * 1000.0  # ties, and scores torchmetrics would read as logits
    masks = rng.random((4, 16, 16)) < 0.2
    maps[masks] += 200.0 * rng.random(int(masks.sum()))
    assert pixel_auroc(maps, masks) == pytest.approx(auroc(maps, masks), abs=1e-6)  # image_auroc's [0,1] map
    assert pixel_auroc(maps, masks) == pytest.approx(mann_whitney_auroc(maps, masks), abs=1e-12)


# --------------------------------------------------------------------------- evaluate_all, per defect


def test_evaluate_all_overall_metrics():
    scores, labels, maps, masks, types = labelled_set()
    out = evaluate_all(scores, labels, maps, masks, types, image_threshold=1.2, pixel_threshold=0.9)
    assert out["image_auroc"] == pytest.approx(mann_whitney_auroc(scores, labels))
    assert out["pixel_auroc"] == pytest.approx(mann_whitney_auroc(maps, masks), abs=1e-6)
    assert out["pixel_ap"] == pytest.approx(average_precision(maps, masks))
    assert out["aupro"] == pytest.approx(brute_aupro(maps, masks), abs=1e-12)
    assert out["image_f1_max"] == pytest.approx(f1_max(scores, labels)[0])
    pred, y = maps >= 0.9, masks
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    assert out["pixel_precision@thr"] == pytest.approx(tp / (tp + fp))
    assert out["pixel_recall@thr"] == pytest.approx(tp / (tp + fn))
    assert out["image_threshold"] == 1.2
    # lists of (H, W) maps (as resize_maps_native returns for mixed sizes) give the same numbers
    as_lists = evaluate_all(scores, labels, list(maps), list(masks), types, 1.2, 0.9)
    assert as_lists.keys() == out.keys() and all(as_lists[k] == pytest.approx(v) for k, v in out.items())
    binned = evaluate_all(scores, labels, maps, masks, types, aupro_bins=4000)
    assert binned["aupro"] == pytest.approx(out["aupro"], abs=5e-3)
    assert binned["per_defect/spot/aupro"] == pytest.approx(out["per_defect/spot/aupro"], abs=5e-3)
    # NaN thresholds (a model whose threshold buffers were never fitted) are not reported
    out = evaluate_all(scores, labels, maps, masks, types, image_threshold=torch.tensor(float("nan")))
    assert "image_threshold" not in out and "image_precision@thr" not in out


def test_per_defect_metrics_equal_hand_restriction():
    scores, labels, maps, masks, types = labelled_set()
    out = evaluate_all(scores, labels, maps, masks, types)
    for d in ("spot", "scratch"):
        keep = [i for i, t in enumerate(types) if t in ("good", d)]  # one defect type and the good images
        assert out[f"per_defect/{d}/image_auroc"] == pytest.approx(
            mann_whitney_auroc(scores[keep], labels[keep])
        )
        assert out[f"per_defect/{d}/pixel_auroc"] == pytest.approx(
            mann_whitney_auroc(maps[keep], masks[keep]), abs=1e-6
        )
        assert out[f"per_defect/{d}/aupro"] == pytest.approx(brute_aupro(maps[keep], masks[keep]), abs=1e-12)
    assert not any(k.startswith("per_defect/good") for k in out)


def test_evaluate_all_rejects_inconsistent_inputs():
    scores, labels, maps, masks, types = labelled_set()
    with pytest.raises(ValueError, match="defect type 'good'"):
        evaluate_all(scores, np.r_[1, labels[1:]], maps, masks, types)
    bad = masks.copy()
    bad[0, 0, 0] = True
    with pytest.raises(ValueError, match="good image 0 has a non-empty"):
        evaluate_all(scores, labels, maps, bad, types)
    with pytest.raises(ValueError, match="9 image scores"):
        evaluate_all(scores, labels, maps[:8], masks, types)


def test_resize_maps_native():
    ramp = torch.arange(4.0).repeat(4, 1)  # value = column index
    up = resize_maps_native(torch.stack([ramp, 2 * ramp]), (8, 8))
    assert isinstance(up, torch.Tensor) and up.shape == (2, 8, 8)
    # bilinear, align_corners=False: output column j samples source x = (j + 0.5) / 2 - 0.5
    j = torch.arange(1, 7, dtype=torch.float32)
    torch.testing.assert_close(up[0, 3, 1:7], (j + 0.5) / 2 - 0.5)
    torch.testing.assert_close(up[1], 2 * up[0])
    mixed = resize_maps_native([torch.ones(4, 4), torch.ones(2, 3)], [(8, 6), (4, 9)])
    assert [tuple(m.shape) for m in mixed] == [(8, 6), (4, 9)]
    assert all(torch.allclose(m, torch.ones_like(m)) for m in mixed)


# ------------------------------------------------------------------------------------------ thresholds


def test_quantile_threshold_uses_good_scores_only():
    scores, labels, maps, masks, types = labelled_set()
    held_out_good = np.random.default_rng(5).random(50)
    thr = quantile_threshold(held_out_good, 0.95)
    assert thr == pytest.approx(np.quantile(held_out_good, 0.95))
    pixel_thr = quantile_threshold(maps[:3], THREE_SIGMA_QUANTILE)  # pixels of good images
    assert pixel_thr == pytest.approx(np.quantile(maps[:3], THREE_SIGMA_QUANTILE))
    # relabelling the test set changes label-dependent metrics, never the thresholds
    relabelled_types = ["scratch", "good", "good", "good", *types[4:]]
    relabelled = np.array([int(t != "good") for t in relabelled_types])
    relabelled_masks = masks.copy()
    relabelled_masks[1:4] = False
    a = evaluate_all(scores, labels, maps, masks, types, thr, pixel_thr)
    b = evaluate_all(scores, relabelled, maps, relabelled_masks, relabelled_types, thr, pixel_thr)
    assert a["image_threshold"] == b["image_threshold"] == thr
    assert a["pixel_threshold"] == b["pixel_threshold"] == pixel_thr
    assert a["image_auroc"] != b["image_auroc"] and a["pixel_recall@thr"] != b["pixel_recall@thr"]
    for q in (-0.1, 1.5):
        with pytest.raises(ValueError, match="q must be in"):
            quantile_threshold(held_out_good, q)
    with pytest.raises(ValueError, match="no scores"):
        quantile_threshold(np.zeros(0), 0.5)


def test_three_sigma_threshold():
    assert THREE_SIGMA_TAIL == pytest.approx(2 * stats.norm.sf(3.0))
    for norm in (1, 2):
        assert three_sigma_threshold(1, norm) == 3.0  # one channel: |z| > 3 exactly
    assert three_sigma_threshold(3, 2) == pytest.approx(math.sqrt(stats.chi2.isf(THREE_SIGMA_TAIL, 3)))
    # Monte Carlo: the false-alarm rate on independent N(0, 1) channels is the three-sigma rate
    z = np.random.default_rng(0).standard_normal((1_000_000, 3))
    for channels in (2, 3):
        for norm in (1, 2):
            a = np.linalg.norm(z[:, :channels], ord=norm, axis=1)
            thr = three_sigma_threshold(channels, norm)
            assert 3.0 < thr < 3.0 * channels ** (1 / norm)
            rate, sd = float(np.mean(a > thr)), math.sqrt(THREE_SIGMA_TAIL / len(a))
            assert abs(rate - THREE_SIGMA_TAIL) < 5 * sd
            # the distribution-free version on the same "good pixels" agrees
            assert quantile_threshold(a, THREE_SIGMA_QUANTILE) == pytest.approx(thr, rel=0.02)
    with pytest.raises(ValueError, match="norm must be 1 or 2"):
        three_sigma_threshold(3, 3)


# --------------------------------------------------------------------------------------------- figures


def _png_size(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_figures_write_pngs(tmp_path):
    scores, labels, maps, masks, types = labelled_set()
    rng = np.random.default_rng(0)
    image = torch.rand(3, 8, 8) * 2 - 1
    p = figures.anomaly_panel(image, masks[4], maps[4], tmp_path / "a" / "fig3.png", threshold=0.9)
    assert _png_size(p) == (1400, 340)
    p = figures.anomaly_panel(
        image[:1], masks[4], maps[4], tmp_path / "fig3_gray.png", threshold=3.76,
        good_values=maps[:3], lines=[3.76], title="gray",
    )  # fmt: skip
    assert _png_size(p) == (1400, 340)
    raw = {"defect-free pixels": rng.normal(0, 0.01, 500), "defective pixels": rng.normal(0.02, 0.02, 80)}
    std = {"defect-free pixels": rng.normal(0, 1, 500), "defective pixels": rng.normal(4, 2, 80)}
    p = figures.raw_vs_standardized_histograms(raw, std, tmp_path / "fig2b.png", standardized_lines=[-3, 3])
    assert _png_size(p) == (1000, 360)
    p = figures.roc_curves(scores, labels, maps, masks, tmp_path / "roc.png")
    assert _png_size(p) == (900, 420)
    bars = {"bottle": {"ebm": 0.9, "draem": 0.97}, "cable": {"ebm": 0.7, "draem": float("nan")}}
    p = figures.category_bars(bars, tmp_path / "bars.png")
    assert _png_size(p)[1] == 400
    with pytest.raises(ValueError, match="colour scale"):
        figures.anomaly_panel(image, masks[4], maps[4], tmp_path / "x.png", threshold=float("nan"))
