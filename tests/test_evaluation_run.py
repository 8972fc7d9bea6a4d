"""The evaluation protocol inside real runs: per-defect metrics, label-free thresholds, figures."""

import json

import numpy as np
import torch
from PIL import Image

from ebmad.data import MVTecDataModule
from ebmad.evaluation.metrics import image_auroc
from ebmad.evaluation.thresholds import three_sigma_threshold
from ebmad.models.ebm import EBMModule
from ebmad.train import run

from conftest import read_scores


def test_per_defect_metrics_equal_a_computation_restricted_by_hand(make_cfg, tmp_path):
    run(make_cfg(out=tmp_path / "r"))
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    rows = read_scores(tmp_path / "r" / "scores.csv")
    defects = sorted({r["defect"] for r in rows} - {"good"})
    assert defects and {f"per_defect/{d}/image_auroc" for d in defects} <= set(res["metrics"])
    for d in defects:
        sel = [r for r in rows if r["defect"] in ("good", d)]
        scores = torch.tensor([float(r[res["image_score"]]) for r in sel], dtype=torch.float64)
        labels = torch.tensor([int(r["label"]) for r in sel])
        assert res["metrics"][f"per_defect/{d}/image_auroc"] == image_auroc(scores, labels)


def test_thresholds_come_from_held_out_good_images_and_travel_with_the_checkpoint(
    make_cfg, tmp_path, synth_root
):
    run(make_cfg("data.val_fraction=0.25", out=tmp_path / "r"))
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    model = EBMModule.load_from_checkpoint(tmp_path / "r" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert float(model.image_threshold) == res["thresholds"]["image"]
    assert float(model.pixel_threshold) == np.float32(three_sigma_threshold(3, 2))  # the paper's rule
    # recompute from the held-out defect-free images alone: no test image, no label
    dm = MVTecDataModule(str(synth_root), "tex_a", image_size=32, val_fraction=0.25, seed=0)
    dm.load_train()
    good = dm.val_data["image"][dm.val_data["label"] == 0]
    assert len(good) == 4
    scores, _ = model.score(good)
    # 4 images cannot estimate a 1 % false-alarm rate (thresholds.false_alarm_rate): the strictest threshold
    # they support is their maximum, and the result says so
    expected = scores[model.DEFAULT_IMAGE_SCORE].max()
    assert float(model.image_threshold) == float(expected)
    fit = res["thresholds"]["image_fit"]
    assert fit["n"] == 4 and fit["k"] == 1 and fit["enough"] is False and "too few" in fit["note"]
    for key in ("image_precision@thr", "image_recall@thr", "pixel_f1@thr"):
        assert 0.0 <= res["metrics"][key] <= 1.0


def test_run_writes_readable_figures(make_cfg, tmp_path):
    run(make_cfg(out=tmp_path / "r"))
    figs = {p.name: p for p in (tmp_path / "r" / "figures").glob("*.png")}
    assert "roc.png" in figs and "fig2b_raw_vs_standardized.png" in figs
    assert sum(n.startswith("fig3_") for n in figs) == 4
    for p in figs.values():
        w, h = Image.open(p).size
        assert p.stat().st_size > 10_000 and w >= 400 and h >= 200
