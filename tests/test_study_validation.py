"""The validation study (experiments/study_validation.py): per-kind scoring and the rank correlations."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from ebmad.train import run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import study_validation as sv  # noqa: E402


def record(run: str, category: str, model: str, test: dict[str, float], val: dict[str, float]) -> dict:
    """A scored run: the same validation AUROC ``val[metric]`` on every kind (the derived ones follow)."""
    head = {"ebm": ("A", "a"), "draem": ("M", "m")}[model]
    return {"run": run, "model": model, "category": category, "size": 32, "image_score": head[0],
            "pixel_map": head[1], "test": test, "device": "cpu: test",
            "val": {k: dict(val) for k in (sv.OLD, *sv.NEW_KINDS, sv.POOLED)}}  # fmt: skip


def test_correlations_per_category_pooled_and_per_model_set():
    recs = []
    for c, offset, sign in (("bottle", 0.0, 1), ("pill", 0.3, -1)):  # pill: validation ranks backwards
        for i in range(5):
            t = 0.5 + 0.05 * i
            recs.append(record(f"r{c}{i}", c, "ebm", {"image_auroc/A": t, "image_auroc/B": t + 0.01,
                                                      "pixel_auroc/a": t},
                               {"image_auroc/A": offset + sign * t, "image_auroc/B": offset + sign * (t + 0.01),
                                "pixel_auroc/a": offset + t}))  # fmt: skip
    recs.append(record("d", "bottle", "draem", {"image_auroc/M": 0.99, "pixel_auroc/m": 0.1},
                       {"image_auroc/M": 0.99, "pixel_auroc/m": 0.0}))  # fmt: skip
    rows = {(r["group"], r["what"], r["kind"]): r for r in sv.correlations(recs)}
    b = rows[("32px/bottle/ebm", "image, runs", sv.OLD)]
    assert b["rho"] == pytest.approx(1.0) and b["n"] == b["n_runs"] == 5
    assert b["test_spread"] == pytest.approx(0.2) and b["models"] == "ebm"
    assert rows[("32px/pill/ebm", "image, runs", "warp")]["rho"] == pytest.approx(-1.0)
    assert rows[("32px/bottle/ebm", "image, runs x scores", "color")]["n"] == 10
    pooled = rows[("32px/pooled/ebm", "image, runs", "new_mean")]  # +1 and -1 within category: ~0 pooled
    assert pooled["n"] == 10 and abs(pooled["rho"]) < 0.2 and pooled["test_spread"] == pytest.approx(0.2)
    assert rows[("32px/pooled/ebm", "pixel, runs", sv.OLD)]["rho"] == pytest.approx(1.0)
    # DRAEM joins the "all" set: ranked first on validation and on test among bottle's image AUROCs
    allb = rows[("32px/bottle/all", "image, runs", sv.OLD)]
    assert allb["n"] == 6 and allb["models"] == "draem+ebm" and allb["rho"] == pytest.approx(1.0)
    # DRAEM trains on perlin_texture: the neutral mean leaves it out
    assert ("32px/bottle/all", "image, runs", "neutral_mean(perlin_patch+warp+color)") in rows
    assert ("32px/bottle/ebm", "image, runs", "neutral_mean(perlin_texture+perlin_patch+warp+color)") in rows
    assert math.isnan(sv.spearman([1, 2], [1, 2])[0]) and math.isnan(sv.spearman([1, 1, 1], [1, 2, 3])[0])


class AbsScorer(torch.nn.Module):
    """Image score: max |x|; map: |x| (channel mean); a second map that sees nothing."""

    @property
    def device(self):
        return torch.device("cpu")

    def score(self, x):
        m = x.abs().mean(1)
        return {"max": m.flatten(1).amax(1)}, {"abs": m, "zero": torch.zeros_like(m) + torch.rand_like(m)}


def test_per_kind_aurocs_score_every_map_per_kind():
    good = torch.zeros(4, 1, 8, 8)
    mask = torch.zeros(4, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 2:5] = True
    seen = (torch.where(mask[:, None], 1.0, 0.0), mask)
    unseen = (torch.zeros(4, 1, 8, 8), mask)
    out = sv.per_kind_aurocs(AbsScorer(), good, {"seen": seen, "unseen": unseen}, batch_size=3,
                             unions={"both": ["seen", "unseen"]})  # fmt: skip
    assert out["seen"]["image_auroc/max"] == pytest.approx(1.0)
    assert out["seen"]["pixel_auroc/abs"] == pytest.approx(1.0)
    assert out["unseen"]["image_auroc/max"] == pytest.approx(0.5)
    assert 0.2 < out["seen"]["pixel_auroc/zero"] < 0.8
    assert out["both"]["image_auroc/max"] == pytest.approx(0.75)  # 4 good, 4 seen (max), 4 unseen (ties)


def test_a_tiny_run_is_scored_and_its_old_protocol_reproduced(make_cfg, tmp_path):
    out = tmp_path / "run"
    run(make_cfg("data.val_fraction=0.25", "eval.untrained_reference=false", "eval.figures=false", out=out))
    rec = sv.score_run(out, texture_dir=None)  # procedural textures
    assert rec["model"] == "ebm" and rec["size"] == 32 and rec["n_val_good"] == 4
    assert rec["old_protocol_max_diff"] == pytest.approx(0.0, abs=1e-6)  # the run's own validation, rebuilt
    assert set(rec["val"]) == {sv.OLD, *sv.NEW_KINDS, sv.POOLED}
    assert f"image_auroc/{rec['image_score']}" in rec["val"]["warp"]
    assert rec["test"]["image_auroc"] == pytest.approx(rec["test"][f"image_auroc/{rec['image_score']}"])
    rows = sv.correlations([rec, {**rec, "run": "copy"}, {**rec, "run": "copy2"}])
    assert {r["group"] for r in rows} == {"32px/tex_a/ebm"}
