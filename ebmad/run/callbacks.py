"""Callbacks: fit scoring statistics after training, log anomaly-map examples, checkpoint on preemption."""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from ebmad.data.loader import DeviceBatchLoader
from ebmad.evaluation.thresholds import THREE_SIGMA_QUANTILE
from ebmad.models.base import AnomalyModule
from ebmad.reliability.checkpointing import atomic_torch_save
from ebmad.reliability.guards import check_finite_values

log = logging.getLogger(__name__)


class StatisticsCallback(pl.Callback):
    """After fit: the model's :meth:`~ebmad.models.base.AnomalyModule.fit_statistics` on the training set.

    For the EBM these are the per-pixel, per-channel mean/std of the gradient maps. Uses the
    datamodule's ``stats_dataloader`` (every training image once, no noise); the model sums across
    ranks and stores the result as module buffers. It runs at the end of the final
    training batch and writes ``last.ckpt`` right there, so the checkpoint written after fit carries
    the statistics and still resumes exactly (Lightning's batch-end state). If training stops
    otherwise (early stopping, ``max_time``) it runs at train end instead; never after a signal or
    an exception, when training is unfinished.
    """

    def __init__(self, refit_on_test: bool = False, stats_file: str | None = None, false_alarm_rate: float = 0.01,
                 confidence: float = 0.95, image_quantile: float | None = None,
                 pixel_quantile: float = THREE_SIGMA_QUANTILE) -> None:  # fmt: skip
        for name, q in (("image_quantile", image_quantile), ("pixel_quantile", pixel_quantile)):
            if q is not None and not 0.0 < q <= 1.0:
                raise ValueError(f"callbacks.statistics.{name} must be in (0, 1], got {q}")
        for name, q in (("false_alarm_rate", false_alarm_rate), ("confidence", confidence)):
            if not 0.0 < q < 1.0:
                raise ValueError(f"thresholds.{name} must be in (0, 1), got {q}")
        self.fitted_at_step: int | None = None
        self.refit_on_test = refit_on_test
        self.stats_file = Path(stats_file) if stats_file else None
        self.false_alarm_rate = false_alarm_rate
        self.confidence = confidence
        self.image_quantile = image_quantile  # set: the bare quantile instead of the false-alarm target
        self.pixel_quantile = pixel_quantile
        self.threshold_source = ""

    @staticmethod
    def _is_final_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
        if (
            trainer.max_steps is not None
            and trainer.max_steps >= 0
            and trainer.global_step >= trainer.max_steps
        ):
            return True
        max_epochs = trainer.max_epochs
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        return bool(last_batch and max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1)

    def fit_now(self, trainer: pl.Trainer, pl_module: AnomalyModule, dm: Any) -> None:
        """The statistics and thresholds of a fit-only model (no ``trainer.fit``; one device)."""
        self._fit(trainer, pl_module, dm)

    def _fit(self, trainer: pl.Trainer, pl_module: AnomalyModule, dm: Any = None) -> None:
        dm = dm if dm is not None else trainer.datamodule
        if dm is None or not hasattr(dm, "stats_dataloader"):
            raise RuntimeError("StatisticsCallback needs a datamodule with a stats_dataloader()")

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(t, reduce_op="sum")

        with torch.no_grad():
            stats = pl_module.fit_statistics(dm.stats_dataloader(), reduce_sum)
            check_finite_values(stats, "gradient statistics")  # the run ends as diverged, naming them
            thresholds = self.fit_thresholds(pl_module, dm)
            stats.update(thresholds)
        self.fitted_at_step = trainer.global_step
        if stats and self.stats_file is not None and trainer.is_global_zero:
            self.stats_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({**stats, "world_size": trainer.world_size}, self.stats_file)

    def fit_thresholds(self, pl_module: AnomalyModule, dm: Any) -> dict[str, float]:
        """The decision thresholds (:meth:`~ebmad.models.base.AnomalyModule.fit_thresholds`) with these
        settings: held-out defect-free images, plus the method's leave-out scores of the training images."""
        good, self.threshold_source, held_out = good_images_for_thresholds(dm)
        batches = DeviceBatchLoader({"image": good}, dm.test_batch_size)
        train = DeviceBatchLoader({"image": dm.load_train()["image"]}, dm.test_batch_size)  # all, every rank
        with torch.no_grad():
            thresholds = pl_module.fit_thresholds(batches, self.false_alarm_rate, self.pixel_quantile,
                                                  held_out=held_out, train_batches=train, confidence=self.confidence,
                                                  image_quantile=self.image_quantile)  # fmt: skip
        check_finite_values(thresholds, "thresholds")
        fit = pl_module.threshold_fit
        used = " + ".join(f"{s['n']} {s['source']}" for s in fit["sources"])
        log.info("thresholds (image threshold from %s scores; pixel threshold from %s): %s", used,
                 self.threshold_source, ", ".join(f"{k}={v:.4g}" for k, v in thresholds.items()))  # fmt: skip
        (log.info if fit.get("enough", True) and not fit["in_sample"] else log.warning)("image threshold: %s",
                                                                                         fit["note"])  # fmt: skip
        return thresholds

    def _fit_and_save(self, trainer: pl.Trainer, pl_module: AnomalyModule) -> None:
        self._fit(trainer, pl_module)
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None) and getattr(cb, "save_last", False):
                path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                trainer.save_checkpoint(path)
                cb.last_model_path = str(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._is_final_batch(trainer, batch_idx):
            self._fit_and_save(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: AnomalyModule) -> None:
        if self.refit_on_test:  # e.g. a checkpoint evaluated with other training images or more ranks
            self._fit(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: AnomalyModule) -> None:
        if (
            self.fitted_at_step == trainer.global_step
            or preemption_signal(trainer) is not None
            or trainer.interrupted
            or trainer.received_sigterm
        ):
            return
        self._fit_and_save(trainer, pl_module)


def good_images_for_thresholds(dm: Any) -> tuple[torch.Tensor, str, bool]:
    """Defect-free images never trained on (``data.val_fraction`` > 0 or the layout's validation split, e.g.
    a layout's ``validation/good``), else the training images; a description; whether they are held out.

    Every rank gets all of them (no sharding), so the thresholds agree across ranks.
    """
    train = dm.load_train()["image"]
    val = getattr(dm, "val_data", None)
    if val is not None:
        good = val["image"][val["label"] == 0]
        source = (
            "data.val_fraction" if getattr(dm, "val_fraction", 0) > 0 else "the dataset's validation split"
        )
        return good, f"{len(good)} held-out defect-free images ({source})", True
    return train, f"the {len(train)} training images (set data.val_fraction > 0 to hold some out)", False


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    arr = arr.transpose(1, 2, 0)
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def _heat(m: torch.Tensor, lo: float, hi: float) -> np.ndarray:
    t = ((m.float() - lo) / max(hi - lo, 1e-12)).clamp(0, 1).numpy()
    rgb = np.stack([np.clip(1.5 - abs(4 * t - 3), 0, 1), np.clip(1.5 - abs(4 * t - 2), 0, 1),
                    np.clip(1.5 - abs(4 * t - 1), 0, 1)], axis=2)  # fmt: skip
    return (rgb * 255).round().astype(np.uint8)


def example_panels(examples: dict[str, torch.Tensor], threshold: float = float("nan"), min_size: int = 256
                   ) -> list[np.ndarray]:  # fmt: skip
    """One RGB strip per example: image | ground-truth mask | anomaly map (the model's default map).

    The map's colours run from 0 to twice the pixel ``threshold`` (fixed, so a good image looks calm and
    two maps can be compared); without a fitted threshold, from 0 to the examples' 99.9th percentile.
    Each panel is enlarged by an integer factor (nearest neighbour) to at least ``min_size`` pixels.
    """
    if not examples or not len(examples.get("image", ())):
        return []
    maps = examples["map"]
    hi = (
        2 * threshold
        if math.isfinite(threshold) and threshold > 0
        else float(torch.quantile(maps.flatten().float(), 0.999))
    )
    panels = []
    for img, mask, m in zip(examples["image"], examples["mask"], maps, strict=True):
        gt = np.repeat((mask.numpy()[..., None] * 255).astype(np.uint8), 3, axis=2)
        strip = np.concatenate([_to_rgb(img), gt, _heat(m, 0.0, hi)], axis=1)
        k = max(1, math.ceil(min_size / max(1, strip.shape[0])))
        panels.append(strip.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else strip)
    return panels


class AnomalyMapLogger(pl.Callback):
    """After test: writes example panels as PNG to ``<out>/maps`` and logs them to W&B if in use.

    The examples are the sweep report's: the first good image and the first of each defect type (then the
    next of each), ``model.n_examples`` of them, each panel at least 256 px.
    """

    def __init__(self, out_dir: str, min_size: int = 256) -> None:
        self.out_dir = Path(out_dir)
        self.min_size = min_size

    @staticmethod
    def selected_examples(trainer: pl.Trainer, pl_module: AnomalyModule
                          ) -> tuple[dict[str, torch.Tensor], list[str]]:  # fmt: skip
        """The report's example selection (good + each defect type, :mod:`ebmad.evaluation.examples`), else
        the module's own examples; returns them and their captions."""
        from ebmad.evaluation.examples import run_examples

        dm = trainer.datamodule
        if pl_module.test_results and dm is not None and getattr(dm, "test_meta", None):
            ex = run_examples(pl_module, dm, curves=False)
            images = torch.from_numpy(ex["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
            chosen = {"image": images, "mask": torch.from_numpy(ex["masks"]),
                      "map": torch.from_numpy(ex["maps"].astype(np.float32)), "index": torch.from_numpy(ex["index"])}  # fmt: skip
            names = [f"test #{i} ({d})" for i, d in zip(ex["index"].tolist(), ex["defects"], strict=True)]
            return chosen, names
        ex = pl_module.examples
        return ex, [f"test #{i}" for i in ex.get("index", torch.zeros(0)).tolist()]

    def on_test_end(self, trainer: pl.Trainer, pl_module: AnomalyModule) -> None:
        if not trainer.is_global_zero:
            return
        examples, names = self.selected_examples(trainer, pl_module)
        panels = example_panels(examples, float(pl_module.pixel_threshold), self.min_size)
        if not panels:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for i, (p, idx) in enumerate(zip(panels, examples["index"].tolist(), strict=True)):
            Image.fromarray(p).save(self.out_dir / f"example_{i:02d}_test{int(idx):04d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                logger.log_image("test/anomaly_maps", images=list(panels), caption=names)


class PreemptionCheckpoint(pl.Callback):
    """SIGTERM or SIGUSR1 (preemption): finish the batch, write ``last.ckpt``, stop training.

    The decision is shared across DDP ranks (any rank that got the signal stops all of them). The
    run is then marked interrupted; the next start of the same job resumes from the checkpoint.
    Lightning's own SIGTERM handler is replaced while training runs and restored afterwards.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.signum: int | None = None
        self.preempted = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        got = self.signum is not None
        if trainer.world_size > 1:
            got = trainer.strategy.reduce_boolean_decision(got, all=False)
        if got and not self.preempted:
            self.preempted = True
            self.signum = self.signum or int(signal.SIGTERM)
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
            trainer.should_stop = True
            log.warning("signal %s: saved %s at step %d, stopping", self.signum, self.dirpath / "last.ckpt",
                        trainer.global_step)  # fmt: skip

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def preemption_signal(trainer: pl.Trainer) -> int | None:
    """The signal that stopped training through :class:`PreemptionCheckpoint`, or None."""
    cb = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint) and c.preempted), None)
    return cb.signum if cb is not None else None
