"""Energy-spike detection with a recovery policy chosen by config (:class:`SpikeGuard`).

EBM training by contrastive divergence sometimes blows up in one step: the energies jump by orders of
magnitude, and Adam's moments carry the damage on. :class:`SpikeGuard` watches a few scalars per step
with a robust z-score (:class:`RobustZScore`: median and 1.4826 * MAD of the last ``window`` accepted
steps) and, on a spike, applies the configured actions before the optimizer step:

- ``skip``: the optimizer step is not applied (every gradient set to ``None``: Adam leaves the parameters
  and its state untouched);
- ``restore``: reload the last good in-memory snapshot of the module's ``state_dict`` and of the
  optimizers' state (moments; the learning rates stay the current ones), then skip;
- ``lower_lr``: multiply every parameter group's learning rate by ``lr_factor``;
- ``reset_buffer``: ``pl_module.reset_chains()`` (the EBM's persistent SGLD replay buffer) if it exists.

With an empty policy the guard only detects and logs. Every event is logged three ways: a Python logging
line, the scalar ``train/spike`` (1 on spike steps, else 0) and a row of ``csv_path``.

Host syncs: one small ``.tolist()`` per optimization micro-batch (the monitored scalars, read in
``on_before_backward``); in multi-process runs with a non-empty policy one boolean all-reduce per step.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ebmad.reliability.guards import RECOVERED, TrainingDiverged

log = logging.getLogger(__name__)

POLICIES = ("skip", "restore", "lower_lr", "reset_buffer")
MAD_TO_STD = 1.4826  # 1.4826 * MAD estimates the standard deviation of normal data
MIN_WINDOW = 3  # fewer accepted values than this: no z-score (MAD of 1-2 values means nothing)
REL_FLOOR, ABS_FLOOR = 1e-3, 1e-8  # scale >= 1e-3 * |median| + 1e-8: a constant series is not all spikes
CSV_COLUMNS = ("step", "quantity", "value", "median", "z", "actions")
_State = tuple[dict[str, torch.Tensor], list[dict[Any, Any]]]  # module state_dict, optimizers' states
SPIKE_HINT = "lower model.lr / model.sgld_step_size, or enable model.alpha (energy regularization)"


# ----------------------------------------------------------------------------------- detector
def robust_z(window: Iterable[float], value: float) -> tuple[float, float]:
    """(median, z) of ``value`` against ``window``: z = (value - median) / (1.4826 * MAD), scale floored."""
    w = np.asarray(list(window), dtype=np.float64)
    med = float(np.median(w))
    scale = max(MAD_TO_STD * float(np.median(np.abs(w - med))), REL_FLOOR * abs(med) + ABS_FLOOR)
    return med, (value - med) / scale


@dataclass
class SpikeEvent:
    """One monitored quantity out of line at one step."""

    step: int
    quantity: str
    value: float
    median: float
    z: float


class RobustZScore:
    """Robust z-score detector over a sliding window of accepted steps.

    :meth:`update` takes one step's scalars. A value is a spike when it is not finite (always, warmup
    included) or when ``|z| > z_threshold`` after ``warmup`` accepted steps. A step with a spike on any
    quantity is not accepted: none of its values enter the windows. A spike is sporadic by nature: when
    ``patience`` consecutive steps are out of line with finite values, the level has shifted (e.g. the
    energies of unregularized contrastive divergence drifting), and the windows restart from those steps'
    values (``shifts`` counts it), so that detection goes on relative to the new level instead of flagging
    every later step.
    """

    def __init__(
        self, window: int = 100, warmup: int = 20, z_threshold: float = 8.0, patience: int = 10
    ) -> None:
        if window < MIN_WINDOW:
            raise ValueError(f"window must be >= {MIN_WINDOW}, got {window}")
        if warmup < 0 or z_threshold <= 0:
            raise ValueError(f"warmup must be >= 0 and z_threshold > 0, got {warmup}, {z_threshold}")
        self.window, self.warmup, self.z_threshold = int(window), int(warmup), float(z_threshold)
        if patience < MIN_WINDOW:
            raise ValueError(f"patience must be >= {MIN_WINDOW}, got {patience}")
        self.patience = int(patience)
        self.values: dict[str, deque[float]] = {}
        self.accepted = 0  # steps accepted so far
        self.run: list[dict[str, float]] = []  # the current run of consecutive rejected (finite) steps
        self.shifts = 0  # level shifts: windows restarted from a run of rejected steps

    def update(self, values: Mapping[str, float], step: int = -1) -> list[SpikeEvent]:
        """Check one step's values; add them to the windows when none is a spike. Returns the spikes."""
        events = []
        active = self.accepted >= self.warmup
        for name, v in values.items():
            win = self.values.setdefault(name, deque(maxlen=self.window))
            finite = math.isfinite(v)
            if len(win) >= MIN_WINDOW or (not finite and win):
                med, z = robust_z(win, v) if finite else (float(np.median(list(win))), float("nan"))
            else:
                med, z = float("nan"), float("nan")
            if not finite or (active and len(win) >= MIN_WINDOW and abs(z) > self.z_threshold):
                events.append(SpikeEvent(step, name, float(v), med, z))
        if not events:
            for name, v in values.items():
                self.values[name].append(float(v))
            self.accepted += 1
            self.run = []
        elif all(math.isfinite(v) for v in values.values()):
            self.run.append({k: float(v) for k, v in values.items()})
            if len(self.run) >= self.patience:  # not a spike but a new level: restart the windows there
                self.values = {k: deque((r[k] for r in self.run), maxlen=self.window) for k in values}
                self.run = []
                self.shifts += 1
                log.info("level shift at step %d: %s out of line for %d steps in a row; the detector's window "
                            "restarts from these values", step, ", ".join(e.quantity for e in events),
                            self.patience)  # fmt: skip
        else:
            self.run = []
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"values": {k: list(v) for k, v in self.values.items()}, "accepted": self.accepted, "run": self.run,
                "shifts": self.shifts}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = {k: deque(v, maxlen=self.window) for k, v in state.get("values", {}).items()}
        self.accepted = int(state.get("accepted", 0))
        self.run = [dict(r) for r in state.get("run", [])]
        self.shifts = int(state.get("shifts", 0))


# ---------------------------------------------------------------------------------- csv rows
class StepCSV:
    """A CSV of per-step rows that survives kills and resumes.

    Every row is flushed when written. :meth:`start` (call it once the start step is known) keeps the
    rows of earlier steps and drops those at or after ``start_step``, which a resumed run writes again:
    no duplicate steps. The file (with its header) is created at the first row.
    """

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self._fh: Any = None
        self._writer: Any = None

    def start(self, start_step: int) -> None:
        """Drop the rows of steps >= ``start_step`` (the file is created at the first row)."""
        self.close()
        if not self.path.is_file():
            return
        with open(self.path, newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if _int(r.get("step")) < start_step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, self.columns, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, self.path)

    def write(self, row: Sequence[Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.is_file() or self.path.stat().st_size == 0
            self._fh = open(self.path, "a", newline="")  # noqa: SIM115 (kept open, flushed per row)
            self._writer = csv.writer(self._fh)
            if new:
                self._writer.writerow(self.columns)
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = self._writer = None


def _int(s: str | None) -> int:
    try:
        return int(s)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 2**62  # unreadable step: dropped


# ------------------------------------------------------------------------------------ callback
class SpikeGuard(pl.Callback):
    """Detect loss/energy spikes and recover by config (automatic optimization).

    Monitored per step: with a module holding ``train_diagnostics`` (the EBM) ``cd`` (mean E+ - mean E-)
    and ``energy_mag`` (the mean of mean |E+| and mean |E-|); otherwise the loss given to
    ``on_before_backward`` (unscaled under fp16). Actions run in ``on_before_optimizer_step`` (before
    gradient clipping), in the order restore, skip, lower_lr, reset_buffer.

    Args:
        policy: actions on a spike, a subset of ``("skip", "restore", "lower_lr", "reset_buffer")``;
            ``None``: ``["skip"]``; empty: detect and log only (never act, never raise).
        z_threshold: a spike is ``|z| > z_threshold`` (or a non-finite value).
        window: accepted steps the median/MAD are taken over.
        warmup: accepted steps before the z-test starts (non-finite values are spikes from the start).
        snapshot_every: ``restore`` snapshot refresh period in steps. A refresh copies the state at the
            start of a step (module ``state_dict``: weights, EMA, buffers; optimizer moments) and keeps
            it only if that step shows no spike (weights broken by the previous update are not kept);
            a period with a spike keeps the older snapshot. Snapshots live on the state's device, only
            with ``restore`` in the policy; a run's first one is taken at train start. The SGLD replay
            buffer is not part of it (``reset_buffer`` redraws it).
        lr_factor: ``lower_lr`` multiplier.
        max_events: with a non-empty policy, the spike count at which :class:`TrainingDiverged` is raised
            (``None`` or 0: never).
        csv_path: events file (rank 0 appends), columns step, quantity, value, median, z, actions.

    Resume: :meth:`state_dict` holds the windows and counters (not the snapshot): a resumed run detects
    exactly as an uninterrupted one. Its first snapshot is the resumed state, so with ``restore`` a resume
    is bit-exact when it starts at a multiple of ``snapshot_every`` (e.g. the periodic checkpoints), or
    when no restore happens before the next refresh.

    With a :class:`~ebmad.reliability.guards.NonFiniteGuard` after this guard in the callback list (the default order),
    a skipped step's gradients are gone when it checks them (a finite spike with overflowing gradients is
    recovered), but a NaN/inf loss or energy still stops the run (the guard flags it before backward):
    recovering from those needs ``callbacks.nonfinite=null``.
    """

    def __init__(self, policy: Sequence[str] | None = None, z_threshold: float = 8.0, window: int = 100,
                 warmup: int = 20, snapshot_every: int = 50, lr_factor: float = 0.5, max_events: int | None = 50,
                 csv_path: str | None = None, patience: int = 10) -> None:  # fmt: skip
        policy = ["skip"] if policy is None else [str(p) for p in policy]
        bad = [p for p in policy if p not in POLICIES]
        if bad:
            raise ValueError(f"callbacks.spikes.policy: unknown actions {bad}; choose from {list(POLICIES)}")
        if snapshot_every < 1:
            raise ValueError(f"callbacks.spikes.snapshot_every must be >= 1, got {snapshot_every}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"callbacks.spikes.lr_factor must be in (0, 1], got {lr_factor}")
        if max_events is not None and max_events < 0:
            raise ValueError(f"callbacks.spikes.max_events must be >= 0 or null, got {max_events}")
        self.policy = policy
        self.detector = RobustZScore(window, warmup, z_threshold, patience)
        self.snapshot_every = int(snapshot_every)
        self.lr_factor = float(lr_factor)
        self.max_events = max_events or None
        self.csv = StepCSV(csv_path, CSV_COLUMNS) if csv_path else None
        self.n_events = 0  # steps with a spike
        self.last_event: SpikeEvent | None = None
        self.snapshot_step: int | None = None
        self._spike_since_snapshot = False
        self._snapshot: _State | None = None
        self._candidate: tuple[int, _State] | None = None  # (step, state) taken at the start of that step
        self._pending: list[SpikeEvent] = []  # this step's events (several micro-batches: accumulated)
        self._spike = False  # the last finished step was a spike
        self._handled = -1  # global step whose actions ran
        self._refresh_checked = -1  # global step whose snapshot refresh was decided

    @property
    def skips(self) -> bool:
        return "skip" in self.policy or "restore" in self.policy

    # ----------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.csv is not None and trainer.is_global_zero:
            self.csv.start(trainer.global_step)
        if "restore" in self.policy:
            self._snapshot, self.snapshot_step = self._copy_state(trainer, pl_module), trainer.global_step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
                           ) -> None:  # fmt: skip
        names, tensors = zip(*self.monitored(trainer, pl_module, loss).items(), strict=True)
        values = torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()  # the host sync
        self._pending += self.detector.update(dict(zip(names, values, strict=True)), trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:  # fmt: skip
        if self._handled != trainer.global_step:
            self._handled = trainer.global_step
            self._finish_step(trainer, pl_module)
        if self._spike and self.skips:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:  # fmt: skip
        # snapshots at batch start: the state after the previous step, the module's batch-end work (EMA) included
        step = trainer.global_step
        if "restore" in self.policy and step % self.snapshot_every == 0 and step != self._refresh_checked:
            self._refresh_checked = step  # once per step (gradient accumulation: several batches)
            if self._spike_since_snapshot:  # a spike in this period: keep the older snapshot
                self._spike_since_snapshot = False
            elif step != self.snapshot_step:  # a candidate: it becomes the snapshot if this step is no spike
                self._candidate = (step, self._copy_state(trainer, pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        pl_module.log("train/spike", float(self._spike), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.csv is not None:
            self.csv.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.csv is not None:
            self.csv.close()

    def state_dict(self) -> dict[str, Any]:
        last = self.last_event
        return {"detector": self.detector.state_dict(), "n_events": self.n_events,
                "last_event": None if last is None else vars(last).copy(),
                "spike_since_snapshot": self._spike_since_snapshot}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self.n_events = int(state_dict.get("n_events", 0))
        last = state_dict.get("last_event")
        self.last_event = SpikeEvent(**last) if last else None
        self._spike_since_snapshot = bool(state_dict.get("spike_since_snapshot", False))

    # ---------------------------------------------------------------------------- internals
    def monitored(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
                  ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The scalars checked this step (0-dim tensors, still on the device)."""
        diag = getattr(pl_module, "train_diagnostics", None) or {}
        if all(k in diag for k in ("cd", "energy_pos", "energy_neg")):
            mag = 0.5 * (diag["energy_pos"].abs().mean() + diag["energy_neg"].abs().mean())
            return {"cd": diag["cd"], "energy_mag": mag}
        loss = loss.detach()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # the loss given here is scaled
            loss = loss / scaler._get_scale_async()
        return {"loss": loss}

    def _finish_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        events, self._pending = self._pending, []
        spike = bool(events)
        if self.policy and trainer.world_size > 1:  # every rank acts alike
            spike = bool(trainer.strategy.reduce_boolean_decision(spike, all=False))
        self._spike = spike
        if self._candidate is not None and self._candidate[0] == trainer.global_step:
            if not spike:  # the weights taken at this step's start gave no spike: the new snapshot
                self._snapshot, self.snapshot_step = self._candidate[1], self._candidate[0]
            self._candidate = None
        if not spike:
            return
        self.n_events += 1
        self._spike_since_snapshot = True
        actions = self._act(trainer, pl_module) if self.policy else ["log"]
        if self.skips:  # the non-finite guard does not hold this step's values against the run
            setattr(pl_module, RECOVERED, trainer.global_step)
        step = trainer.global_step
        events = events or [SpikeEvent(step, "another process", float("nan"), float("nan"), float("nan"))]
        self.last_event = events[-1]
        for e in events:
            # a warning when something is done about it or the value is not finite; with the default
            # detect-and-log policy a finite outlier is a logged fact (spikes.csv, train/spike): the energy of an
            # EBM rises in steps early in training, and a first run should not read as failing
            say = log.warning if self.policy or not math.isfinite(e.value) else log.info
            say("spike at step %d: %s = %.6g (median %.6g, z = %.3g); actions: %s", e.step, e.quantity,
                e.value, e.median, e.z, ", ".join(actions))  # fmt: skip
            if self.csv is not None and trainer.is_global_zero:
                self.csv.write([e.step, e.quantity, e.value, e.median, e.z, ";".join(actions)])
        if self.policy and self.max_events and self.n_events >= self.max_events:
            e = self.last_event
            raise TrainingDiverged(
                f"training unstable: {self.n_events} loss/energy spikes reached callbacks.spikes.max_events="
                f"{self.max_events} (the last at step {e.step}: {e.quantity} = {e.value:.6g}, median "
                f"{e.median:.6g}, z = {e.z:.3g}); the recovery policy {self.policy} cannot save this "
                f"training: {getattr(pl_module, 'DIVERGENCE_HINT', None) or SPIKE_HINT}"
            )

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        done = []
        if "restore" in self.policy and self._snapshot is not None:
            self._restore(trainer, pl_module)
            done.append(f"restore@{self.snapshot_step}")
        if self.skips:
            done.append("skip")
        if "lower_lr" in self.policy:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * self.lr_factor
            lrs = [float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
            done.append(f"lower_lr={lrs[0]:.3g}" if lrs else "lower_lr")
        if "reset_buffer" in self.policy:
            reset = getattr(pl_module, "reset_chains", None)
            if callable(reset):
                reset()
                done.append("reset_buffer")
        return done

    @staticmethod
    def _copy_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> _State:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        moments = [copy.deepcopy(opt.state_dict()["state"]) for opt in trainer.optimizers]
        return weights, moments

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Weights and optimizer moments of the snapshot; the learning rates stay the current ones."""
        weights, moments = self._snapshot  # type: ignore[misc]
        pl_module.load_state_dict(weights)  # copies into the parameters: the optimizers keep them
        for opt, state in zip(trainer.optimizers, moments, strict=True):
            # load_state_dict aliases same-device tensors: a copy, so the snapshot stays intact
            opt.load_state_dict(
                {"state": copy.deepcopy(state), "param_groups": opt.state_dict()["param_groups"]}
            )
