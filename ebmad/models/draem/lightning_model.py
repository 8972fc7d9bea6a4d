"""LightningModule for DRAEM: simulated anomalies inside ``training_step``, softmax-mask scoring."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ebmad.models.base import AnomalyModule, Scores, check
from ebmad.models.draem.loss import draem_loss
from ebmad.models.draem.network import DraemNet
from ebmad.models.draem.textures import SETTING, TextureSource
from ebmad.synthesis.augment import rotate_normal
from ebmad.synthesis.perlin_anomalies import synthesize
from ebmad.synthesis.textures import texture_source

POOL = 21  # official test_DRAEM.py: avg_pool2d(mask, 21, stride=1, padding=21 // 2), then the max
# learning-rate schedules: (milestones as fractions of the total steps, factor)
SCHEDULES: dict[str, tuple[tuple[float, ...], float]] = {
    "code": ((0.8, 0.9), 0.2),  # official train_DRAEM.py: MultiStepLR at 80% / 90% of the epochs, gamma 0.2
    "paper": ((4 / 7, 6 / 7), 0.1),  # paper: x0.1 after epochs 400 and 600 of 700
}


class DraemScorer(nn.Module):
    """Exportable scoring: images in [-1, 1] (B, C, H, W) -> (pixel map (B, H, W), image score (B,)).

    The pixel map is the softmax anomaly probability; the image score is the max of its 21x21 mean
    (zero padded, as the official ``avg_pool2d``).
    """

    def __init__(self, net: DraemNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits = self.net((x + 1) / 2)
        prob = torch.softmax(logits, dim=1)[:, 1]
        pooled = F.avg_pool2d(prob[:, None], POOL, stride=1, padding=POOL // 2)
        return prob, pooled.flatten(1).amax(dim=1)


class DraemModule(AnomalyModule):
    """DRAEM (Zavrtanik, Kristan & Skocaj, ICCV 2021), as the official code trains and tests it.

    Training: each batch (converted from [-1, 1] to [0, 1]) is rotated with probability 0.3
    (``rotate_normal``), turned into simulated anomalies (:func:`synthesize`), reconstructed and
    segmented; loss = L2 + (1 - SSIM) + focal. Scoring: ``mask_prob`` = softmax anomaly channel,
    ``max_pool21`` = max of its 21x21 average (headline), plus the plain map max and mean.
    """

    MODEL_TYPE = "draem"
    IMAGE_SCORES = ("max_pool21", "mask_max", "mask_mean")
    PIXEL_MAPS = ("mask_prob",)
    DEFAULT_IMAGE_SCORE = "max_pool21"
    DEFAULT_PIXEL_MAP = "mask_prob"

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 256,
        recon_base_width: int = 128,
        disc_base_width: int = 64,
        lr: float = 1e-4,
        schedule: str | None = "code",
        anomaly_source_dir: str | None = None,
        rotate_normal: bool = True,
        pixel_auroc_thresholds: int | None = None,
        n_examples: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check(in_channels in (1, 3), f"model.in_channels must be 1 or 3, got {in_channels}")
        check(
            image_size >= 32 and image_size % 32 == 0,
            f"DRAEM needs data.image_size to be a multiple of 32 (five 2x poolings), got {image_size}",
        )
        check(recon_base_width >= 1, f"model.recon_base_width must be >= 1, got {recon_base_width}")
        check(disc_base_width >= 1, f"model.disc_base_width must be >= 1, got {disc_base_width}")
        check(lr > 0, f"model.lr must be > 0, got {lr}")
        check(
            schedule is None or schedule in SCHEDULES,
            f"model.schedule must be null or one of {sorted(SCHEDULES)}, got {schedule!r}",
        )
        self.save_hyperparameters()
        self.net = DraemNet(in_channels, recon_base_width, disc_base_width)
        self.textures: TextureSource | None = None  # built when training starts (not needed to test)
        self._init_base()

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, logits) for images in [0, 1]."""
        return self.net(x01)

    # ---------------------------------------------------------------- training
    def build_textures(self) -> TextureSource:
        """The anomaly source: ``anomaly_source_dir`` images, or procedural textures when it is null."""
        return texture_source(
            self.hparams.anomaly_source_dir, self.hparams.image_size, SETTING, training=True
        )

    def on_fit_start(self) -> None:
        if self.textures is None:
            self.textures = self.build_textures()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.textures is None:
            self.textures = self.build_textures()
        gen = self.step_generator()
        image = (batch["image"] + 1) / 2
        if self.hparams.rotate_normal:
            image = rotate_normal(image, gen)
        augmented, mask, has_anomaly = synthesize(image, self.textures, gen)
        reconstruction, logits = self.net(augmented)
        losses = draem_loss(reconstruction, image, logits, mask)
        n = len(image)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=False, batch_size=n
        )
        self.log("train/anomalous_fraction", has_anomaly.mean(), on_step=True, on_epoch=False, batch_size=n)
        self.log(
            "train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=n
        )
        self.log("train/loss_epoch", losses["loss"], on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=n)  # fmt: skip
        return losses["loss"]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.Adam(self.net.parameters(), lr=hp.lr)
        if hp.schedule is None:
            return opt
        total = self.trainer.estimated_stepping_batches
        check(
            math.isfinite(total) and total >= 1,
            "model.schedule needs a finite number of training steps: set trainer.max_steps or trainer.max_epochs",
        )
        fractions, gamma = SCHEDULES[hp.schedule]
        milestones = [int(f * total) for f in fractions]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, x: torch.Tensor) -> Scores:
        """Image scores (B,) and the anomaly-probability map (B, H, W) for images in [-1, 1]."""
        prob, pooled_max = DraemScorer(self.net)(x)
        flat = prob.flatten(1)
        images = {"max_pool21": pooled_max, "mask_max": flat.amax(1), "mask_mean": flat.mean(1)}
        return images, {"mask_prob": prob}

    def scorer(self) -> nn.Module:
        """A copy of the networks in eval mode, wrapped as :class:`DraemScorer` (ONNX-exportable)."""
        return DraemScorer(copy.deepcopy(self.net)).eval()
