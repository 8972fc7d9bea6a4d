"""Training diagnostics of the EBM: per-step CSV, sample grids and energy histograms (:class:`EBMDiagnostics`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ebmad.reliability.spikes import StepCSV

COLUMNS = ("step", "energy_pos", "energy_neg", "gap", "cd", "param_grad_norm", "sgld_grad_norm", "lr")


def to_uint8(x: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(C, H, W) image in ``data_range`` -> (H, W, C) uint8 (C = 1 or 3)."""
    lo, hi = data_range
    img = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.permute(1, 2, 0).numpy()


def sample_grid(x_pos: torch.Tensor, x_neg: torch.Tensor, n: int = 8, data_range: tuple[float, float] = (-1.0, 1.0),
                pad: int = 2) -> np.ndarray:  # fmt: skip
    """Top row: up to ``n`` positives; bottom row: as many SGLD samples. Returns (H', W', 3) uint8."""
    n = max(1, min(n, len(x_pos), len(x_neg)))
    c, h, w = x_pos.shape[1:]
    grid = np.full((2 * h + 3 * pad, n * w + (n + 1) * pad, 3), 255, dtype=np.uint8)
    for row, batch in enumerate((x_pos, x_neg)):
        for i in range(n):
            img = to_uint8(batch[i], data_range)
            y, x = pad + row * (h + pad), pad + i * (w + pad)
            grid[y : y + h, x : x + w] = img if c == 3 else np.repeat(img[..., :1], 3, axis=-1)
    return grid


def energy_histogram(e_pos: np.ndarray, e_neg: np.ndarray, path: Path, title: str = "") -> None:
    """Histogram PNG of the energies of data (E(x+)) and SGLD samples (E(x-)), shared bins (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    both = np.concatenate([e_pos, e_neg])
    both = both[np.isfinite(both)]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(e_pos[np.isfinite(e_pos)], bins=bins, alpha=0.6, label="data E(x+)")
    ax.hist(e_neg[np.isfinite(e_neg)], bins=bins, alpha=0.6, label="SGLD samples E(x-)")
    ax.set_xlabel("energy")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


class EBMDiagnostics(pl.Callback):
    """Per-step training diagnostics of an EBM; a no-op for modules without ``train_diagnostics``.

    Every step: logs ``train/param_grad_norm`` (the L2 norm over all parameter gradients, read in
    ``on_before_optimizer_step``, i.e. after unscaling and before Lightning's gradient clipping) and
    ``train/lr`` through ``pl_module.log``, and (rank 0) appends a row to ``<out_dir>/diagnostics.csv``:
    step, energy_pos, energy_neg (batch means), gap (= energy_neg - energy_pos), cd, param_grad_norm,
    sgld_grad_norm, lr. ``step`` is the 0-based optimizer step (Lightning's logged step). Rows are
    flushed as written; a resumed run drops the rows of the steps it redoes.
    Every ``every_n_steps`` steps (step % every_n_steps == 0) and at the last step: ``samples_step{N:06d}.png``
    (positives above SGLD samples) and ``energy_hist_step{N:06d}.png``, N the step; also logged to a
    WandbLogger as images ``train/samples`` and ``train/energy_hist``. E(x+), E(x-), gap and SGLD gradient norm are logged by the module itself.

    Host syncs: one small ``.tolist()`` per step on rank 0.
    """

    def __init__(self, out_dir: str, every_n_steps: int = 100, n_images: int = 8) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.diagnostics.every_n_steps must be >= 1, got {every_n_steps}")
        self.out_dir = Path(out_dir)
        self.every_n_steps = int(every_n_steps)
        self.n_images = int(n_images)
        self.csv = StepCSV(self.out_dir / "diagnostics.csv", COLUMNS)
        self._active = False
        self._grad_norm: torch.Tensor | None = None
        self._saved_step = -1
        self._last_step = -1

    @staticmethod
    def _enabled(pl_module: pl.LightningModule) -> bool:
        return isinstance(getattr(pl_module, "train_diagnostics", None), dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = self._enabled(pl_module)
        self._last_step = self._saved_step = trainer.global_step - 1
        if self._active and trainer.is_global_zero:
            self.csv.start(trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:  # fmt: skip
        self._grad_norm = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:  # fmt: skip
        if not self._active:
            return
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self._grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            pl_module.log(
                "train/param_grad_norm", self._grad_norm, on_step=True, on_epoch=False, batch_size=1
            )
        pl_module.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False,
                      batch_size=1)  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        diag = getattr(pl_module, "train_diagnostics", None)
        if not self._active or not diag or "energy_pos" not in diag or not trainer.is_global_zero:
            return
        step = trainer.global_step - 1  # the step just taken (global_step counts completed steps)
        if step == self._last_step:  # gradient accumulation: one row per optimizer step
            return
        self._last_step = step
        nan = torch.tensor(float("nan"), device=diag["energy_pos"].device)
        e_pos, e_neg = diag["energy_pos"].float().mean(), diag["energy_neg"].float().mean()
        cd = diag.get("cd", e_pos - e_neg).float()
        gn = self._grad_norm if self._grad_norm is not None else nan
        sg = diag.get("sgld_grad_norm", nan).float()
        vals = torch.stack([e_pos, e_neg, e_neg - e_pos, cd, gn.to(nan.device), sg.reshape(())]).tolist()
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan
        self.csv.write([step, *vals, lr])
        if step % self.every_n_steps == 0 or _is_last_batch(trainer, batch_idx):
            self._save_images(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # stopped otherwise than by max_steps/max_epochs (max_time, early stopping): the last step's images
        if self._active and trainer.is_global_zero and 0 <= self._last_step != self._saved_step:
            diag = getattr(pl_module, "train_diagnostics", None)
            if diag and "x_pos" in diag:
                self._save_images(trainer, pl_module, self._last_step)
        self.csv.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.csv.close()

    # ---------------------------------------------------------------------------- internals
    def _save_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        from PIL import Image

        diag = pl_module.train_diagnostics
        if "x_pos" not in diag or "x_neg" not in diag:
            return
        data_range = tuple(getattr(pl_module, "hparams", {}).get("data_range", (-1.0, 1.0)))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        grid_path = self.out_dir / f"samples_step{step:06d}.png"
        hist_path = self.out_dir / f"energy_hist_step{step:06d}.png"
        Image.fromarray(sample_grid(diag["x_pos"], diag["x_neg"], self.n_images, data_range)).save(grid_path)
        e_pos = diag["energy_pos"].detach().float().cpu().numpy().ravel()
        e_neg = diag["energy_neg"].detach().float().cpu().numpy().ravel()
        energy_histogram(e_pos, e_neg, hist_path, title=f"step {step}")
        self._saved_step = step
        for lg in trainer.loggers:
            if isinstance(lg, pl.loggers.WandbLogger):
                lg.log_image("train/samples", images=[str(grid_path)], step=step,
                             caption=["top: data, bottom: SGLD samples"])  # fmt: skip
                lg.log_image("train/energy_hist", images=[str(hist_path)], step=step)


def _is_last_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the batch just finished is the last of the fit (max_steps or max_epochs reached)."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    last_in_epoch = batch_idx + 1 >= trainer.num_training_batches
    return bool(last_in_epoch and max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1)
