"""LightningModule of the feature-space EBM: the seed paper's energy model over pretrained patch features.

Fit start: the prior (PatchCore's coreset memory bank, or a Gaussian per position) and the channel statistics
from every training image. Training: contrastive divergence on patch energies, loss = mean e(f+) - mean e(f-)
+ alpha (e_theta(f+)^2 + e_theta(f-)^2), with negatives from short-run SGLD chains in the standardized feature
space (z = (f - mu) / sigma), started from the positives plus Gaussian noise (``negatives=noise``, SimpleNet's
perturbation), from noise matched to the feature statistics (``stats``, z ~ N(0, I)), or from the features of
synthetic anomalies (``synthetic``: DRAEM-style Perlin patches of other training images, the patches inside
the mask). Only the head e_theta learns; the prior and backbone are fixed.
Scores: the patch-energy map and its maximum (headline), and Genc et al.'s gradient maps g = -dE/dx through
the frozen backbone (E = the sum of the patch energies), standardized per pixel and channel (eq. 1-3).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ebmad.models.base import ReduceSum, Scores, check
from ebmad.models.ebm.scoring import MomentAccumulator, compute_scores, energy_and_grad
from ebmad.models.ebm.sgld import frozen, sgld_sample
from ebmad.models.feature_ebm.network import PRIORS, FeatureEnergy
from ebmad.models.padim.network import GaussianSums
from ebmad.models.patchcore.memory import greedy_coreset
from ebmad.models.pretrained import PretrainedFeatureModule, check_backbone_settings, fit_progress
from ebmad.reliability.guards import report_values
from ebmad.synthesis.perlin_anomalies import synthesize
from ebmad.synthesis.textures import BatchImages

log = logging.getLogger(__name__)

NEGATIVES = ("noise", "stats", "synthetic")
GRADIENT_SCORES = ("energy", "A_raw_l1", "A_raw_l2", "A_std_l1", "A_std_l2")
GRADIENT_MAPS = ("a_raw_l1", "a_raw_l2", "a_std_l1", "a_std_l2")


class FeatureEBMModule(PretrainedFeatureModule):
    """Energy over frozen pretrained patch features, e = e_prior + e_theta, trained by contrastive divergence.

    Image scores: ``E_max`` (max patch energy; default), ``E_lse`` (log-sum-exp of the patch energies),
    and with ``gradient_maps`` the paper's ``energy`` (total), ``A_raw_l1`` .. ``A_std_l2``. Pixel maps:
    ``e_map`` (patch energies upsampled and smoothed; default), ``a_raw_l1`` .. ``a_std_l2``. The headline
    pair is ``default_image_score`` / ``default_pixel_map`` (scoring options: a checkpoint can be re-scored).
    """

    MODEL_TYPE = "feature_ebm"
    IMAGE_SCORES = ("E_max", "E_lse", *GRADIENT_SCORES)  # without gradient_maps: the first two
    PIXEL_MAPS = ("e_map", *GRADIENT_MAPS)  # without gradient_maps: e_map
    FIT_ONLY = False  # trains a head; the prior is fitted at fit start
    NEEDS_INPUT_GRAD = True
    DIVERGENCE_HINT = "lower model.lr or model.sgld_step_size"

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("stage3", "stage5"),
        backbone_weights: str | None = None,
        prior: str = "knn",
        coreset_ratio: float = 0.01,
        coreset_projection: int | None = 128,
        max_patches: int = 200_000,
        epsilon: float = 0.01,
        head_hidden: int = 256,
        head_layers: int = 2,
        adaptor: bool = False,
        negatives: str = "noise",
        negative_noise: float = 0.5,
        sgld_steps: int = 5,
        sgld_step_size: float = 0.01,
        sgld_noise: float = 0.005,
        alpha: float = 0.1,
        patches_per_step: int = 512,
        image_energy: str = "max",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        smooth_sigma: float = 4.0,
        gradient_maps: bool = True,
        default_image_score: str = "E_max",
        default_pixel_map: str = "e_map",
        pixel_auroc_thresholds: int | None = None,
        n_examples: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_backbone_settings(backbone, image_size)
        check(prior in PRIORS, f"model.prior must be one of {PRIORS}, got {prior!r}")
        check(negatives in NEGATIVES, f"model.negatives must be one of {NEGATIVES}, got {negatives!r}")
        check(
            image_energy in ("max", "logsumexp"),
            f"model.image_energy must be max or logsumexp, got {image_energy!r}",
        )
        check(0 < coreset_ratio <= 1, f"model.coreset_ratio must be in (0, 1], got {coreset_ratio}")
        check(sgld_steps >= 0 and sgld_step_size >= 0 and sgld_noise >= 0,
              "model.sgld_steps, model.sgld_step_size and model.sgld_noise must be >= 0")  # fmt: skip
        check(patches_per_step >= 1, f"model.patches_per_step must be >= 1, got {patches_per_step}")
        check(lr > 0, f"model.lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.net = FeatureEnergy(image_size, backbone, tuple(layers), backbone_weights, prior, head_hidden,
                                 head_layers, adaptor, smooth_sigma)  # fmt: skip
        self.register_buffer("prior_fitted", torch.tensor(False))
        self.register_buffer("grad_mean", torch.zeros(in_channels, image_size, image_size))
        self.register_buffer("grad_std", torch.ones(in_channels, image_size, image_size))
        self.register_buffer("stats_count", torch.tensor(0.0))
        self.train_diagnostics: dict[str, torch.Tensor] = {}
        if not gradient_maps:
            self.IMAGE_SCORES, self.PIXEL_MAPS = self.IMAGE_SCORES[:2], self.PIXEL_MAPS[:1]
        check(default_image_score in self.IMAGE_SCORES,
              f"model.default_image_score must be one of {self.IMAGE_SCORES}, got {default_image_score!r}")  # fmt: skip
        check(default_pixel_map in self.PIXEL_MAPS,
              f"model.default_pixel_map must be one of {self.PIXEL_MAPS}, got {default_pixel_map!r}")  # fmt: skip
        self.DEFAULT_IMAGE_SCORE, self.DEFAULT_PIXEL_MAP = default_image_score, default_pixel_map
        self._init_base()

    DEFAULT_IMAGE_SCORE = "E_max"
    DEFAULT_PIXEL_MAP = "e_map"

    @property
    def stats_ready(self) -> bool:
        return bool(self.prior_fitted) and (not self.hparams.gradient_maps or bool(self.stats_count > 0))

    def training_anomaly_kinds(self) -> tuple[str, ...]:
        """``negatives=synthetic`` trains on Perlin patches of other training images (``perlin_patch``)."""
        return ("perlin_patch",) if self.hparams.negatives == "synthetic" else ()

    # ------------------------------------------------------------------ prior
    def fit_prior(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Channel statistics and the prior from every training image (one pass; memory bounded by
        ``max_patches``, a seeded random share of each image's patches beyond)."""
        hp, net = self.hparams, self.net
        n_images = getattr(batches, "n", None)
        per_image = net.features.grid(hp.image_size) ** 2
        keep = per_image if not n_images else min(per_image, max(1, hp.max_patches // n_images))
        g = torch.Generator().manual_seed(hp.seed)
        gauss = GaussianSums(per_image, net.features.dim, self.device) if hp.prior == "gaussian" else None
        kept = []
        with torch.no_grad():
            for batch in fit_progress(batches, "feature EBM: prior"):
                f, _ = net.patch_features(batch["image"].to(self.device))
                if gauss is not None:
                    gauss.add(f)
                for one in f:
                    kept.append(
                        one if keep == per_image else one[torch.randperm(per_image, generator=g)[:keep]]
                    )
        if not kept:
            raise ValueError("feature EBM: no training images to fit the prior on")
        feats = torch.cat(kept)
        net.feat_mean.copy_(feats.mean(0))
        net.feat_std.copy_(feats.std(0).clamp_min(1e-6))
        if hp.prior == "knn":
            net.center.copy_(feats.mean(0))
            feats -= net.center
            n_bank = max(1, math.ceil(hp.coreset_ratio * len(feats)))
            chosen = (
                greedy_coreset(feats, n_bank, hp.coreset_projection, hp.seed) if n_bank < len(feats) else None
            )
            net.memory_bank = (feats if chosen is None else feats[chosen]).contiguous()
        elif gauss is not None:
            mean, inv_cov = gauss.mean_and_inverse(hp.epsilon)
            net.prior_mean.copy_(mean)
            net.prior_inv_cov.copy_(inv_cov)
        self.prior_fitted.fill_(True)
        log.info("feature EBM prior %s fitted on %d patch features", hp.prior, len(feats))

    def adopt_fixed_parts(self, trained: FeatureEBMModule) -> None:
        """The trained model's prior and channel statistics (fitted before training, never trained)."""
        if bool(trained.prior_fitted):
            self.net.memory_bank = trained.net.memory_bank.clone()
            for name in ("feat_mean", "feat_std", "center", "prior_mean", "prior_inv_cov"):
                getattr(self.net, name).copy_(getattr(trained.net, name))
            self.prior_fitted.fill_(True)

    def on_fit_start(self) -> None:
        if not bool(self.prior_fitted):  # a resumed run has it from the checkpoint
            self.fit_prior(self.trainer.datamodule.stats_dataloader())

    # ------------------------------------------------------------------ training
    def negatives(self, f_pos: torch.Tensor, pos: torch.Tensor, images: torch.Tensor, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """SGLD negatives (n, D) (raw features) and their grid positions, from the chosen starts."""
        hp, net = self.hparams, self.net
        z_pos = net.standardize(f_pos)
        if hp.negatives == "noise":
            z0 = z_pos + hp.negative_noise * torch.randn(z_pos.shape, device=z_pos.device, generator=gen)
        elif hp.negatives == "stats":
            z0 = torch.randn(z_pos.shape, device=z_pos.device, generator=gen)
        else:
            z0, pos = self.synthetic_starts(images, len(f_pos), gen)

        def energy(z: torch.Tensor) -> torch.Tensor:
            return net.energy(net.unstandardize(z), pos)

        stats: dict[str, torch.Tensor] = {}
        with frozen(net.head):
            z = sgld_sample(energy, z0, hp.sgld_steps, hp.sgld_step_size, hp.sgld_noise,
                            (-math.inf, math.inf), gen, stats=stats)  # fmt: skip
        if "grad_norm" in stats:
            self.train_diagnostics["sgld_grad_norm"] = stats["grad_norm"]
        return net.unstandardize(z), pos

    def synthetic_starts(self, images: torch.Tensor, n: int, gen: torch.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Standardized features of patches inside synthetic anomalies (DRAEM's Perlin shapes filled with
        other training images) and their positions; ``n`` of them, drawn with repetition."""
        g = torch.Generator(device=gen.device).manual_seed(gen.initial_seed() ^ 0x0E0E0E)
        x01 = ((images + 1) / 2).clamp(0, 1)
        bad01, mask, _ = synthesize(x01, BatchImages(x01), g, augment=False, anomaly_prob=1.0)
        with torch.no_grad():
            f, (h, w) = self.net.patch_features(bad01 * 2 - 1)
            cover = torch.nn.functional.adaptive_avg_pool2d(mask.float(), (h, w)).flatten(1)  # (B, P)
        inside = (cover > 0.5).nonzero()
        if len(inside) == 0:
            inside = (cover == cover.max()).nonzero()
        pick = inside[torch.randint(len(inside), (n,), device=inside.device, generator=gen)]
        return self.net.standardize(f[pick[:, 0], pick[:, 1]]), pick[:, 1]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp, net = self.hparams, self.net
        gen = self.step_generator()
        images = batch["image"]
        with torch.no_grad():
            f, _ = net.patch_features(images)
        b, p, d = f.shape
        take = torch.randperm(b * p, device=f.device, generator=gen)[: hp.patches_per_step]
        f_pos, pos = f.reshape(b * p, d)[take], take % p
        f_neg, pos_neg = self.negatives(f_pos, pos, images, gen)
        prior_pos = net.prior_energy(f_pos, pos).detach()
        prior_neg = net.prior_energy(f_neg, pos_neg).detach()
        t_pos, t_neg = net.head(net.standardize(f_pos)), net.head(net.standardize(f_neg))
        e_pos, e_neg = prior_pos + t_pos, prior_neg + t_neg
        report_values(self, energy_pos=e_pos, energy_neg=e_neg, sgld_samples=f_neg)
        cd = e_pos.mean() - e_neg.mean()
        loss = cd + hp.alpha * (t_pos.pow(2) + t_neg.pow(2)).mean() if hp.alpha > 0 else cd
        self.train_diagnostics.update(energy_pos=e_pos.detach(), energy_neg=e_neg.detach(), cd=cd.detach())
        self.log_dict({"train/loss": loss, "train/cd": cd, "train/energy_pos": e_pos.mean(),
                       "train/energy_neg": e_neg.mean(), "train/energy_gap": e_neg.mean() - e_pos.mean(),
                       "train/head_pos": t_pos.mean(), "train/head_neg": t_neg.mean()},
                      on_step=True, on_epoch=False, batch_size=b)  # fmt: skip
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return torch.optim.Adam(self.net.head.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay)  # fmt: skip

    # ------------------------------------------------------------------ scoring
    def image_energy(self, e: torch.Tensor) -> torch.Tensor:
        return e.amax(dim=1) if self.hparams.image_energy == "max" else torch.logsumexp(e, dim=1)

    def gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E = sum of patch energies (B,), g = -dE/dx (B, C, S, S)) through the frozen backbone."""
        return energy_and_grad(lambda u: self.net.patch_energies(u)[0].sum(dim=1), x)

    def fit_statistics(self, batches: Iterable[dict[str, torch.Tensor]], reduce_sum: ReduceSum | None = None
                       ) -> dict[str, Any]:  # fmt: skip
        """The prior (if not fitted yet: the untrained reference) and the per-pixel, per-channel mean/std
        of the gradient maps over the training images (paper eq. 1)."""
        if not bool(self.prior_fitted):
            self.fit_prior(batches)
        if not self.hparams.gradient_maps:
            return {}
        acc = MomentAccumulator(tuple(self.grad_mean.shape), device=self.device)
        for batch in fit_progress(batches, "feature EBM: gradient statistics"):
            acc.update(self.gradient(batch["image"].to(self.device))[1])
        if reduce_sum is not None:
            acc.all_reduce(reduce_sum)
        mean, std = acc.mean_std()
        self.grad_mean.copy_(mean.to(self.grad_mean))
        self.grad_std.copy_(std.to(self.grad_std))
        self.stats_count.fill_(float(acc.count))
        return {"mean": self.grad_mean.cpu(), "std": self.grad_std.cpu(), "count": float(acc.count)}

    def score(self, x: torch.Tensor) -> Scores:
        """Image scores (B,) and pixel maps (B, S, S) for images in [-1, 1]."""
        check(
            self.stats_ready, "the feature EBM has no fitted prior/statistics yet: fit it first (train=true)"
        )
        with torch.no_grad():
            e, grid = self.net.patch_energies(x)
            _, e_map = self.net.maps(e, grid)
        images = {"E_max": e.amax(dim=1), "E_lse": torch.logsumexp(e, dim=1)}
        maps = {"e_map": e_map}
        if self.hparams.gradient_maps:
            total, g = self.gradient(x)
            more_images, more_maps = compute_scores(total, g, self.grad_mean, self.grad_std)
            images.update(more_images)
            maps.update(more_maps)
        return images, maps

    def scorer(self) -> nn.Module:
        """A copy of the energy network (prior included) in eval mode: x -> (energy map, max patch energy)."""
        return copy.deepcopy(self.net).eval()

    def map_scale(self, name: str) -> float:
        return 1.0
