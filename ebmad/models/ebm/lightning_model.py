"""LightningModule: contrastive-divergence training with SGLD negatives, and gradient-map scoring."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ebmad.evaluation.thresholds import three_sigma_threshold
from ebmad.guards import DEFAULT_HINT, report_values
from ebmad.models.base import AnomalyModule, ReduceSum, check
from ebmad.models.ebm.export import EBMScorer
from ebmad.models.ebm.network import EnergyNet
from ebmad.models.ebm.scoring import (
    DEFAULT_IMAGE_SCORE,
    DEFAULT_PIXEL_MAP,
    IMAGE_SCORES,
    PIXEL_MAPS,
    MomentAccumulator,
    compute_scores,
    energy_and_grad,
    pnorm,
)
from ebmad.models.ebm.sgld import frozen, sgld_sample, uniform_init

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class EBMModule(AnomalyModule):
    """An energy-based anomaly detector, p(x) proportional to exp(-E(x)).

    Training: loss = mean E(x+) - mean E(x-) + alpha * mean(E(x+)^2 + E(x-)^2), where x- are
    short-run SGLD samples started from uniform noise inside ``training_step``.
    Scoring: energy and gradient-map scores (see :mod:`ebmad.scoring`), standardized with the
    training-set statistics held in the buffers ``grad_mean`` / ``grad_std``.
    """

    MODEL_TYPE = "ebm"
    IMAGE_SCORES = IMAGE_SCORES
    PIXEL_MAPS = PIXEL_MAPS
    DEFAULT_IMAGE_SCORE = DEFAULT_IMAGE_SCORE
    DEFAULT_PIXEL_MAP = DEFAULT_PIXEL_MAP
    NEEDS_INPUT_GRAD = True
    DIVERGENCE_HINT = DEFAULT_HINT

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 128,
        base_width: int = 32,
        sgld_steps: int = 100,
        sgld_step_size: float = 1.0,
        sgld_noise: float = 0.01,
        persistent: bool = False,
        buffer_size: int = 10000,
        reinit_prob: float = 0.05,
        data_noise: float = 0.0,
        alpha: float = 0.0,
        data_range: tuple[float, float] = (-1.0, 1.0),
        optimizer: str = "adam",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        score_eps: float = 1e-6,
        pixel_auroc_thresholds: int | None = None,
        n_examples: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check(sgld_steps >= 1, f"model.sgld_steps must be >= 1, got {sgld_steps}")
        check(sgld_step_size > 0, f"model.sgld_step_size must be > 0, got {sgld_step_size}")
        check(sgld_noise >= 0, f"model.sgld_noise must be >= 0, got {sgld_noise}")
        check(data_noise >= 0, f"model.data_noise must be >= 0, got {data_noise}")
        check(alpha >= 0, f"model.alpha must be >= 0, got {alpha}")
        check(lr > 0, f"model.lr must be > 0, got {lr}")
        check(0 <= reinit_prob <= 1, f"model.reinit_prob must be in [0, 1], got {reinit_prob}")
        check(
            optimizer in OPTIMIZERS, f"model.optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}"
        )
        check(scheduler in (None, "cosine"), f"model.scheduler must be null or 'cosine', got {scheduler!r}")
        check(data_range[0] < data_range[1], f"model.data_range must be increasing, got {data_range}")
        self.save_hyperparameters()
        self.net = EnergyNet(in_channels, image_size, base_width)
        shape = (in_channels, image_size, image_size)
        self.register_buffer("grad_mean", torch.zeros(shape))
        self.register_buffer("grad_std", torch.ones(shape))
        self.register_buffer("stats_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("replay", torch.empty(0), persistent=False)
        self._init_base()

    # ------------------------------------------------------------------ energy
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Energy per image."""
        return self.net(x)

    @property
    def stats_ready(self) -> bool:
        return bool(self.stats_count > 0)

    def set_gradient_stats(self, mean: torch.Tensor, std: torch.Tensor, count: float) -> None:
        """Store fitted per-pixel, per-channel statistics (they are saved in checkpoints)."""
        self.grad_mean.copy_(mean.to(self.grad_mean))
        self.grad_std.copy_(std.to(self.grad_std))
        self.stats_count.fill_(count)

    # ---------------------------------------------------------------- training
    def negatives(self, n: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """SGLD negatives; non-persistent chains start from uniform noise every step."""
        hp = self.hparams
        full = (n, *shape)
        if hp.persistent:
            if self.replay.numel() == 0:
                self.replay = uniform_init((hp.buffer_size, *shape), hp.data_range, self.device, gen)
            idx = torch.randint(0, len(self.replay), (n,), device=self.device, generator=gen)
            x0 = self.replay[idx]
            fresh = torch.rand(n, device=self.device, generator=gen) < hp.reinit_prob
            x0[fresh] = uniform_init(full, hp.data_range, self.device, gen)[fresh]
        else:
            x0 = uniform_init(full, hp.data_range, self.device, gen)
        with frozen(self.net):
            x = sgld_sample(self.net, x0, hp.sgld_steps, hp.sgld_step_size, hp.sgld_noise, hp.data_range, gen)
        if hp.persistent:
            self.replay[idx] = x
        return x

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x_pos = batch["image"]
        gen = self.step_generator()
        if hp.data_noise > 0:
            noise = torch.randn(x_pos.shape, device=x_pos.device, dtype=x_pos.dtype, generator=gen)
            x_pos = x_pos + hp.data_noise * noise
        x_neg = self.negatives(len(x_pos), tuple(x_pos.shape[1:]), gen)
        e_pos, e_neg = self.net(x_pos), self.net(x_neg)
        report_values(self, sgld_samples=x_neg, energy_pos=e_pos, energy_neg=e_neg)
        cd = e_pos.mean() - e_neg.mean()
        loss = cd + hp.alpha * (e_pos.pow(2) + e_neg.pow(2)).mean() if hp.alpha > 0 else cd
        self.log_dict(
            {"train/loss": loss, "train/cd": cd, "train/energy_pos": e_pos.mean(), "train/energy_neg": e_neg.mean()},
            prog_bar=False, on_step=True, on_epoch=False, batch_size=len(x_pos),
        )  # fmt: skip
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(x_pos))  # fmt: skip
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        kwargs: dict[str, Any] = {"lr": hp.lr, "weight_decay": hp.weight_decay}
        if hp.optimizer in ("adam", "adamw"):
            kwargs["betas"] = tuple(hp.betas)
        opt = OPTIMIZERS[hp.optimizer](self.net.parameters(), **kwargs)
        if hp.scheduler == "cosine":
            total = self.trainer.estimated_stepping_batches
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.persistent and self.replay.numel():
            checkpoint["sgld_replay"] = self.replay.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "sgld_replay" in checkpoint:
            self.replay = checkpoint["sgld_replay"]

    def on_fit_start(self) -> None:
        if self.replay.numel():
            self.replay = self.replay.to(self.device)

    # ----------------------------------------------------------------- scoring
    def score(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Image scores (B,) and pixel maps (B, H, W) for a batch; needs fitted statistics."""
        if not self.stats_ready:
            raise RuntimeError(
                "gradient statistics are not fitted: train with the StatisticsCallback, or load a "
                "checkpoint written after fit (checkpoints/last.ckpt)"
            )
        energy, grad = energy_and_grad(self.net, x)
        return compute_scores(energy, grad, self.grad_mean, self.grad_std, self.hparams.score_eps)

    def scorer(self) -> nn.Module:
        """x -> (a_std_l2 map, A_std_l2 score, energy), input gradient written out (ONNX-exportable)."""
        return EBMScorer(self.net, self.grad_mean, self.grad_std, self.hparams.score_eps)

    def fit_statistics(self, batches: Iterable[dict[str, torch.Tensor]], reduce_sum: ReduceSum | None = None
                       ) -> dict[str, Any]:  # fmt: skip
        """Per-pixel, per-channel mean/std of g(x) over the training images (float64, summed over ranks)."""
        acc = MomentAccumulator(tuple(self.grad_mean.shape), device=self.device)
        was_training = self.training
        self.eval()
        for batch in batches:
            _, g = energy_and_grad(self.net, batch["image"].to(self.device))
            acc.update(g)
        self.train(was_training)
        if reduce_sum is not None:
            acc.all_reduce(reduce_sum)
        mean, std = acc.mean_std()
        self.set_gradient_stats(mean, std, float(acc.count))
        return {"mean": self.grad_mean.cpu(), "std": self.grad_std.cpu(), "count": float(acc.count)}

    def pixel_threshold_rule(self, good_maps: torch.Tensor, quantile: float) -> float:
        """The paper's three-sigma rule (Fig. 3) on the standardized map, at the same false-alarm rate."""
        return three_sigma_threshold(self.hparams.in_channels, norm=2)

    def map_scale(self, name: str) -> float:
        """Typical magnitude of each pixel map, from the training statistics (binned AUROC only)."""
        kind, r = name.split("_")[1], int(name[-1])
        if kind == "std":
            return self.hparams.in_channels ** (1.0 / r)
        rms = (self.grad_mean.pow(2) + self.grad_std.pow(2)).sqrt()
        return float(pnorm(rms, r, dims=(0,)).mean()) or 1.0
