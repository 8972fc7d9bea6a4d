"""LightningModule of the self-supervised autoencoder (SSAE) of Bauer, Nakajima & Mueller.

Training: corrupt defect-free images with structured corruptions (:mod:`.corruption`), optionally add
the same Gaussian noise to input and target (``identity_noise_std``), and train the autoencoder
(:mod:`.network`) to restore the (noisy) clean image (:mod:`.loss`). Scoring: the per-pixel squared
reconstruction error averaged over channels, Gaussian-smoothed; the image score is its maximum.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ebmad.models.base import AnomalyModule, Scores, check
from ebmad.models.maps import GaussianSmoothing
from ebmad.models.ssae.corruption import StructuredCorruption, identity_noise
from ebmad.models.ssae.loss import restoration_loss
from ebmad.models.ssae.network import SSAENet
from ebmad.models.ssae.textures import FolderTextures


def error_maps(net: nn.Module, smooth: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared reconstruction error averaged over channels (B, H, W) and its smoothed version, x in [-1, 1]."""
    x01 = (x + 1) / 2
    err = (net(x01) - x01).pow(2).mean(dim=1)
    return err, smooth(err)


class SSAEScorer(nn.Module):
    """Exportable scorer: images (B, C, H, W) in [-1, 1] -> (smoothed error map (B, H, W), its max (B,))."""

    def __init__(self, net: nn.Module, smooth: nn.Module) -> None:
        super().__init__()
        self.net, self.smooth = net, smooth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, smoothed = error_maps(self.net, self.smooth, x)
        return smoothed, smoothed.amax(dim=(1, 2))


class SSAEModule(AnomalyModule):
    """Self-supervised autoencoder: restores structurally corrupted normal images; scores by reconstruction error.

    Image scores: ``max_smooth`` (max of the smoothed map; default), ``mean_error`` (mean squared error).
    Pixel maps: ``error_smooth`` (default), ``error`` (unsmoothed).
    """

    MODEL_TYPE = "ssae"
    IMAGE_SCORES = ("max_smooth", "mean_error")
    PIXEL_MAPS = ("error_smooth", "error")
    DEFAULT_IMAGE_SCORE = "max_smooth"
    DEFAULT_PIXEL_MAP = "error_smooth"

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 256,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        sdc_blocks: int = 4,
        dilations: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
        skip: str = "ccm",
        max_regions: int = 3,
        region_min: float = 0.05,
        region_max: float = 0.4,
        roughness: float = 0.5,
        opacity_min: float = 0.3,
        fill_weights: tuple[float, float, float] = (0.5, 0.3, 0.2),
        elastic_strength: float = 0.05,
        clean_prob: float = 0.0,
        anomaly_source_dir: str | None = None,
        masked_weight: float = 1.0,
        identity_noise_std: float = 0.0,
        smooth_sigma: float = 4.0,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        pixel_auroc_thresholds: int | None = None,
        n_examples: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check(lr > 0, f"model.lr must be > 0, got {lr}")
        check(masked_weight > 0, f"model.masked_weight must be > 0, got {masked_weight}")
        check(identity_noise_std >= 0, f"model.identity_noise_std must be >= 0, got {identity_noise_std}")
        check(smooth_sigma >= 0, f"model.smooth_sigma must be >= 0, got {smooth_sigma}")
        check(scheduler in (None, "cosine"), f"model.scheduler must be null or 'cosine', got {scheduler!r}")
        divisor = 2 ** (len(widths) - 1)
        check(
            image_size % divisor == 0,
            f"data.image_size={image_size} must be a multiple of {divisor} for model.widths={list(widths)} "
            f"({len(widths) - 1} stride-2 stages)",
        )
        self.save_hyperparameters()
        self.net = SSAENet(in_channels, widths, sdc_blocks, dilations, skip)
        self.smooth = GaussianSmoothing(smooth_sigma)
        # validates the corruption settings now; folder textures are opened at fit start, so a checkpoint
        # can be tested where the texture folder is absent
        self._corruption = self._make_corruption(textures=None)
        self._textures_ready = anomaly_source_dir is None
        self._init_base()

    def _make_corruption(self, textures: FolderTextures | None) -> StructuredCorruption:
        hp = self.hparams
        return StructuredCorruption(
            max_regions=hp.max_regions, region_min=hp.region_min, region_max=hp.region_max,
            roughness=hp.roughness, opacity_min=hp.opacity_min, fill_weights=hp.fill_weights,
            elastic_strength=hp.elastic_strength, clean_prob=hp.clean_prob, textures=textures,
        )  # fmt: skip

    @property
    def corruption(self) -> StructuredCorruption:
        """The training corruption; opens and decodes ``anomaly_source_dir`` on first use."""
        if not self._textures_ready:
            hp = self.hparams
            textures = FolderTextures(hp.anomaly_source_dir, hp.image_size, hp.in_channels)
            _ = textures.data  # decode now: an unreadable file fails here, naming it
            self._corruption = self._make_corruption(textures)
            self._textures_ready = True
        return self._corruption

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Restored images in [0, 1] scale for (corrupted) images in [0, 1]."""
        return self.net(x01)

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        _ = self.corruption

    def training_pair(
        self, clean: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, target, corruption mask) for clean images in [0, 1]: the structured corruption,
        then (``identity_noise_std > 0``) the same Gaussian noise on input and target, drawn after it."""
        with torch.no_grad():
            corrupted, mask = self.corruption.corrupt(clean, generator)
            inputs, target = identity_noise(corrupted, clean, self.hparams.identity_noise_std, generator)
        return inputs, target, mask

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        clean = (batch["image"] + 1) / 2
        inputs, target, mask = self.training_pair(clean, self.step_generator())
        loss = restoration_loss(self.net(inputs), target, mask, self.hparams.masked_weight)
        n = len(clean)
        self.log_dict({"train/loss": loss, "train/mask_fraction": mask.float().mean()},
                      on_step=True, on_epoch=False, batch_size=n)  # fmt: skip
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=n)  # fmt: skip
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.Adam(
            self.net.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        if hp.scheduler == "cosine":
            total = self.trainer.estimated_stepping_batches
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

    # ----------------------------------------------------------------- scoring
    def score(self, x: torch.Tensor) -> Scores:
        """Image scores (B,) and pixel maps (B, H, W) for images in [-1, 1]."""
        with torch.no_grad():
            err, smoothed = error_maps(self.net, self.smooth, x)
        images = {"max_smooth": smoothed.amax(dim=(1, 2)), "mean_error": err.mean(dim=(1, 2))}
        return images, {"error_smooth": smoothed, "error": err}

    def scorer(self) -> nn.Module:
        """A copy of the network and smoothing in eval mode: x -> (smoothed map (B, H, W), max (B,))."""
        return SSAEScorer(copy.deepcopy(self.net), copy.deepcopy(self.smooth)).eval()

    def map_scale(self, name: str) -> float:
        """Typical squared error of a trained model in [0, 1] units (spreads binned pixel AUROC)."""
        return 0.01
