"""LightningModule: contrastive-divergence training with SGLD negatives, and gradient-map scoring."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ebmad.evaluation.thresholds import three_sigma_threshold
from ebmad.models.base import AnomalyModule, ReduceSum, check
from ebmad.models.ebm import outlier
from ebmad.models.ebm.export import EBMScorer
from ebmad.models.ebm.network import EnergyNet, apply_spectral_norm
from ebmad.models.ebm.scoring import (
    DEFAULT_IMAGE_SCORE,
    DEFAULT_PIXEL_MAP,
    IMAGE_SCORES,
    PIXEL_MAPS,
    MomentAccumulator,
    combine_maps,
    compute_scores,
    energy_and_grad,
    instance_normalize,
    pnorm,
)
from ebmad.models.ebm.sgld import frozen, sgld_sample, uniform_init
from ebmad.reliability.guards import DEFAULT_HINT, report_values
from ebmad.synthesis.perlin_anomalies import synthesize
from ebmad.synthesis.textures import BatchImages, TextureSource, texture_source

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
INPUT_NORMS = ("none", "instance")
CHAIN_INITS = ("uniform", "data")


class EBMModule(AnomalyModule):
    """An energy-based anomaly detector, p(x) proportional to exp(-E(x)).

    Training: loss = mean E(x+) - mean E(x-) + alpha * mean(E(x+)^2 + E(x-)^2), where x- are
    short-run SGLD samples started from uniform noise inside ``training_step``.
    Scoring: energy and gradient-map scores (see :mod:`ebmad.scoring`), standardized with the
    training-set statistics held in the buffers ``grad_mean`` / ``grad_std``.

    Options beyond the paper (all off by default, each keeps the paper's behaviour when off):
    stabilizers ``spectral_norm``, ``ema_decay`` (scoring with an EMA of the weights), SGLD schedules along
    the chain (``sgld_step_size_end`` / ``sgld_noise_end``), augmentation of positives (``aug_hflip``,
    ``aug_vflip``, ``aug_brightness``), ``input_norm=instance`` (per-image standardization: a global
    brightness change leaves energy and maps unchanged), and scoring options ``score_noise_samples`` /
    ``score_noise_std`` (gradients averaged over fixed input noise), ``map_sigmas`` (multi-scale map
    ``a_ms``), ``patch_energy`` (``E_patch_max``), ``default_image_score`` / ``default_pixel_map``, and
    ``stats_gains`` (the gradient statistics fitted over brightness-changed copies of the training images).

    Energy against synthetic anomalies (:mod:`.outlier`, off while ``oe_weight`` is 0): the loss adds
    ``oe_weight`` times Liu et al.'s squared-hinge margin loss on DRAEM-style anomalies planted into the
    positives, per patch of the patch-energy head (``oe_level=patch``), per image, or both; ``combo_map`` adds
    the map ``a_combo`` (standardized ``a_ms`` + standardized ``e_patch``) and its maximum ``A_combo_max``.
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
        sgld_step_size_end: float | None = None,
        sgld_noise_end: float | None = None,
        spectral_norm: bool = False,
        ema_decay: float | None = None,
        aug_hflip: float = 0.0,
        aug_vflip: float = 0.0,
        aug_brightness: float = 0.0,
        input_norm: str = "none",
        score_noise_samples: int = 0,
        score_noise_std: float = 0.0,
        map_sigmas: list[float] | None = None,
        patch_energy: bool = False,
        default_image_score: str | None = None,
        default_pixel_map: str | None = None,
        chain_init: str = "uniform",
        chain_init_noise: float = 0.3,
        stats_gains: list[float] | None = None,
        oe_weight: float = 0.0,
        oe_level: str = "patch",
        oe_margin_in: float = -1.0,
        oe_margin_out: float = 1.0,
        oe_source: str = "texture",
        oe_source_dir: str | None = None,
        oe_patch_cover: float = 0.1,
        combo_map: bool = False,
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
        check(
            ema_decay is None or 0 < ema_decay < 1,
            f"model.ema_decay must be null or in (0, 1), got {ema_decay}",
        )
        for name, v in (
            ("aug_hflip", aug_hflip),
            ("aug_vflip", aug_vflip),
            ("aug_brightness", aug_brightness),
        ):
            check(0 <= v <= 1, f"model.{name} must be in [0, 1], got {v}")
        check(chain_init in CHAIN_INITS, f"model.chain_init must be one of {CHAIN_INITS}, got {chain_init!r}")
        check(not stats_gains or all(0 < float(g) <= 2 for g in stats_gains),
              f"model.stats_gains must be gains in (0, 2], got {stats_gains}")  # fmt: skip
        check(chain_init_noise >= 0, f"model.chain_init_noise must be >= 0, got {chain_init_noise}")
        check(input_norm in INPUT_NORMS, f"model.input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        check(score_noise_samples >= 0 and score_noise_std >= 0,
              "model.score_noise_samples and model.score_noise_std must be >= 0")  # fmt: skip
        check((score_noise_samples > 0) == (score_noise_std > 0),
              "set both model.score_noise_samples > 0 and model.score_noise_std > 0, or neither")  # fmt: skip
        check(not map_sigmas or all(0 <= float(v) and math.ceil(3 * float(v)) < image_size for v in map_sigmas),
              f"model.map_sigmas must be sigmas >= 0 with 3 sigma < model.image_size ({image_size}), got {map_sigmas}")  # fmt: skip
        check(oe_weight >= 0, f"model.oe_weight must be >= 0 (0: off), got {oe_weight}")
        check(oe_level in outlier.LEVELS, f"model.oe_level must be one of {outlier.LEVELS}, got {oe_level!r}")
        check(
            oe_source in outlier.SOURCES,
            f"model.oe_source must be one of {outlier.SOURCES}, got {oe_source!r}",
        )
        check(oe_margin_in < oe_margin_out,
              f"model.oe_margin_in ({oe_margin_in}) must be below model.oe_margin_out ({oe_margin_out})")  # fmt: skip
        check(0 < oe_patch_cover <= 1, f"model.oe_patch_cover must be in (0, 1], got {oe_patch_cover}")
        check(not combo_map or (patch_energy and map_sigmas),
              "model.combo_map needs model.patch_energy=true and model.map_sigmas (it combines e_patch and a_ms)")  # fmt: skip
        self.save_hyperparameters()
        self.net = EnergyNet(in_channels, image_size, base_width)
        if spectral_norm:
            apply_spectral_norm(self.net)
        self.net_ema = None
        if ema_decay is not None:
            self.net_ema = copy.deepcopy(self.net).requires_grad_(False)
        shape = (in_channels, image_size, image_size)
        self.register_buffer("grad_mean", torch.zeros(shape))
        self.register_buffer("grad_std", torch.ones(shape))
        self.register_buffer("stats_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("replay", torch.empty(0), persistent=False)
        if score_noise_samples > 0:  # fixed noise: scores are deterministic, and exportable
            gen = torch.Generator().manual_seed(int(seed) + 7919)
            self.register_buffer("score_noise", score_noise_std * torch.randn((score_noise_samples, *shape),
                                                                              generator=gen))  # fmt: skip
        if patch_energy:
            side = 4  # the head's input is always 4x4 (see network.stage_widths)
            self.register_buffer("patch_mean", torch.zeros(side, side))
            self.register_buffer("patch_std", torch.ones(side, side))
        if combo_map:  # mean / std over training pixels of a_ms (row 0) and e_patch (row 1)
            self.register_buffer("combo_stats", torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        self.IMAGE_SCORES = (
            IMAGE_SCORES + (("A_ms_max",) if map_sigmas else ()) + (("E_patch_max",) if patch_energy else ())
            + (("A_combo_max",) if combo_map else ())
        )  # fmt: skip
        self.PIXEL_MAPS = (
            PIXEL_MAPS + (("a_ms",) if map_sigmas else ()) + (("e_patch",) if patch_energy else ())
            + (("a_combo",) if combo_map else ())
        )  # fmt: skip
        self.oe_textures: TextureSource | None = None  # built when training starts
        self.DEFAULT_IMAGE_SCORE = default_image_score or DEFAULT_IMAGE_SCORE
        self.DEFAULT_PIXEL_MAP = default_pixel_map or DEFAULT_PIXEL_MAP
        check(self.DEFAULT_IMAGE_SCORE in self.IMAGE_SCORES,
              f"model.default_image_score must be one of {self.IMAGE_SCORES} (with these options), "
              f"got {default_image_score!r}")  # fmt: skip
        check(
            self.DEFAULT_PIXEL_MAP in self.PIXEL_MAPS,
            f"model.default_pixel_map must be one of {self.PIXEL_MAPS} (with these options), got {default_pixel_map!r}",
        )
        self.train_diagnostics: dict[str, torch.Tensor] = {}
        self._init_base()

    # ------------------------------------------------------------------ energy
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Energy per image (of the training network; scoring uses :attr:`scoring_net`)."""
        return self.net(self.normalize(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input: x itself, or with ``input_norm=instance`` x standardized per image."""
        return instance_normalize(x) if self.hparams.get("input_norm", "none") == "instance" else x

    @property
    def scoring_net(self) -> EnergyNet:
        """The network that scores: the EMA of the weights when ``ema_decay`` is set, else the trained one."""
        return self.net_ema if self.net_ema is not None else self.net

    def gradient(self, x: torch.Tensor, net: EnergyNet | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """(E (B,), g = d log p/du (B, C, H, W), patch energies (B, 4, 4) or None) at u = normalize(x).

        With ``score_noise_samples`` the three are means over the fixed noisy copies x + noise_i.
        """
        net = net if net is not None else self.scoring_net
        b = len(x)
        noise = getattr(self, "score_noise", None)
        if noise is not None:
            x = (x[:, None] + noise[None].to(x)).flatten(0, 1)
        feats: list[torch.Tensor] = []

        def energy(u: torch.Tensor) -> torch.Tensor:
            h = net.features(u)
            feats.append(h)
            return net.head(h)

        e, g = energy_and_grad(energy, self.normalize(x))
        patch = (
            net.patch_contributions(feats[0].detach()).detach() if self.hparams.get("patch_energy") else None
        )
        if noise is not None:
            n = len(noise)
            e, g = e.view(b, n).mean(1), g.view(b, n, *g.shape[1:]).mean(1)
            patch = patch.view(b, n, *patch.shape[1:]).mean(1) if patch is not None else None
        return e, g, patch

    @property
    def stats_ready(self) -> bool:
        return bool(self.stats_count > 0)

    def set_gradient_stats(self, mean: torch.Tensor, std: torch.Tensor, count: float) -> None:
        """Store fitted per-pixel, per-channel statistics (they are saved in checkpoints)."""
        self.grad_mean.copy_(mean.to(self.grad_mean))
        self.grad_std.copy_(std.to(self.grad_std))
        self.stats_count.fill_(count)

    # ---------------------------------------------------------------- training
    def reset_chains(self) -> None:
        """Reinitialize every persistent chain from uniform noise (a spike-recovery action)."""
        if self.replay.numel():
            gen = self.step_generator()
            gen.manual_seed(gen.initial_seed() ^ 0x5EED)  # not the stream this step's chains used
            self.replay = uniform_init(tuple(self.replay.shape), self.hparams.data_range, self.device, gen)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random flips and a global brightness gain of the positives (options ``aug_*``)."""
        hp = self.hparams
        n, dev = len(x), x.device
        if hp.get("aug_hflip", 0) > 0:
            flip = torch.rand(n, device=dev, generator=gen) < hp.aug_hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if hp.get("aug_vflip", 0) > 0:
            flip = torch.rand(n, device=dev, generator=gen) < hp.aug_vflip
            x = torch.where(flip[:, None, None, None], x.flip(-2), x)
        if hp.get("aug_brightness", 0) > 0:  # gain on [0, 1] intensities, U[1 - b, 1 + b] per image
            lo, hi = hp.data_range
            gain = 1 + hp.aug_brightness * (2 * torch.rand(n, 1, 1, 1, device=dev, generator=gen) - 1)
            x = (((x - lo) / (hi - lo) * gain).clamp(0, 1) * (hi - lo) + lo).to(x.dtype)
        return x

    def chain_starts(self, data: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Fresh chain starts: uniform noise (the paper), or with ``chain_init=data`` the positives plus
        Gaussian noise of std ``chain_init_noise`` (contrastive divergence from the data, Hinton 2002)."""
        hp = self.hparams
        if hp.get("chain_init", "uniform") == "data":
            noise = torch.randn(data.shape, device=data.device, dtype=data.dtype, generator=gen)
            return (data + hp.chain_init_noise * noise).clamp(*hp.data_range)
        return uniform_init(tuple(data.shape), hp.data_range, self.device, gen)

    def negatives(self, data: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """SGLD negatives for the positives ``data``: non-persistent chains start fresh every step
        (:meth:`chain_starts`); persistent ones continue from the replay buffer, ``reinit_prob`` of them fresh."""
        hp = self.hparams
        n, shape = len(data), tuple(data.shape[1:])
        if hp.persistent:
            if self.replay.numel() == 0:
                self.replay = uniform_init((hp.buffer_size, *shape), hp.data_range, self.device, gen)
            if n > len(self.replay):
                raise ValueError(f"model.buffer_size ({len(self.replay)}) must be >= the batch size ({n})")
            # distinct slots: with repeats, which chain a repeated slot keeps would depend on thread scheduling
            idx = torch.randperm(len(self.replay), device=self.device, generator=gen)[:n]
            x0 = self.replay[idx]
            fresh = torch.rand(n, device=self.device, generator=gen) < hp.reinit_prob
            x0[fresh] = self.chain_starts(data, gen)[fresh]
        else:
            x0 = self.chain_starts(data, gen)
        stats: dict[str, torch.Tensor] = {}
        with frozen(self.net):
            x = sgld_sample(self, x0, hp.sgld_steps, hp.sgld_step_size, hp.sgld_noise, hp.data_range, gen,
                            step_size_end=hp.get("sgld_step_size_end"), noise_std_end=hp.get("sgld_noise_end"),
                            stats=stats)  # fmt: skip
        self.train_diagnostics["sgld_grad_norm"] = stats["grad_norm"]
        if hp.persistent:
            self.replay[idx] = x
        return x

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x_pos = batch["image"]
        gen = self.step_generator()
        x_pos = self.augment(x_pos, gen)
        if hp.data_noise > 0:
            noise = torch.randn(x_pos.shape, device=x_pos.device, dtype=x_pos.dtype, generator=gen)
            x_pos = x_pos + hp.data_noise * noise
        x_neg = self.negatives(x_pos, gen)
        oe_weight = hp.get("oe_weight", 0.0)
        if oe_weight > 0:  # the positives' energy through the features, for the patch energies
            h_pos = self.net.features(self.normalize(x_pos))
            e_pos, e_neg = self.net.head(h_pos), self(x_neg)
        else:
            e_pos, e_neg = self(x_pos), self(x_neg)
        report_values(self, sgld_samples=x_neg, energy_pos=e_pos, energy_neg=e_neg)
        cd = e_pos.mean() - e_neg.mean()
        loss = cd + hp.alpha * (e_pos.pow(2) + e_neg.pow(2)).mean() if hp.alpha > 0 else cd
        if oe_weight > 0:
            oe = self.margin_loss(x_pos, h_pos, e_pos, gen)
            self.log("train/oe_loss", oe, on_step=True, on_epoch=False, batch_size=len(x_pos))
            loss = loss + oe_weight * oe
        self.train_diagnostics.update(x_pos=x_pos.detach(), x_neg=x_neg, energy_pos=e_pos.detach(),
                                      energy_neg=e_neg.detach(), cd=cd.detach())  # fmt: skip
        self.log_dict(
            {"train/loss": loss, "train/cd": cd, "train/energy_pos": e_pos.mean(), "train/energy_neg": e_neg.mean(),
             "train/energy_gap": e_neg.mean() - e_pos.mean(), "train/sgld_grad_norm": self.train_diagnostics["sgld_grad_norm"]},
            prog_bar=False, on_step=True, on_epoch=False, batch_size=len(x_pos),
        )  # fmt: skip
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(x_pos))  # fmt: skip
        return loss

    def training_anomaly_kinds(self) -> tuple[str, ...]:
        """With ``oe_weight`` > 0 the EBM trains on Perlin anomalies filled with textures (``perlin_texture``)
        or with other training images (``perlin_patch``); otherwise on none."""
        if self.hparams.get("oe_weight", 0.0) <= 0:
            return ()
        return ("perlin_texture",) if self.hparams.get("oe_source") == "texture" else ("perlin_patch",)

    def synthetic_anomalies(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """DRAEM's anomalies planted into every image of ``x`` (data range): (images, masks (B, 1, H, W)).

        Drawn from a generator forked from the step's (the chains and augmentations draw what they would
        without the option), so a step stays a pure function of (seed, step).
        """
        hp = self.hparams
        texture = hp.oe_source == "texture"
        if texture and self.oe_textures is None:
            self.oe_textures = texture_source(
                hp.oe_source_dir, hp.image_size, outlier.SETTING_DIR, training=True
            )
        g = torch.Generator(device=gen.device).manual_seed(gen.initial_seed() ^ 0x0E0E0E)
        lo, hi = hp.data_range
        x01 = ((x - lo) / (hi - lo)).clamp(0, 1)
        source = self.oe_textures if texture else BatchImages(x01)  # images: the other positives, moved
        bad01, mask, _ = synthesize(x01, source, g, augment=texture, anomaly_prob=1.0)
        bad = (bad01 * (hi - lo) + lo).to(x.dtype)
        return torch.where(mask > 0, bad, x), mask  # outside the mask: the positive exactly

    def margin_loss(self, x_pos: torch.Tensor, h_pos: torch.Tensor, e_pos: torch.Tensor, gen: torch.Generator
                    ) -> torch.Tensor:  # fmt: skip
        """Liu et al.'s energy margins on the positives (normal) and synthetic anomalies of them (outliers):
        per patch (the mask decides), per image (mean patch energy), or both (``oe_level``)."""
        hp = self.hparams
        x_bad, mask = self.synthetic_anomalies(x_pos, gen)
        h_bad = self.net.features(self.normalize(x_bad))
        bias = self.net.body[-1].bias[0]
        loss = x_pos.new_zeros(())
        if hp.oe_level in ("patch", "both"):
            p_pos = outlier.patch_energies(self.net.patch_contributions(h_pos), bias)
            p_bad = outlier.patch_energies(self.net.patch_contributions(h_bad), bias)
            bad, clean = outlier.patch_labels(mask, tuple(p_bad.shape[-2:]), hp.oe_patch_cover)
            e_in = torch.cat([p_pos.flatten(), p_bad[clean]])
            loss = loss + outlier.hinge_margin_loss(e_in, p_bad[bad], hp.oe_margin_in, hp.oe_margin_out)
        if hp.oe_level in ("image", "both"):
            n_patches = h_pos.shape[-1] * h_pos.shape[-2]
            has = mask.flatten(1).amax(1) > 0
            e_bad = self.net.head(h_bad)[has]
            loss = loss + outlier.hinge_margin_loss(e_pos / n_patches, e_bad / n_patches, hp.oe_margin_in,
                                                    hp.oe_margin_out)  # fmt: skip
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if (
            self.net_ema is not None
        ):  # here, not in on_train_batch_end: step checkpoints are written before that
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """net_ema <- decay * net_ema + (1 - decay) * net (parameters); buffers copied."""
        ema, cur = list(self.net_ema.parameters()), [p.detach() for p in self.net.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - float(self.hparams.ema_decay))
        for b_ema, b in zip(self.net_ema.buffers(), self.net.buffers(), strict=True):
            b_ema.copy_(b)

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
        energy, grad, patch = self.gradient(x)
        if patch is not None:
            patch = (patch - self.patch_mean) / (self.patch_std + 1e-6 * self.patch_std.mean())
        sigmas = self.hparams.get("map_sigmas")
        images, maps = compute_scores(energy, grad, self.grad_mean, self.grad_std, self.hparams.score_eps,
                                      map_sigmas=tuple(sigmas) if sigmas else None, patch=patch)  # fmt: skip
        if self.hparams.get("combo_map"):
            maps["a_combo"] = combine_maps(maps["a_ms"], maps["e_patch"], self.combo_stats)
            images["A_combo_max"] = maps["a_combo"].amax(dim=(1, 2))
        return images, maps

    def scorer(self) -> nn.Module:
        """x -> (default map, default image score, energy), input gradient written out (ONNX-exportable)."""
        hp = self.hparams
        return EBMScorer(self.scoring_net, self.grad_mean, self.grad_std, hp.score_eps,
                         input_norm=hp.get("input_norm", "none"), noise=getattr(self, "score_noise", None),
                         pixel_map=self.DEFAULT_PIXEL_MAP, image_score=self.DEFAULT_IMAGE_SCORE,
                         map_sigmas=hp.get("map_sigmas"))  # fmt: skip

    def fit_statistics(self, batches: Iterable[dict[str, torch.Tensor]], reduce_sum: ReduceSum | None = None
                       ) -> dict[str, Any]:  # fmt: skip
        """Per-pixel, per-channel mean/std of g(x) over the training images (float64, summed over ranks).

        With ``patch_energy`` also the per-position mean/std of the patch energies.
        """
        if self.hparams.get("combo_map") and iter(batches) is batches:
            batches = list(batches)  # read twice (fit_combo_stats)
        acc = MomentAccumulator(tuple(self.grad_mean.shape), device=self.device)
        pacc = MomentAccumulator((4, 4), device=self.device) if self.hparams.get("patch_energy") else None
        was_training = self.training
        self.eval()
        lo, hi = self.hparams.data_range
        gains = [float(v) for v in (self.hparams.get("stats_gains") or [1.0])]
        for batch in batches:
            x = batch["image"].to(self.device)
            for gain in gains:  # stats_gains: the statistics also cover these global brightness changes
                xg = x if gain == 1.0 else (((x - lo) / (hi - lo) * gain).clamp(0, 1) * (hi - lo) + lo)
                _, g, patch = self.gradient(xg)
                acc.update(g)
                if pacc is not None:
                    pacc.update(patch)
        self.train(was_training)
        if reduce_sum is not None:
            acc.all_reduce(reduce_sum)
            if pacc is not None:
                pacc.all_reduce(reduce_sum)
        mean, std = acc.mean_std()
        self.set_gradient_stats(mean, std, float(acc.count))
        out = {"mean": self.grad_mean.cpu(), "std": self.grad_std.cpu(), "count": float(acc.count)}
        if pacc is not None:
            pmean, pstd = pacc.mean_std()
            self.patch_mean.copy_(pmean.to(self.patch_mean))
            self.patch_std.copy_(pstd.to(self.patch_std))
            out.update(patch_mean=self.patch_mean.cpu(), patch_std=self.patch_std.cpu())
        if self.hparams.get("combo_map"):
            out["combo_stats"] = self.fit_combo_stats(batches, reduce_sum)
        return out

    def fit_combo_stats(self, batches: Iterable[dict[str, torch.Tensor]], reduce_sum: ReduceSum | None = None
                        ) -> torch.Tensor:  # fmt: skip
        """Mean / std over the training pixels of ``a_ms`` and ``e_patch`` (a second pass: both need the
        fitted statistics), stored in ``combo_stats`` for ``a_combo``."""
        acc = MomentAccumulator((2,), device=self.device)
        was_training = self.training
        self.eval()
        for batch in batches:
            _, maps = self.score(batch["image"].to(self.device))
            acc.update(torch.stack([maps["a_ms"].flatten(), maps["e_patch"].flatten()], 1))
        self.train(was_training)
        if reduce_sum is not None:
            acc.all_reduce(reduce_sum)
        mean, std = acc.mean_std()
        self.combo_stats.copy_(torch.stack([mean, std], 1).to(self.combo_stats))
        return self.combo_stats.cpu()

    def pixel_threshold_rule(self, good_maps: torch.Tensor, quantile: float) -> float:
        """The paper's three-sigma rule (Fig. 3) on the standardized L2 map; other maps: the quantile."""
        if self.DEFAULT_PIXEL_MAP != "a_std_l2":
            return super().pixel_threshold_rule(good_maps, quantile)
        return three_sigma_threshold(self.hparams.in_channels, norm=2)

    def map_scale(self, name: str) -> float:
        """Typical magnitude of each pixel map, from the training statistics (binned AUROC only)."""
        if name == "a_combo":
            return 2.0
        if name in ("a_ms", "e_patch"):
            return self.hparams.in_channels**0.5 if name == "a_ms" else 1.0
        kind, r = name.split("_")[1], int(name[-1])
        if kind == "std":
            return self.hparams.in_channels ** (1.0 / r)
        rms = (self.grad_mean.pow(2) + self.grad_std.pow(2)).sqrt()
        return float(pnorm(rms, r, dims=(0,)).mean()) or 1.0
