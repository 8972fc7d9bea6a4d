"""Progress of a run that is not on a terminal (piped, written to a file, a SLURM job): plain log lines.

A progress bar redraws one line with carriage returns; in a log file that is either nothing or a pile of
``Epoch 99/-2`` fragments. :class:`ProgressLog` instead turns the bars off there and logs, every ``every_s``
seconds of training, the step, the steps per second and the time left; in a sweep each line starts with
``job i/N`` and each job announces itself once.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import pytorch_lightning as pl

from ebmad.run.jobs import job_overrides, sweep_position

log = logging.getLogger(__name__)
WHEN = ("auto", "always", "never")


def duration(seconds: float) -> str:
    """``3h02m``, ``4m05s``, ``17s``."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def on_terminal() -> bool:
    """Whether the progress bars would be seen: stderr (where they draw) is an interactive terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class ProgressLog(pl.Callback):
    """Logs ``step i/N, x steps/s, time left`` every ``every_s`` seconds of training instead of progress bars.

    ``when``: ``auto`` (when stderr is not a terminal), ``always`` or ``never``. Active, it disables the
    Trainer's progress bar. In a multirun every job logs ``sweep job i/N: <overrides>`` once, whatever ``when``.
    """

    def __init__(self, every_s: float = 30.0, when: str = "auto") -> None:
        if when not in WHEN:
            raise ValueError(f"callbacks.progress.when must be one of {WHEN}, got {when!r}")
        if not every_s > 0:
            raise ValueError(f"callbacks.progress.every_s must be > 0 seconds, got {every_s}")
        self.every_s = float(every_s)
        self.active = when == "always" or (when == "auto" and not on_terminal())
        self.announced = False
        self.t0 = self.last = 0.0
        self.step0 = 0

    def prefix(self) -> str:
        pos = sweep_position()
        if pos is None:
            return ""
        return f"job {pos[0]}/{pos[1]}: " if pos[1] else f"job {pos[0]}: "

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.active and trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()
        pos = sweep_position()
        if pos is not None and not self.announced and trainer.is_global_zero:
            log.info("sweep %s%s", self.prefix(), " ".join(job_overrides()) or "(no overrides)")
            self.announced = True

    @staticmethod
    def total_steps(trainer: pl.Trainer) -> float:
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            return float(trainer.max_steps)
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # an iterable data loader without a length: unknown
            return math.inf

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = self.last = time.perf_counter()
        self.step0 = trainer.global_step
        if self.active and trainer.is_global_zero:
            total = self.total_steps(trainer)
            start = f" from step {self.step0}" if self.step0 else ""
            log.info("%straining %s steps%s; progress every %s", self.prefix(),
                     "?" if math.isinf(total) else int(total), start, duration(self.every_s))  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not self.active or not trainer.is_global_zero:
            return
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        log.info("%s", self.line(trainer.global_step, self.total_steps(trainer), now - self.t0))

    def line(self, step: int, total: float, elapsed: float) -> str:
        """``job 2/6: step 40/200 (20%), 1.52 steps/s, 1m45s left``."""
        done = step - self.step0
        rate = done / elapsed if elapsed > 0 else 0.0
        if math.isinf(total):
            return f"{self.prefix()}step {step}, {rate:.2f} steps/s"
        left = duration((total - step) / rate) if rate > 0 else "?"
        return f"{self.prefix()}step {step}/{int(total)} ({100 * step / total:.0f}%), {rate:.2f} steps/s, {left} left"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and trainer.is_global_zero:
            elapsed = time.perf_counter() - self.t0
            done = trainer.global_step - self.step0
            log.info("%strained %d steps in %s (%.2f steps/s); scoring follows", self.prefix(), done,
                     duration(elapsed), done / elapsed if elapsed > 0 else 0.0)  # fmt: skip
