"""What every ebmad model gives: a pixel anomaly map and an image score per test image.

A method subclasses :class:`AnomalyModule` and implements :meth:`AnomalyModule.score`, which returns
named image scores (B,) and named pixel maps (B, H, W) for a batch of images in [-1, 1]. One of each
is the method's headline (``DEFAULT_IMAGE_SCORE`` / ``DEFAULT_PIXEL_MAP``); the others are extras
(the EBM's energy and raw/standardized L1/L2 maps). Testing, metrics, example maps, validation and
per-step random numbers are shared here, so data, outputs, sweeps and the report stay model-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import CatMetric

from ebmad.evaluation.aupro import aupro
from ebmad.evaluation.metrics import PixelAUROC, average_precision, image_auroc
from ebmad.evaluation.thresholds import (
    THREE_SIGMA_QUANTILE,
    false_alarm_estimate,
    false_alarm_threshold,
    quantile_threshold,
)
from ebmad.reliability.guards import check_finite_scores

ReduceSum = Callable[[torch.Tensor], torch.Tensor]
Scores = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


class AnomalyModule(pl.LightningModule):
    """Base LightningModule of every method. Subclasses set the class attributes and ``score``.

    Subclass ``__init__`` calls ``self.save_hyperparameters()`` (with ``seed``, ``image_size``,
    ``in_channels``, ``pixel_auroc_thresholds`` and ``n_examples`` among its arguments) and then
    :meth:`_init_base`.
    """

    MODEL_TYPE: ClassVar[str] = ""
    IMAGE_SCORES: ClassVar[tuple[str, ...]] = ()
    PIXEL_MAPS: ClassVar[tuple[str, ...]] = ()
    DEFAULT_IMAGE_SCORE: ClassVar[str] = ""
    DEFAULT_PIXEL_MAP: ClassVar[str] = ""
    NEEDS_INPUT_GRAD: ClassVar[bool] = False  # scoring uses autograd: no torch.inference_mode
    FIT_ONLY: ClassVar[bool] = False  # no training steps: fit_statistics is the whole fit (PatchCore, PaDiM)
    DIVERGENCE_HINT: ClassVar[str] = "lower model.lr"  # appended to the error when training diverges

    def _init_base(self) -> None:
        assert self.DEFAULT_IMAGE_SCORE in self.IMAGE_SCORES and self.DEFAULT_PIXEL_MAP in self.PIXEL_MAPS
        t = self.hparams.get("pixel_auroc_thresholds")
        self.pixel_auroc = nn.ModuleDict({k: PixelAUROC(thresholds=t) for k in self.PIXEL_MAPS})
        self.image_scores = nn.ModuleDict({k: CatMetric() for k in (*self.IMAGE_SCORES, "label", "index")})
        self.test_maps = nn.ModuleDict(
            {k: CatMetric() for k in ("map", "mask")}
        )  # the default map, for AUPRO & co
        # label-free decision thresholds on the default image score / pixel map (NaN: not fitted)
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.threshold_fit: dict[str, Any] = {}  # how the image threshold was fitted (in the checkpoint)
        self.test_results: dict[str, Any] = {}
        self.examples: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ method API
    def score(self, x: torch.Tensor) -> Scores:
        """Image scores {name: (B,)} and pixel maps {name: (B, H, W)} for images (B, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    def scorer(self) -> nn.Module:
        """A plain module x -> (pixel map, image score[, extras]) for export (no Lightning inside)."""
        raise NotImplementedError(f"{type(self).__name__} has no exportable scorer")

    def fit_statistics(self, batches: Iterable[dict[str, torch.Tensor]], reduce_sum: ReduceSum | None = None
                       ) -> dict[str, Any]:  # fmt: skip
        """Fit whatever scoring needs from the training images after training (default: nothing).

        Returns what to save beside the checkpoint (``stats_file``), or an empty dict.
        """
        return {}

    def leave_out_scores(self, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """Default image scores (N,) of the training images, each scored by the model fitted without it
        (leave-one-out / k-fold / own patches left out); None: this method has none (the default)."""
        return None

    def fit_thresholds(self, batches: Iterable[dict[str, torch.Tensor]], false_alarm_rate: float = 0.01,
                       pixel_quantile: float = THREE_SIGMA_QUANTILE, *, held_out: bool = True,
                       train_batches: Iterable[dict[str, torch.Tensor]] | None = None, confidence: float = 0.95,
                       image_quantile: float | None = None) -> dict[str, float]:  # fmt: skip
        """Label-free decision thresholds from defect-free images only, stored as buffers.

        ``batches``: defect-free images for the pixel threshold, and for the image threshold when
        ``held_out`` (never trained on). The image threshold is fitted on out-of-sample scores: those, plus
        :meth:`leave_out_scores` of ``train_batches`` when the method has them; with neither, the scores of
        ``batches`` themselves (training images: optimistic, recorded as such). Rule:
        :func:`~ebmad.evaluation.thresholds.false_alarm_threshold` for ``false_alarm_rate`` (an order
        statistic with its expected rate and ``confidence`` bound), or the bare ``image_quantile`` when given.
        Pixel threshold: :meth:`pixel_threshold_rule` of their default maps. How the image threshold was
        fitted (sources, n, rates, warning, the pooled scores) is kept in :attr:`threshold_fit`.
        """
        scores, maps = [], []
        was_training = self.training
        self.eval()
        for i, batch in enumerate(batches):
            images, pixel_maps = self.score(batch["image"].to(self.device))
            check_finite_scores({self.DEFAULT_IMAGE_SCORE: images[self.DEFAULT_IMAGE_SCORE],
                                 self.DEFAULT_PIXEL_MAP: pixel_maps[self.DEFAULT_PIXEL_MAP]},
                                f"defect-free images for the thresholds, batch {i}")  # fmt: skip
            scores.append(images[self.DEFAULT_IMAGE_SCORE].detach().cpu())
            maps.append(pixel_maps[self.DEFAULT_PIXEL_MAP].detach().cpu())
        left_out = self.leave_out_scores(train_batches) if train_batches is not None else None
        self.train(was_training)
        if not scores:
            raise ValueError("no defect-free images to fit the thresholds on")
        pool, sources = [], []
        if held_out:
            pool.append(torch.cat(scores).double())
            sources.append({"source": "held_out", "n": len(pool[-1])})
        if left_out is not None:
            check_finite_scores({self.DEFAULT_IMAGE_SCORE: left_out}, "leave-out scores of training images")
            pool.append(left_out.detach().cpu().double().flatten())
            sources.append({"source": "leave_out", "n": len(pool[-1])})
        if not pool:  # the training images scored by the model fitted on them
            pool.append(torch.cat(scores).double())
            sources.append({"source": "training_in_sample", "n": len(pool[-1])})
        good = torch.cat(pool)
        if image_quantile is None:
            fit = false_alarm_threshold(good, false_alarm_rate, confidence)
            fit["rule"] = "false_alarm_rate"
        else:
            fit = false_alarm_estimate(good, quantile_threshold(good, image_quantile), confidence)
            fit["rule"] = f"quantile {image_quantile}"
            fit["note"] = (f"the bare {image_quantile} quantile of {len(good)} defect-free scores (no false-alarm "
                           "target; the share of them above it is not an out-of-sample estimate)")  # fmt: skip
        in_sample = sources[0]["source"] == "training_in_sample"
        if in_sample:
            fit["note"] += ("; fitted on the training images themselves (optimistic: set data.val_fraction > 0 to "
                            "hold some out)")  # fmt: skip
        self.threshold_fit = {**fit, "sources": sources, "in_sample": in_sample,
                              "scores": sorted(good.tolist())}  # fmt: skip
        self.image_threshold.fill_(fit["threshold"])
        self.pixel_threshold.fill_(self.pixel_threshold_rule(torch.cat(maps), pixel_quantile))
        return {
            "image_threshold": float(self.image_threshold),
            "pixel_threshold": float(self.pixel_threshold),
        }

    def pixel_threshold_rule(self, good_maps: torch.Tensor, quantile: float) -> float:
        """The pixel threshold from default maps of defect-free images (default: their ``quantile``)."""
        return quantile_threshold(good_maps, quantile)

    @property
    def stats_ready(self) -> bool:
        """Whether :meth:`score` can run (fitted statistics present)."""
        return True

    def adopt_fixed_parts(self, trained: AnomalyModule) -> None:
        """Take from ``trained`` (same class and settings) what training never changes and fitting would only
        recompute identically (a fitted prior): the untrained reference then need not refit it. Default: nothing."""

    def training_anomaly_kinds(self) -> tuple[str, ...]:
        """The validation anomaly kinds (:data:`ebmad.synthesis.KINDS`) this model's training also draws:
        validating it on them favours it. The model family's entry there; a model whose options decide
        overrides it."""
        from ebmad.synthesis import KINDS

        return tuple(k for k, spec in KINDS.items() if self.MODEL_TYPE in spec.trained_by)

    def map_scale(self, name: str) -> float:
        """Typical magnitude of a pixel map, used to spread scores for binned pixel AUROC."""
        return 1.0

    # -------------------------------------------------------------- shared
    def step_generator(self) -> torch.Generator:
        """RNG for one optimisation step, a pure function of (seed, step, rank): resumes exactly."""
        g = torch.Generator(device=self.device)
        g.manual_seed(((self.hparams.seed * 1_000_003 + self.global_step) * 1009 + self.global_rank) % 2**63)
        return g

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ebmad_model_type"] = self.MODEL_TYPE
        checkpoint["ebmad_threshold_fit"] = self.threshold_fit  # plain types: loads with weights_only

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for name in ("image_threshold", "pixel_threshold"):  # checkpoints written before thresholds existed
            state.setdefault(name, torch.tensor(float("nan")))
        self.threshold_fit = dict(checkpoint.get("ebmad_threshold_fit") or {})  # {}: an older checkpoint

    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Exact image and pixel AUROC of every score over labelled batches, outside the Trainer."""
        # every rank evaluates the whole (small) set itself: no cross-process sync
        pixel = {k: PixelAUROC(sync_on_compute=False).to(self.device) for k in self.PIXEL_MAPS}
        scores: dict[str, list[torch.Tensor]] = {k: [] for k in self.IMAGE_SCORES}
        labels, default_maps, masks = [], [], []
        was_training = self.training
        self.eval()
        for i, batch in enumerate(batches):
            images, maps = self.score(batch["image"])
            check_finite_scores({**images, **maps}, f"evaluation batch {i}")
            for k, m in maps.items():
                pixel[k].update(m, batch["mask"])
            for k, v in images.items():
                scores[k].append(v)
            labels.append(batch["label"])
            default_maps.append(maps[self.DEFAULT_PIXEL_MAP].detach().cpu())
            masks.append(batch["mask"].detach().cpu())
        self.train(was_training)
        lab = torch.cat(labels)
        metrics = {f"image_auroc/{k}": image_auroc(torch.cat(v), lab) for k, v in scores.items()}
        metrics.update({f"pixel_auroc/{k}": float(m.compute()) for k, m in pixel.items()})
        all_maps, all_masks = torch.cat(default_maps), torch.cat(masks)
        if all_masks.any():
            metrics["aupro"] = aupro(all_maps, all_masks)
            metrics["pixel_ap"] = average_precision(all_maps, all_masks)
        return metrics

    def on_test_start(self) -> None:
        if self.NEEDS_INPUT_GRAD and torch.is_inference_mode_enabled():
            raise RuntimeError("scoring needs gradients: set trainer.inference_mode=false")
        for m in (*self.pixel_auroc.values(), *self.image_scores.values(), *self.test_maps.values()):
            m.reset()
        self.examples = {}
        if self.hparams.get("pixel_auroc_thresholds") is not None:
            for k in self.PIXEL_MAPS:
                self.pixel_auroc[k].scale = self.map_scale(k)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images, maps = self.score(batch["image"])
        check_finite_scores({**images, **maps}, f"test batch {batch_idx}")
        target = batch["mask"].long()
        for k, m in maps.items():
            self.pixel_auroc[k].update(m, target)
        for k, v in images.items():
            self.image_scores[k].update(v)
        self.image_scores["label"].update(batch["label"].float())
        self.image_scores["index"].update(batch["index"].float())
        self.test_maps["map"].update(maps[self.DEFAULT_PIXEL_MAP].detach().float())
        self.test_maps["mask"].update(batch["mask"].float())
        self._keep_examples(batch, maps)

    def _keep_examples(self, batch: dict[str, torch.Tensor], maps: dict[str, torch.Tensor]) -> None:
        n_have = len(self.examples.get("image", ()))
        n = self.hparams.get("n_examples", 8) - n_have
        if n <= 0:
            return
        # prefer defective images, which is what a reader wants to see
        order = torch.argsort(batch["label"], descending=True, stable=True)[:n]
        new = {"image": batch["image"][order], "mask": batch["mask"][order],
               "map": maps[self.DEFAULT_PIXEL_MAP][order], "index": batch["index"][order]}  # fmt: skip
        for k, v in new.items():
            v = v.detach().cpu()
            self.examples[k] = torch.cat([self.examples[k], v]) if k in self.examples else v

    def on_test_epoch_end(self) -> None:
        cat = {k: m.compute().flatten() for k, m in self.image_scores.items()}
        labels = cat.pop("label").long()
        index = cat.pop("index").long()
        metrics: dict[str, float] = {}
        for k, v in cat.items():
            metrics[f"image_auroc/{k}"] = image_auroc(v, labels)
        for k, m in self.pixel_auroc.items():
            metrics[f"pixel_auroc/{k}"] = float(m.compute())
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, sync_dist=True)  # equal on all ranks
        order = torch.argsort(index)
        self.test_results = {
            "metrics": metrics,
            "scores": {k: v[order].cpu().tolist() for k, v in cat.items()},
            "labels": labels[order].cpu().tolist(),
            "index": index[order].cpu().tolist(),
            "maps": self.test_maps["map"].compute()[order].cpu(),  # (N, H, W), the default pixel map
            "masks": self.test_maps["mask"].compute()[order].cpu().bool(),
        }


def check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (configuration checks that name the setting)."""
    if not ok:
        raise ValueError(message)
