"""Atomic checkpoint writes, checkpoint validation, resume selection, and the non-finite guard."""

import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ebmad.reliability.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    atomic_torch_save,
    pick_resume_checkpoint,
    validate_checkpoint,
)
from ebmad.reliability.guards import (
    NonFiniteError,
    NonFiniteGuard,
    TrainingDiverged,
    check_finite_scores,
    report_values,
)
from ebmad.train import run

from conftest import REPO, compose_cfg, tiny_overrides

# ------------------------------------------------------------------------ atomic writes


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def half_written_save(obj, fh, *args, **kwargs):
    """torch.save that dies halfway: some bytes reach the file, then an error (disk full, kill...)."""
    fh.write(b"PK\x03\x04 partial checkpoint bytes")
    raise OSError(28, "No space left on device")


def test_atomic_save_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "statistics.pt"
    atomic_torch_save({"v": 1}, path)
    monkeypatch.setattr(torch, "save", half_written_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"v": 2}, path)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"v": 3}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"v": 1}
    assert leftovers(tmp_path) == []  # the temporary file is removed on an error
    AtomicCheckpointIO().save_checkpoint({"v": 4}, tmp_path / "sub" / "x.ckpt")  # makes the folder
    assert torch.load(tmp_path / "sub" / "x.ckpt", weights_only=False) == {"v": 4}


KILLED_WRITER = """
import sys, torch
from ebmad.reliability.checkpointing import atomic_torch_save
path = sys.argv[1]
big = {"a": torch.zeros(2_000_000), "tag": "A"}, {"a": torch.ones(2_000_000), "tag": "B"}
i = 0
while True:
    atomic_torch_save(big[i % 2], path)
    i += 1
    if i == 2:
        print("ready", flush=True)
"""


def test_sigkill_during_writes_leaves_a_complete_file(tmp_path):
    """A real kill -9 while 8 MB files are being rewritten: the name always holds a whole file."""
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # in the middle of later writes
    finally:
        proc.kill()
        proc.wait()
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["tag"] in ("A", "B") and float(ckpt["a"].mean()) == (0.0 if ckpt["tag"] == "A" else 1.0)
    # a leftover temporary file of the killed write is cleaned up by the resume logic, never picked
    (tmp_path / ".last.ckpt.123.abcd.tmp").write_bytes(b"PK\x03\x04 partial")
    assert (
        pick_resume_checkpoint(tmp_path) is None
    )  # (a bare dict here, not a Lightning checkpoint: set aside)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------- a real checkpoint


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory, synth_root):
    """checkpoints/last.ckpt of a tiny EBM run (train only) on the synthetic data."""
    out = tmp_path_factory.mktemp("ckpt_run")
    run(compose_cfg(out, [*tiny_overrides(synth_root), "logger=none", "test=false"]))
    path = out / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def truncated_copy(src, dst, fraction=0.6):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def test_validate_accepts_a_real_checkpoint(real_ckpt):
    ckpt = validate_checkpoint(real_ckpt, "ebm", image_size=32, in_channels=3)
    assert ckpt["ebmad_model_type"] == "ebm" and ckpt["hyper_parameters"]["image_size"] == 32
    assert any(k.startswith("net.") for k in ckpt["state_dict"])


def test_validate_names_the_file_and_the_problem(tmp_path, real_ckpt):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match=r"nope\.ckpt does not exist"):
        validate_checkpoint(missing)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt is empty \(0 bytes\)"):
        validate_checkpoint(empty)
    text = tmp_path / "notes.ckpt"
    text.write_text("model: ebm\nlr: 0.0001\n")
    with pytest.raises(
        CheckpointError, match=r"notes\.ckpt is not a torch checkpoint: it looks like a text file"
    ):
        validate_checkpoint(text)
    png = tmp_path / "map.ckpt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(
        CheckpointError, match=r"map\.ckpt is not a torch checkpoint: it looks like a PNG image"
    ):
        validate_checkpoint(png)
    zipped = tmp_path / "archive.ckpt"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"archive\.ckpt is a zip file but not a torch checkpoint"):
        validate_checkpoint(zipped)
    plain = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, plain)
    with pytest.raises(
        CheckpointError, match=r"weights\.pt is a torch file but not an ebmad Lightning checkpoint"
    ):
        validate_checkpoint(plain)
    for fraction in (0.05, 0.6, 0.999):
        cut = truncated_copy(real_ckpt, tmp_path / f"cut{fraction}.ckpt", fraction)
        with pytest.raises(CheckpointError, match=rf"cut{fraction}\.ckpt is truncated or damaged") as err:
            validate_checkpoint(cut)
        assert err.value.damaged


def test_validate_refuses_another_model_type_or_size(tmp_path, real_ckpt):
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=False)
    ckpt["ebmad_model_type"] = "draem"
    other = tmp_path / "draem.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(
        CheckpointError, match=r"draem\.ckpt was written by model type 'draem', expected 'ebm'"
    ) as err:
        validate_checkpoint(other, "ebm")
    assert not err.value.damaged
    assert validate_checkpoint(other, "draem")["ebmad_model_type"] == "draem"
    del ckpt["ebmad_model_type"]  # written before the key existed: an EBM
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    assert validate_checkpoint(old, "ebm")
    with pytest.raises(
        CheckpointError, match=r"was trained with image_size=32 but image_size=64 is expected"
    ):
        validate_checkpoint(real_ckpt, "ebm", image_size=64)
    with pytest.raises(
        CheckpointError, match=r"was trained with in_channels=3 but in_channels=1 is expected"
    ):
        validate_checkpoint(real_ckpt, "ebm", image_size=32, in_channels=1)


def test_pick_resume_sets_a_damaged_last_ckpt_aside(tmp_path, real_ckpt, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    older = folder / "epoch=0-step=2.ckpt"
    older.write_bytes(real_ckpt.read_bytes())
    os.utime(older, (time.time() - 100, time.time() - 100))
    newer_bad = folder / "epoch=0-step=4.ckpt"
    newer_bad.write_bytes(b"")
    truncated_copy(real_ckpt, folder / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="ebmad.reliability.checkpointing"):
        assert pick_resume_checkpoint(folder, "ebm", image_size=32) == older
    names = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" not in names and "epoch=0-step=4.ckpt" not in names
    assert any(n.startswith("last.ckpt.damaged-") for n in names)
    assert any(n.startswith("epoch=0-step=4.ckpt.damaged-") for n in names)
    assert "damaged checkpoint" in caplog.text and "last.ckpt" in caplog.text and "truncated" in caplog.text
    # the set-aside files are never candidates again; with the good one damaged too there is none
    older.write_text("garbage")
    assert pick_resume_checkpoint(folder) is None
    assert pick_resume_checkpoint(tmp_path / "no_such_folder") is None


def test_pick_resume_refuses_a_sound_checkpoint_of_another_model(tmp_path, real_ckpt):
    (tmp_path / "last.ckpt").write_bytes(real_ckpt.read_bytes())
    with pytest.raises(CheckpointError, match="model type 'ebm', expected 'draem'"):
        pick_resume_checkpoint(tmp_path, "draem")
    assert (tmp_path / "last.ckpt").is_file()  # not set aside: it is not damaged


# -------------------------------------------------------------------------------- guard


class Tiny(pl.LightningModule):
    """Least squares on random data; something non-finite is planted at ``bad_step``."""

    def __init__(self, bad_step=None, bad="loss"):
        super().__init__()
        self.save_hyperparameters()
        self.w = nn.Parameter(torch.full((4,), 0.5))
        self.bad_step, self.bad = bad_step, bad
        self.w_before = None

    def on_train_batch_start(self, batch, batch_idx):
        self.w_before = self.w.detach().clone()

    def training_step(self, batch, batch_idx):
        x = batch[0]
        pred = x @ self.w
        loss = (pred - 1).pow(2).mean()
        energy = pred.detach().clone()
        planted = self.bad_step is not None and self.global_step >= self.bad_step
        if planted and self.bad == "loss":
            loss = loss * float("nan")
        if planted and self.bad == "energy_neg":
            energy[1] = float("inf")
        if planted and self.bad == "gradient":
            loss = loss + (self.w * 0).sqrt().sum()  # value 0, gradient inf * 0 = NaN
        report_values(self, energy_pos=pred, energy_neg=energy)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_tiny(tmp_path, model, guard, max_steps=6, ckpt_every=None):
    data = DataLoader(
        TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0))), batch_size=4
    )
    callbacks = [guard]
    if ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0,
                                         every_n_train_steps=ckpt_every))  # fmt: skip
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=bool(ckpt_every),
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=callbacks, plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, data)
    return trainer


@pytest.mark.parametrize(
    "bad,match",
    [
        ("loss", r"step 3: loss is not finite \(loss = nan\)"),
        ("energy_neg", r"step 3: energy_neg is not finite \(0 NaN and 1 inf of 4 values\)"),
        ("gradient", r"step 3: gradient is not finite \(in 1 parameter tensors: w\)"),
    ],
)
def test_guard_stops_before_the_broken_step_and_its_checkpoint(tmp_path, bad, match):
    model = Tiny(bad_step=3, bad=bad)
    with pytest.raises(TrainingDiverged, match=match) as err:
        fit_tiny(tmp_path, model, NonFiniteGuard(), ckpt_every=1)
    assert "lower model.lr / model.sgld_step_size, or enable model.alpha" in str(err.value)
    assert (
        torch.equal(model.w.detach(), model.w_before) and torch.isfinite(model.w).all()
    )  # no optimizer step
    ckpt = validate_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert ckpt["global_step"] == 3 and torch.isfinite(ckpt["state_dict"]["w"]).all()
    assert leftovers(tmp_path / "ckpt") == []


def test_guard_with_check_every_reports_the_first_bad_step(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"step 1 \(detected at step 3\): loss is not finite"):
        fit_tiny(tmp_path, Tiny(bad_step=1, bad="loss"), NonFiniteGuard(check_every=4), max_steps=20)


def test_guard_with_check_every_never_writes_broken_weights(tmp_path):
    # NaN gradients at step 1 are applied (the check is deferred), but the checkpoint after that step
    # is refused: the last checkpoint on disk is the one after step 0
    model = Tiny(bad_step=1, bad="gradient")
    with pytest.raises(TrainingDiverged, match=r"step 1 \(detected at step 2\): gradient is not finite"):
        fit_tiny(tmp_path, model, NonFiniteGuard(check_every=10), max_steps=20, ckpt_every=1)
    assert not torch.isfinite(model.w).all()  # the broken step did happen in memory
    ckpt = validate_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert ckpt["global_step"] == 1 and torch.isfinite(ckpt["state_dict"]["w"]).all()


def test_resuming_from_a_damaged_checkpoint_names_the_file(tmp_path):
    fit_tiny(tmp_path, Tiny(), NonFiniteGuard(), max_steps=2, ckpt_every=1)
    cut = truncated_copy(tmp_path / "ckpt" / "last.ckpt", tmp_path / "cut.ckpt")
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)  # fmt: skip
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    with pytest.raises(CheckpointError, match=r"cut\.ckpt is truncated or damaged"):
        trainer.fit(Tiny(), data, ckpt_path=cut)


def test_a_healthy_run_passes_and_reporting_is_off_without_the_guard(tmp_path):
    model = Tiny()
    fit_tiny(tmp_path, model, NonFiniteGuard(check_every=2), max_steps=5, ckpt_every=2)
    assert torch.isfinite(model.w).all()
    plain = Tiny()
    report_values(plain, energy_pos=torch.ones(2))  # no guard active: nothing stored
    assert not hasattr(plain, "_ebmad_guard_values")
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        NonFiniteGuard(check_every=0)


@pytest.mark.parametrize(
    "overrides",
    [("model.lr=5.0", "trainer.max_steps=30"), ("model.lr=1e30", "model.optimizer=sgd")],
    ids=["issue-case", "huge-lr"],
)
def test_guard_stops_a_diverging_ebm_run(make_cfg, overrides):
    cfg = make_cfg(*overrides)  # the guard is in the default callbacks
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: \w+ is not finite") as err:
        run(cfg)
    assert "model.lr" in str(err.value) and "model.sgld_step_size" in str(err.value)
    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert res["status"] == "diverged" and "is not finite" in res["error"] and res["model"] == "ebm"
    last = os.path.join(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    if os.path.exists(last):  # whatever was written before holds finite weights
        state = validate_checkpoint(last, "ebm")["state_dict"]
        weights = {k: v for k, v in state.items() if not k.endswith("_threshold")}  # NaN = not fitted yet
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_truncated_ckpt_path_is_named(make_cfg, tmp_path):
    run(make_cfg("test=false", out=tmp_path / "fit"))
    good = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{bad}.*truncated"):
        run(make_cfg("train=false", f"ckpt_path={bad}", out=tmp_path / "eval"))
    with pytest.raises(CheckpointError, match=r"model type 'ebm'.*model=ebm"):
        run(make_cfg("model=ssae", "train=false", f"ckpt_path={good}", out=tmp_path / "eval2"))


def test_check_finite_scores_names_the_score_and_the_count():
    ok = {"energy": torch.tensor([1.0, 2.0]), "a_std_l2": torch.zeros(2, 4, 4), "label": torch.tensor([0, 1])}
    check_finite_scores(ok, "test batch 0")
    bad = {**ok, "A_std_l2": torch.tensor([1.0, float("nan"), float("inf"), float("nan")])}
    with pytest.raises(
        NonFiniteError, match=r"test batch 2: score 'A_std_l2' has 3 non-finite values of 4 \(2 NaN, 1 inf\)"
    ):
        check_finite_scores(bad, "test batch 2")
