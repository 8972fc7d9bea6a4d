"""Checkpoint selection by the label-free validation score (ebmad/run/selection.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ebmad.models.base import AnomalyModule
from ebmad.run.selection import (
    SCORE_KEY,
    ValidationCheckpoint,
    per_kind_scores,
    preserved_rng,
    validation_score,
)
from ebmad.train import run

from conftest import assert_same_training_state, ckpt_state

VAL = ("data.val_fraction=0.25", "test=false")  # 4 of the 16 synthetic training images held out
ON = ("callbacks.validation_checkpoint.every_n_steps=2",)
STATE_KEY = "ValidationCheckpoint{'monitor': 'validation/score', 'mode': 'max'}"


def test_validation_score_is_the_mean_of_the_headline_aurocs():
    m = {"validation/image_auroc/A": 0.8, "validation/pixel_auroc/a": 0.6, "validation/image_auroc/B": 0.1}
    assert validation_score(m, "A", "a") == pytest.approx(0.7)
    assert validation_score({"image_auroc/A": 0.8}, "A", "a") == pytest.approx(0.8)  # no pixel labels
    with pytest.raises(KeyError, match="image_auroc/C"):
        validation_score(m, "C", "a")


class AbsScorer(torch.nn.Module):
    """Image score: max |x|; map: |x| (channel mean)."""

    DEFAULT_IMAGE_SCORE, DEFAULT_PIXEL_MAP = "max", "abs"

    def score(self, x):
        m = x.abs().mean(1)
        return {"max": m.flatten(1).amax(1)}, {"abs": m}


def test_per_kind_scores_separate_the_kinds():
    good = torch.zeros(4, 1, 8, 8)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 2:5] = True
    seen = torch.where(mask[:4, None], 1.0, 0.0)  # kind 0: visible inside its mask
    unseen = torch.zeros(4, 1, 8, 8)  # kind 1: nothing changed, the scorer cannot see it
    data = {"image": torch.cat([good, seen, unseen]), "mask": torch.cat([torch.zeros_like(mask[:4]), mask]),
            "label": torch.tensor([0] * 4 + [1] * 8), "kind": torch.tensor([-1] * 4 + [0] * 4 + [1] * 4)}  # fmt: skip
    model = AbsScorer().train()
    out = per_kind_scores(model, data, ["seen", "unseen"], batch_size=5)
    assert out == {"validation/seen/score": pytest.approx(1.0), "validation/unseen/score": pytest.approx(0.5)}
    assert model.training
    data["strength"] = torch.tensor([-1] * 4 + [0, 0, 1, 1] * 2)
    out = per_kind_scores(model, data, ["seen", "unseen"], batch_size=5, strengths=[0.5, 1.0])
    assert out["validation/seen@0.5/score"] == out["validation/seen@1/score"] == pytest.approx(1.0)
    assert out["validation/unseen@0.5/score"] == pytest.approx(0.5) and len(out) == 6
    with pytest.raises(ValueError, match="'kind'"):
        per_kind_scores(model, {k: v for k, v in data.items() if k != "kind"}, ["seen"], 4)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="every_n_steps"):
        ValidationCheckpoint(every_n_steps=-1)
    with pytest.raises(ValueError, match="mode"):
        ValidationCheckpoint(every_n_steps=2, dirpath="x", mode="best")
    with pytest.raises(ValueError, match="dirpath"):
        ValidationCheckpoint(every_n_steps=2)


def test_preserved_rng_consumes_no_random_state():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    with preserved_rng(torch.device("cpu")):
        torch.rand(100), np.random.rand(5), random.random()
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_state_round_trip():
    a = ValidationCheckpoint(every_n_steps=2, dirpath="ck")
    a.best_score, a.best_step, a.history, a._best_path = 0.9, 4, [(2, 0.5), (4, 0.9)], "ck/best.ckpt"
    b = ValidationCheckpoint(every_n_steps=2, dirpath="other")
    b.load_state_dict(a.state_dict())
    assert (b.best_score, b.best_step, b.history, b.best_model_path) == (
        0.9,
        4,
        [(2, 0.5), (4, 0.9)],
        "ck/best.ckpt",
    )
    assert not b.improves(0.85) and b.improves(0.95) and not b.improves(float("nan"))


def test_needs_a_validation_set(make_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"validation_checkpoint\.every_n_steps=2.*val_fraction"):
        run(make_cfg(*ON, "test=false", out=tmp_path / "x"))


def test_training_is_unchanged_and_best_ckpt_is_written(make_cfg, tmp_path):
    """The real validation (statistics, scores) every 2 steps leaves the training bit-identical."""
    run(make_cfg(*VAL, out=tmp_path / "off"))
    run(make_cfg(*VAL, *ON, out=tmp_path / "on"))
    off, on = (ckpt_state(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("off", "on"))
    assert_same_training_state(off, on)
    state = on["callbacks"][STATE_KEY]
    assert [s for s, _ in state["history"]] == [2, 4, 6]
    best = ckpt_state(tmp_path / "on" / "checkpoints" / "best.ckpt")
    assert best["global_step"] == state["best_step"]
    assert state["best_score"] == max(v for _, v in state["history"])
    assert not (tmp_path / "off" / "checkpoints" / "best.ckpt").exists()


PLANTED = {2: 0.6, 4: 0.9, 6: 0.7}  # step 4 is the best


@pytest.fixture
def planted(monkeypatch):
    def evaluate(self, batches):
        v = PLANTED.get(self.global_step, 0.5)
        return {f"image_auroc/{self.DEFAULT_IMAGE_SCORE}": v, f"pixel_auroc/{self.DEFAULT_PIXEL_MAP}": v}

    monkeypatch.setattr(AnomalyModule, "evaluate", evaluate)


def test_best_ckpt_is_the_planted_step_and_survives_resume(make_cfg, tmp_path, planted):
    run(make_cfg(*VAL, *ON, "trainer.max_steps=4", out=tmp_path / "part"))
    part = tmp_path / "part" / "checkpoints"
    assert ckpt_state(part / "best.ckpt")["global_step"] == 4
    state = ckpt_state(part / "last.ckpt")["callbacks"][STATE_KEY]
    assert (state["best_step"], state["best_score"]) == (4, pytest.approx(0.9))
    # resumed to step 6 (0.7): the restored best (0.9 at step 4) stays; without it step 6 would win
    run(make_cfg(*VAL, *ON, f"ckpt_path={part / 'last.ckpt'}", out=tmp_path / "resumed"))
    state = ckpt_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["callbacks"][STATE_KEY]
    assert [s for s, _ in state["history"]] == [2, 4, 6] and state["best_step"] == 4
    assert state["best_path"] == str(part / "best.ckpt")
    assert not (tmp_path / "resumed" / "checkpoints" / "best.ckpt").exists()


def test_monitor_must_be_a_validation_metric(make_cfg, tmp_path, planted):
    with pytest.raises(ValueError, match=rf"monitor='validation/nope'.*{SCORE_KEY}"):
        run(
            make_cfg(*VAL, *ON, "callbacks.validation_checkpoint.monitor=validation/nope", out=tmp_path / "x")
        )


# ------------------------------------------------------------------ wired into the run (ebmad.train)
KINDS = ("data.val_kinds=[perlin_patch,color]", "data.val_strengths=[0.4,0.8]")


def test_a_run_records_its_validation_kinds_and_scores_per_kind(make_cfg, tmp_path):
    res = run(
        make_cfg("data.val_fraction=0.25", *KINDS, "eval.untrained_reference=false", out=tmp_path / "r")
    )
    vs = res["validation_set"]
    assert vs["kinds"] == ["perlin_patch", "color"] and vs["strengths"] == [0.4, 0.8]
    assert vs["trains_on_validation_kinds"] == []  # the EBM trains on none of them
    val = res["validation"]
    assert 0 <= val[SCORE_KEY] <= 1
    for key in ("perlin_patch", "color", "perlin_patch@0.4", "color@0.8"):
        assert 0 <= val[f"validation/{key}/score"] <= 1


def test_draem_is_marked_when_validated_on_what_it_trains_on(make_cfg, tmp_path):
    res = run(make_cfg("model=draem", "model.recon_base_width=8", "model.disc_base_width=8", "data.image_size=32",
                       "data.val_fraction=0.25", "data.val_kinds=[perlin_texture,color]", out=tmp_path / "d"))  # fmt: skip
    assert res["validation_set"]["trains_on_validation_kinds"] == ["perlin_texture"]


def test_the_test_runs_on_the_selected_checkpoint_when_asked(make_cfg, tmp_path, planted):
    """A planted better step (4 of 6): with test_ckpt=best the test runs on best.ckpt (step 4)."""
    out = tmp_path / "best"
    res = run(
        make_cfg("data.val_fraction=0.25", *ON, "test_ckpt=best", "eval.untrained_reference=false", out=out)
    )
    best = out / "checkpoints" / "best.ckpt"
    assert res["status"] == "completed" and res["selection"]["best_step"] == 4
    assert ckpt_state(best)["global_step"] == 4 and res["tested_checkpoint"] == str(best)
    with pytest.raises(ValueError, match="test_ckpt=best needs the checkpoint selection"):
        run(make_cfg("test_ckpt=best", out=tmp_path / "no"))


def test_the_optuna_objective_is_the_validation_score():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ebmad.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=ebm_optuna"])
    assert cfg.optimized_metric == SCORE_KEY and cfg.data.val_fraction > 0
    assert "spots_scratches" not in cfg.data.val_kinds


def test_the_report_marks_a_model_validated_on_a_kind_it_trains_on():
    from ebmad.reporting.sweeps import Job
    from ebmad.reporting.tables import validation_note

    def jobs(model):
        return [Job(None, "tex_a", "default", "completed", model=model, validation={SCORE_KEY: 0.9})]

    data = {"val_kinds": ["perlin_texture", "color"]}
    assert "draem trains on perlin_texture" in validation_note("draem", data, jobs("draem"))
    assert "trains on" not in validation_note("ebm", data, jobs("ebm"))
    assert "perlin_texture, color" in validation_note("ebm", data, jobs("ebm"))
    assert (
        validation_note("ebm", data, [Job(None, "tex_a", "default", "completed")]) == ""
    )  # no validation run
    # what a run recorded decides: an EBM trained against Perlin/texture anomalies (model.oe_weight > 0)
    oe = [
        Job(None, "tex_a", "default", "completed", validation={SCORE_KEY: 0.9}, trains_on=["perlin_texture"])
    ]
    assert "ebm trains on perlin_texture" in validation_note("ebm", data, oe)
