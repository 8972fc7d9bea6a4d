"""A diverged model always ends as ``status: diverged``: in training (the guard) and after it (statistics,
thresholds, test and validation scores), in every model; earlier checkpoints stay loadable; a sweep
re-run skips the job."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ebmad.models import model_class
from ebmad.reliability.checkpointing import validate_checkpoint
from ebmad.reliability.guards import DEFAULT_HINT, TrainingDiverged
from ebmad.train import run

from conftest import compose_cfg

MODELS = {
    "ebm": [],
    "draem": ["model=draem", "model.recon_base_width=8", "model.disc_base_width=8"],
    "ssae": ["model=ssae", "model.widths=[4,8]", "model.sdc_blocks=1", "model.dilations=[1,2]"],
}


def nan_scores(cls, monkeypatch) -> None:
    """From now on the model's scores are NaN: what a model whose weights blew up gives after training."""
    score = cls.score

    def poisoned(self, x):
        images, maps = score(self, x)
        return {k: torch.full_like(v, float("nan")) for k, v in images.items()}, maps

    monkeypatch.setattr(cls, "score", poisoned)


def read_results(out):
    return json.loads((out / "results.json").read_text())


def assert_diverged(out, quantity: str, hint: str) -> dict:
    res = read_results(out)
    assert res["status"] == "diverged", res
    assert re.search(r"at step \d+", res["error"]) and quantity in res["error"], res["error"]
    assert quantity in res["quantity"] and hint in res["error"]
    return res


@pytest.mark.parametrize("kind", list(MODELS))
def test_scores_going_non_finite_after_training_end_as_diverged(kind, make_cfg, tmp_path, monkeypatch):
    cls = model_class(kind)
    nan_scores(cls, monkeypatch)
    out = tmp_path / kind
    with pytest.raises(TrainingDiverged, match="after training"):
        run(make_cfg(*MODELS[kind], out=out))
    res = assert_diverged(out, f"score '{cls.DEFAULT_IMAGE_SCORE}'", cls.DIVERGENCE_HINT)
    assert "thresholds" in res["quantity"] and res["global_step"] == 6 and res["model"] == kind
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert ckpts, "the checkpoints written during training are kept"
    for path in ckpts:
        validate_checkpoint(path, kind)  # loadable (weights only)
    again = run(make_cfg(*MODELS[kind], out=out))  # a sweep re-run skips it, as for training divergence
    assert again["status"] == "diverged" and read_results(out) == res


def test_non_finite_gradient_statistics_end_as_diverged(make_cfg, tmp_path, monkeypatch):
    cls = model_class("ebm")
    fit = cls.fit_statistics

    def overflowing(self, batches, reduce_sum=None):
        out = fit(self, batches, reduce_sum)
        out["std"] = torch.full_like(out["std"], float("inf"))
        return out

    monkeypatch.setattr(cls, "fit_statistics", overflowing)
    with pytest.raises(TrainingDiverged):
        run(make_cfg(out=tmp_path / "r"))
    assert_diverged(tmp_path / "r", "gradient statistics (std)", DEFAULT_HINT)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, synth_root):
    """A finished tiny run of each model: {kind: last.ckpt}."""
    from conftest import tiny_overrides

    out = {}
    for kind, extra in MODELS.items():
        base = tiny_overrides(synth_root)
        if kind != "ebm":
            base = [o for o in base if not o.startswith("model.")]
        folder = tmp_path_factory.mktemp(kind)
        run(compose_cfg(folder, [*base, "logger=none", *extra]))
        out[kind] = folder / "checkpoints" / "last.ckpt"
    return out


@pytest.mark.parametrize("kind", list(MODELS))
def test_non_finite_test_scores_of_a_checkpoint_end_as_diverged(
    kind, checkpoints, make_cfg, tmp_path, monkeypatch
):
    cls = model_class(kind)
    nan_scores(cls, monkeypatch)
    out = tmp_path / "eval"
    with pytest.raises(TrainingDiverged):
        run(make_cfg(*MODELS[kind], "train=false", f"ckpt_path={checkpoints[kind]}", out=out))
    res = assert_diverged(out, "test batch 0", cls.DIVERGENCE_HINT)
    assert res["global_step"] == 6  # the checkpoint's step


def test_non_finite_validation_scores_end_as_diverged(checkpoints, make_cfg, tmp_path, monkeypatch):
    nan_scores(model_class("ebm"), monkeypatch)
    out = tmp_path / "val"
    with pytest.raises(TrainingDiverged):
        run(make_cfg("train=false", "test=false", "data.val_fraction=0.25", f"ckpt_path={checkpoints['ebm']}",
                     out=out))  # fmt: skip
    assert_diverged(out, "evaluation batch 0", DEFAULT_HINT)


@pytest.mark.slow  # 30 quickstart steps: 70-100 s on 2 cores
def test_quickstart_with_a_huge_learning_rate_ends_as_diverged(tmp_path):
    """The issue's case with the quickstart experiment itself (not a shrunk config)."""
    cfg = compose_cfg(tmp_path / "run", ["experiment=quickstart", "logger=none", "model.lr=5.0",
                                         "trainer.max_steps=30", f"paths.data_dir={tmp_path / 'data'}"])  # fmt: skip
    with pytest.raises(TrainingDiverged):
        run(cfg)
    res = read_results(tmp_path / "run")
    assert res["status"] == "diverged", res
    assert re.search(r"at step \d+", res["error"]) and res["quantity"] in res["error"]
    assert DEFAULT_HINT in res["error"]
