"""SpikeGuard: robust z-score detection, skip / restore / lower_lr / reset_buffer recovery, logging, resume."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ebmad.train
from ebmad.reliability.guards import NonFiniteGuard, TrainingDiverged
from ebmad.reliability.spikes import RobustZScore, SpikeGuard, robust_z
from ebmad.train import run

from conftest import assert_same_training_state, ckpt_state

FAST = ("eval.untrained_reference=false", "eval.figures=false")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------ detector
def test_robust_z_is_median_and_scaled_mad():
    med, z = robust_z([1.0, 2.0, 3.0, 4.0, 100.0], 3.0 + 1.4826 * 10)
    assert med == 3.0 and z == pytest.approx(10.0)  # MAD of (1, 2, 3, 4, 100) is 1: the 100 does not count
    assert robust_z([5.0] * 10, 5.0) == (5.0, 0.0)  # constant window: floored scale, no division by 0
    assert robust_z([5.0] * 10, 5.001)[1] < 8  # a tiny wiggle on a constant series is no spike


def test_detector_fires_on_outliers_not_on_noise_nor_in_warmup():
    rng = np.random.default_rng(0)
    noise = 5.0 + 0.1 * rng.standard_normal(300)
    det = RobustZScore(window=50, warmup=20, z_threshold=8.0)
    assert det.update({"x": 50.0}, step=0) == []  # warmup: not tested (and accepted)
    det = RobustZScore(window=50, warmup=20, z_threshold=8.0)
    for i, v in enumerate(noise[:200]):
        assert det.update({"x": float(v), "y": -float(v)}, step=i) == [], i  # Gaussian noise: never
    window, accepted = list(det.values["x"]), det.accepted
    assert len(window) == 50 and accepted == 200

    events = det.update({"x": 7.0, "y": -5.0}, step=200)  # x: 20 sigma up; y is fine
    assert [(e.step, e.quantity) for e in events] == [(200, "x")]
    assert events[0].z > 8 and events[0].median == pytest.approx(np.median(window))
    # the spike step's values (both quantities) never enter the windows
    assert list(det.values["x"]) == window and list(det.values["y"]) == [-v for v in window]
    assert det.accepted == accepted
    assert [e.quantity for e in det.update({"x": 3.0, "y": -5.0}, step=201)] == ["x"]  # a drop too
    nonfinite = det.update({"x": float("nan"), "y": float("inf")}, step=202)
    assert [e.quantity for e in nonfinite] == ["x", "y"] and math.isnan(nonfinite[0].value)
    assert det.update({"x": float(noise[200]), "y": -float(noise[200])}, step=203) == []
    assert det.values["x"][-1] == noise[200]

    resumed = RobustZScore(window=50, warmup=20, z_threshold=8.0)
    resumed.load_state_dict(copy.deepcopy(det.state_dict()))
    for v in (5.05, 9.0, 4.98):  # the same decisions after a state round trip
        assert [e.z for e in resumed.update({"x": v, "y": -v})] == [
            e.z for e in det.update({"x": v, "y": -v})
        ]

    fresh = RobustZScore(window=50, warmup=20)
    assert [e.quantity for e in fresh.update({"x": float("inf")})] == ["x"]  # non-finite: even in warmup


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"policy: unknown actions \['reload'\]"):
        SpikeGuard(policy=["skip", "reload"])
    with pytest.raises(ValueError, match="lr_factor"):
        SpikeGuard(lr_factor=2.0)
    with pytest.raises(ValueError, match="window must be >= 3"):
        SpikeGuard(window=2)


# ------------------------------------------------------------------------- a tiny model with Adam
class Tiny(pl.LightningModule):
    """Least squares with Adam; the loss is multiplied by ``factor`` at the steps in ``spike_steps``
    (``nan_grad``: plus a term of value 0 whose gradient is NaN)."""

    def __init__(self, spike_steps=(), factor=1e4, nan_grad=False):
        super().__init__()
        self.w = nn.Parameter(torch.full((4,), 0.5))
        self.spike_steps, self.factor, self.nan_grad = set(spike_steps), factor, nan_grad

    def training_step(self, batch, batch_idx):
        loss = (batch[0] @ self.w - 1).pow(2).mean()
        if self.global_step not in self.spike_steps:
            return loss
        return loss * self.factor + ((self.w * 0).sqrt().sum() if self.nan_grad else 0)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


class Recorder(pl.Callback):
    """The weights and Adam state before and after every step."""

    def __init__(self):
        self.before, self.after = {}, {}

    def _state(self, trainer, pl_module):
        return pl_module.w.detach().clone(), copy.deepcopy(trainer.optimizers[0].state_dict()["state"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._state(trainer, pl_module)


def fit(tmp_path, model, *callbacks, max_steps=12):
    data = DataLoader(
        TensorDataset(torch.randn(512, 4, generator=torch.Generator().manual_seed(0))), batch_size=32
    )
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=list(callbacks),
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, data)
    return trainer


def same_adam_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_a_level_shift_restarts_the_window_instead_of_flagging_every_later_step():
    """Energies of unregularized CD can drift to a new level: that is flagged `patience` times, not forever."""
    rng = np.random.default_rng(1)
    det = RobustZScore(window=50, warmup=20, z_threshold=8.0, patience=5)
    for i in range(60):
        assert det.update({"e": 1.0 + 0.01 * rng.standard_normal()}, step=i) == []
    flagged = [bool(det.update({"e": 100.0 + 0.01 * rng.standard_normal()}, step=60 + i)) for i in range(20)]
    assert flagged == [True] * 5 + [False] * 15 and det.shifts == 1
    assert det.update({"e": 1.0}, step=80)  # back at the old level: out of line against the new one
    state = det.state_dict()
    resumed = RobustZScore(window=50, warmup=20, z_threshold=8.0, patience=5)
    resumed.load_state_dict(copy.deepcopy(state))
    assert (
        resumed.run == det.run and resumed.shifts == 1 and list(resumed.values["e"]) == list(det.values["e"])
    )
    # a run broken by an accepted step does not count, nor do non-finite values
    det = RobustZScore(window=50, warmup=3, z_threshold=8.0, patience=3)
    for i in range(10):
        det.update({"e": 1.0 + 0.01 * rng.standard_normal()}, step=i)
    for v in (100.0, 100.0, 1.0, 100.0, float("nan"), 100.0):
        det.update({"e": v})
    assert det.shifts == 0


def test_skip_leaves_weights_and_adam_state_unchanged(tmp_path):
    guard = SpikeGuard(policy=["skip"], warmup=3, csv_path=str(tmp_path / "spikes.csv"))
    rec = Recorder()
    fit(tmp_path, Tiny(spike_steps={6}), guard, rec)
    w_before, adam_before = rec.before[6]
    w_after, adam_after = rec.after[6]
    assert torch.equal(w_before, w_after) and same_adam_state(adam_before, adam_after)
    assert int(adam_before[0]["step"]) == int(adam_after[0]["step"]) == 6  # (steps 0-5: 6 updates)
    w5, adam5 = rec.after[5]
    assert not torch.equal(rec.before[5][0], w5)  # (a normal step does change both)
    assert int(rec.before[5][1][0]["step"]) == 5 and int(adam5[0]["step"]) == 6
    assert int(rec.after[7][1][0]["step"]) == 7
    rows = read_rows(tmp_path / "spikes.csv")
    assert [(r["step"], r["quantity"], r["actions"]) for r in rows] == [("6", "loss", "skip")]
    assert float(rows[0]["z"]) > 8 and guard.n_events == 1 and guard.last_event.step == 6


def test_non_finite_values_and_gradients(tmp_path):
    rec = Recorder()
    fit(tmp_path, Tiny(spike_steps={2}, factor=float("nan")), SpikeGuard(policy=["skip"]), rec, max_steps=5)
    assert torch.equal(rec.before[2][0], rec.after[2][0]) and torch.isfinite(rec.after[4][0]).all()
    # a finite spike with NaN gradients: skipped before the NonFiniteGuard after it checks the gradients
    model = Tiny(spike_steps={6}, nan_grad=True)
    fit(tmp_path, model, SpikeGuard(policy=["skip"], warmup=3), NonFiniteGuard(), rec)
    assert torch.isfinite(model.w).all() and torch.equal(rec.before[6][0], rec.after[6][0])
    with pytest.raises(TrainingDiverged, match="step 6: gradient is not finite"):  # (the guard alone)
        fit(tmp_path, Tiny(spike_steps={6}, nan_grad=True), NonFiniteGuard())
    # a NaN loss: the non-finite guard stops a run without recovery, but not one whose policy skipped the step
    model = Tiny(spike_steps={2}, factor=float("nan"))
    fit(tmp_path, model, SpikeGuard(policy=["skip"]), NonFiniteGuard(), rec, max_steps=5)
    assert torch.isfinite(model.w).all() and torch.equal(rec.before[2][0], rec.after[2][0])
    with pytest.raises(TrainingDiverged, match="step 2: loss is not finite"):
        fit(
            tmp_path,
            Tiny(spike_steps={2}, factor=float("nan")),
            SpikeGuard(policy=[]),
            NonFiniteGuard(),
            max_steps=5,
        )


def test_log_only_changes_nothing_and_max_events_stops_a_policy(tmp_path):
    rec = Recorder()
    guard = SpikeGuard(policy=[], warmup=3, max_events=1, csv_path=str(tmp_path / "log.csv"))
    fit(tmp_path, Tiny(spike_steps={5, 6, 7}), guard, rec)
    assert not torch.equal(rec.before[6][0], rec.after[6][0])  # the step was applied
    rows = read_rows(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == ["5", "6", "7"] and {r["actions"] for r in rows} == {"log"}
    assert guard.n_events == 3  # log only: max_events does not stop the run

    guard = SpikeGuard(policy=["skip", "lower_lr"], warmup=3, max_events=2)
    with pytest.raises(TrainingDiverged, match=r"2 loss/energy spikes reached callbacks.spikes.max_events=2 "
                       r"\(the last at step 6: loss = "):  # fmt: skip
        fit(tmp_path, Tiny(spike_steps={5, 6, 7}), guard)


# --------------------------------------------------------------------------- end to end, EBM
class InjectSpike(pl.Callback):
    """Records the state at every step start; at step ``at`` then multiplies the energy's final conv by 1e3."""

    def __init__(self, at: int):
        self.at = at
        self.resets = 0
        self.states, self.adams = {}, {}
        self.replay = self.after = self.adam_after = self.replay_after = self.lr_after = None

    def on_train_start(self, trainer, pl_module):
        reset = pl_module.reset_chains

        def counted():
            self.resets += 1
            reset()

        pl_module.reset_chains = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.states[step] = copy.deepcopy(pl_module.state_dict())
        self.adams[step] = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
        if step == self.at:
            self.replay = pl_module.replay.clone()
            with torch.no_grad():
                pl_module.net.body[-1].weight.mul_(1e3)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == self.at:
            self.after = copy.deepcopy(pl_module.state_dict())
            self.adam_after = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
            self.replay_after = pl_module.replay.clone()
            self.lr_after = trainer.optimizers[0].param_groups[0]["lr"]


BUILD = ebmad.train.build_callbacks


def with_callback(monkeypatch, cb):
    monkeypatch.setattr(ebmad.train, "build_callbacks", lambda cfg: [*BUILD(cfg), cb])


SPIKY = ("model.persistent=true", "model.buffer_size=64", "callbacks.spikes.warmup=3",
         "callbacks.spikes.snapshot_every=2")  # fmt: skip
RECOVER = "callbacks.spikes.policy=[restore,lower_lr,reset_buffer]"


def test_injected_ebm_spike_is_recovered(make_cfg, tmp_path, monkeypatch):
    inject = InjectSpike(at=4)
    with_callback(monkeypatch, inject)
    cfg = make_cfg(*SPIKY, *FAST, RECOVER, "trainer.max_steps=7", out=tmp_path / "r")
    res = run(cfg)
    rows = read_rows(tmp_path / "r" / "spikes.csv")
    assert {r["step"] for r in rows} == {"4"} and "energy_mag" in {r["quantity"] for r in rows}
    # the state after the event is the snapshot: the one taken at the start of step 2 (snapshot_every=2;
    # the one of step 4 was a candidate only, dropped because step 4 spiked)
    assert rows[0]["actions"] == "restore@2;skip;lower_lr=5e-05;reset_buffer"
    for k, v in inject.states[2].items():  # (NaN: thresholds not fitted yet)
        torch.testing.assert_close(v, inject.after[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert same_adam_state(inject.adams[2], inject.adam_after) and int(inject.adam_after[0]["step"]) == 2
    assert inject.lr_after == pytest.approx(0.5e-4) and inject.resets == 1
    assert (inject.replay_after == inject.replay).all(
        dim=(1, 2, 3)
    ).float().mean() < 0.1  # all chains redrawn
    ckpt = ckpt_state(tmp_path / "r" / "checkpoints" / "last.ckpt")
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.5e-4)  # kept when resuming
    assert ckpt["callbacks"]["SpikeGuard"]["n_events"] == 1
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["status"] == "completed" and res["global_step"] == 7
    assert math.isfinite(saved["image_auroc"]) and math.isfinite(saved["pixel_auroc"])


def test_injected_ebm_spike_is_only_logged_by_default(make_cfg, tmp_path, monkeypatch):
    inject = InjectSpike(at=4)
    with_callback(monkeypatch, inject)
    run(make_cfg(*SPIKY, "test=false", "trainer.max_steps=5", out=tmp_path / "l"))
    rows = read_rows(tmp_path / "l" / "spikes.csv")
    assert [r["step"] for r in rows] == ["4", "4"] and {r["actions"] for r in rows} == {"log"}
    key = f"net.body.{_last_conv(inject.after)}.weight"
    assert inject.after[key].abs().max() > 100 * inject.states[4][key].abs().max()  # the spike stayed
    assert not same_adam_state(inject.adams[4], inject.adam_after)  # the step was applied
    assert inject.lr_after == pytest.approx(1e-4) and inject.resets == 0


def _last_conv(state):
    return max(int(k.split(".")[2]) for k in state if k.startswith("net.body.") and k.endswith(".weight"))


def test_resume_is_exact_with_a_spike_and_recovery(make_cfg, tmp_path, monkeypatch):
    """Stopped at step 2, resumed to 6 (a spike at 4, restored) = run to 6 at once; windows restored too."""
    common = (*SPIKY, RECOVER, "test=false")
    for name, extra in (("full", ["trainer.max_steps=6"]), ("part", ["trainer.max_steps=2"])):
        with_callback(monkeypatch, InjectSpike(at=4))
        run(make_cfg(*common, *extra, out=tmp_path / name))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert ckpt_state(part)["callbacks"]["SpikeGuard"]["detector"]["accepted"] == 2
    with_callback(monkeypatch, InjectSpike(at=4))
    run(make_cfg(*common, "trainer.max_steps=6", f"ckpt_path={part}", out=tmp_path / "resumed"))
    a = ckpt_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = ckpt_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert_same_training_state(a, b)
    assert a["callbacks"]["SpikeGuard"] == b["callbacks"]["SpikeGuard"]
    assert a["callbacks"]["SpikeGuard"]["n_events"] == 1
    full, resumed = (
        read_rows(tmp_path / "full" / "spikes.csv"),
        read_rows(tmp_path / "resumed" / "spikes.csv"),
    )
    assert full == resumed and {r["step"] for r in full} == {"4"}
