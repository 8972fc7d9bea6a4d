"""Checkpoint selection by the label-free validation score, during training.

The validation set (``data.val_fraction`` > 0) is held-out defect-free training images and the same
images with synthetic anomalies (:mod:`ebmad.synthesis.kinds`); no test image is read. Its score is
:func:`validation_score`: the mean of the image AUROC of the model's headline image score and the pixel
AUROC of its headline pixel map (``DEFAULT_IMAGE_SCORE`` / ``DEFAULT_PIXEL_MAP``), logged as
``validation/score`` beside every ``validation/image_auroc/*`` and ``validation/pixel_auroc/*``.

:class:`ValidationCheckpoint` computes it every N training steps and writes ``best.ckpt`` when it improves.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ebmad.data.loader import DeviceBatchLoader
from ebmad.evaluation.metrics import PixelAUROC, image_auroc
from ebmad.models.base import AnomalyModule
from ebmad.reliability.guards import NonFiniteError
from ebmad.run.callbacks import StatisticsCallback

log = logging.getLogger(__name__)
SCORE_KEY = "validation/score"
SETTING = "callbacks.validation_checkpoint"


def validation_score(metrics: dict[str, float], image_score: str, pixel_map: str) -> float:
    """Mean of ``image_auroc/<image_score>`` and ``pixel_auroc/<pixel_map>`` (keys with or without the
    ``validation/`` prefix); the image AUROC alone when there is no pixel AUROC."""
    m = {k.removeprefix("validation/"): v for k, v in metrics.items()}
    img, pix = m.get(f"image_auroc/{image_score}"), m.get(f"pixel_auroc/{pixel_map}")
    if img is None:
        raise KeyError(f"no image_auroc/{image_score} among the validation metrics {sorted(m)}")
    return float(img) if pix is None else (float(img) + float(pix)) / 2


def score_validation(model: AnomalyModule, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """``validation/<metric>`` of :meth:`AnomalyModule.evaluate` and ``validation/score``."""
    metrics = {f"validation/{k}": v for k, v in model.evaluate(batches).items()}
    metrics[SCORE_KEY] = validation_score(metrics, model.DEFAULT_IMAGE_SCORE, model.DEFAULT_PIXEL_MAP)
    return metrics


def per_kind_scores(model: AnomalyModule, data: dict[str, torch.Tensor], kinds: Sequence[str], batch_size: int,
                    strengths: Sequence[float] | None = None) -> dict[str, float]:  # fmt: skip
    """``validation/<kind>/score`` per anomaly kind: the good images against that kind's images only.

    ``data`` is the validation set with a ``kind`` entry: -1 for a defect-free image, else the index into
    ``kinds`` (as :func:`ebmad.synthesis.validation_anomalies` returns it). With a ``strength`` entry (the
    index into ``strengths``, :func:`ebmad.synthesis.layout`) also ``validation/<kind>@<strength>/score``.
    Scores each image once.
    """
    if "kind" not in data:
        raise ValueError("the validation set has no 'kind' entry (built without validation anomaly kinds)")
    scores, maps = [], []
    was_training = model.training
    model.eval()
    for batch in DeviceBatchLoader(data, batch_size):
        images, pixel_maps = model.score(batch["image"])
        scores.append(images[model.DEFAULT_IMAGE_SCORE].detach().cpu())
        maps.append(pixel_maps[model.DEFAULT_PIXEL_MAP].detach().float().cpu())
    model.train(was_training)
    score, pmap = torch.cat(scores), torch.cat(maps)
    kind, label, mask = data["kind"].cpu(), data["label"].cpu(), data["mask"].cpu()
    good = kind == -1
    groups = {name: kind == i for i, name in enumerate(kinds)}
    if strengths is not None and "strength" in data:
        strength = data["strength"].cpu()
        groups.update({f"{name}@{s:g}": (kind == i) & (strength == j)
                       for i, name in enumerate(kinds) for j, s in enumerate(strengths)})  # fmt: skip
    out = {}
    for name, members in groups.items():
        if not members.any():
            continue
        sel = good | members
        pix = PixelAUROC(sync_on_compute=False)
        pix.update(pmap[sel], mask[sel])
        metrics = {f"image_auroc/{model.DEFAULT_IMAGE_SCORE}": image_auroc(score[sel], label[sel]),
                   f"pixel_auroc/{model.DEFAULT_PIXEL_MAP}": float(pix.compute())}  # fmt: skip
        out[f"validation/{name}/score"] = validation_score(
            metrics, model.DEFAULT_IMAGE_SCORE, model.DEFAULT_PIXEL_MAP
        )
    return out


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without consuming any random state (torch CPU and CUDA, NumPy, ``random``)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(py)
    np.random.set_state(npy)


class ValidationCheckpoint(pl.Callback):
    """Every ``every_n_steps`` training steps (and at the last one): fit what scoring needs on the training
    images (:meth:`~AnomalyModule.fit_statistics`), score the validation set, log the metrics (``monitor``,
    default ``validation/score``, and ``validation/best``) and write ``<dirpath>/<filename>.ckpt`` when
    ``monitor`` improves (``mode`` max or min), with the decision thresholds fitted as
    :class:`~ebmad.run.callbacks.StatisticsCallback` does, so that checkpoint can be tested as it is.

    Training is unchanged: the model's train/eval mode and every random state are as before, and the
    per-step generator is a pure function of the step. The best score and step, and the history of
    ``(step, value)``, are in the callback's state in every checkpoint, so a resumed run continues the
    selection. Place it before ``statistics`` in the callback list (the final ``last.ckpt`` then holds
    the final selection state). Every rank scores the whole validation set; rank 0 decides.
    ``every_n_steps=0`` disables it.
    """

    def __init__(self, every_n_steps: int = 0, dirpath: str | None = None, monitor: str = SCORE_KEY,
                 mode: str = "max", filename: str = "best") -> None:  # fmt: skip
        if every_n_steps < 0:
            raise ValueError(f"{SETTING}.every_n_steps must be >= 0 (0: off), got {every_n_steps}")
        if mode not in ("max", "min"):
            raise ValueError(f"{SETTING}.mode must be max or min, got {mode!r}")
        if every_n_steps and not dirpath:
            raise ValueError(f"{SETTING}.dirpath must be set when every_n_steps > 0")
        self.every_n_steps, self.monitor, self.mode = every_n_steps, monitor, mode
        self.dirpath = Path(dirpath) if dirpath else None
        self.filename = filename
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.history: list[tuple[int, float]] = []
        self._best_path = ""
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def best_model_path(self) -> str:
        """The best checkpoint's path once one was written (in a resumed run possibly the first run's
        folder), else ``""`` (as ``ModelCheckpoint``)."""
        return self._best_path

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step, "history": list(self.history),
                "monitor": self.monitor, "mode": self.mode, "last_step": self._last_step,
                "best_path": self._best_path}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_step = state_dict.get("best_step")
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self._last_step = int(state_dict.get("last_step", -1))
        self._best_path = str(state_dict.get("best_path", ""))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.every_n_steps:
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "validation_dataloader"):
            raise RuntimeError(f"{SETTING} needs a datamodule with a validation_dataloader()")
        try:
            dm.validation_dataloader()
        except ValueError as exc:
            raise ValueError(f"{SETTING}.every_n_steps={self.every_n_steps}: {exc}") from exc

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        if not self.every_n_steps or step <= 0 or step == self._last_step:
            return
        if step % self.every_n_steps and not StatisticsCallback._is_final_batch(trainer, batch_idx):
            return
        self._last_step = step
        self.validate_now(trainer, pl_module)

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_score is None:
            return True
        return value > self.best_score if self.mode == "max" else value < self.best_score

    def validate_now(self, trainer: pl.Trainer, pl_module: AnomalyModule) -> float:
        """Score the validation set now; write the best checkpoint if it improved. Returns the value."""
        dm, step = trainer.datamodule, trainer.global_step
        with preserved_rng(pl_module.device):
            was_training = pl_module.training
            with torch.no_grad():
                pl_module.fit_statistics(dm.stats_dataloader(),
                                         lambda t: trainer.strategy.reduce(t, reduce_op="sum"))  # fmt: skip
            try:
                metrics = score_validation(pl_module, dm.validation_dataloader())
            except NonFiniteError as exc:  # the model's own guards stop a diverged run; here: not the best
                log.warning("validation at step %d: %s; not a candidate for %s", step, exc, self.filename)
                metrics = {self.monitor: float("nan"), SCORE_KEY: float("nan")}
            if self.monitor not in metrics:
                raise ValueError(f"{SETTING}.monitor={self.monitor!r} is not a validation metric; "
                                 f"choose from {sorted(metrics)}")  # fmt: skip
            value = float(metrics[self.monitor])
            improved = bool(trainer.strategy.broadcast(self.improves(value), src=0))
            if improved:
                self._fit_thresholds(trainer, pl_module)
            pl_module.train(was_training)
        self.history.append((step, value))
        if improved:
            self.best_score, self.best_step = value, step
            self._best_path = str(self.dirpath / f"{self.filename}.ckpt")
        best = self.best_score if self.best_score is not None else float("nan")
        pl_module.log_dict({**metrics, "validation/best": best}, on_step=True, on_epoch=False, batch_size=1)
        log.info("validation at step %d: %s=%.4f (best %.4f at step %s)", step, self.monitor, value, best,
                 self.best_step)  # fmt: skip
        if improved:
            trainer.save_checkpoint(self.best_model_path)
        return value

    @staticmethod
    def _fit_thresholds(trainer: pl.Trainer, pl_module: AnomalyModule) -> None:
        stats_cb = next((c for c in trainer.callbacks if isinstance(c, StatisticsCallback)), None)
        (stats_cb or StatisticsCallback()).fit_thresholds(pl_module, trainer.datamodule)
