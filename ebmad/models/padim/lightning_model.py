"""LightningModule of PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", 2020).

Fit (no training steps): one pass over the training images accumulates, per feature-grid position, the mean
and covariance of the embeddings; mean and inverse covariance are buffers (they travel with the checkpoint).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ebmad.models.base import ReduceSum, Scores, check
from ebmad.models.padim.network import GaussianSums, Padim
from ebmad.models.pretrained import (
    PretrainedFeatureModule,
    check_backbone_settings,
    fit_progress,
    images_in_range,
)

log = logging.getLogger(__name__)


class PadimModule(PretrainedFeatureModule):
    """PaDiM on a frozen EfficientNet-Lite. Fit-only: ``fit_statistics`` fits the per-position Gaussians.

    Image score: ``max_distance`` (the smoothed map's maximum). Pixel maps: ``mahalanobis_smooth`` (default),
    ``mahalanobis``. Out-of-sample scores of the training images for the thresholds: ``leave_out_folds``-fold
    refits of the Gaussians (each image scored by the Gaussians of the other folds).
    """

    MODEL_TYPE = "padim"
    IMAGE_SCORES = ("max_distance",)
    PIXEL_MAPS = ("mahalanobis_smooth", "mahalanobis")
    DEFAULT_IMAGE_SCORE = "max_distance"
    DEFAULT_PIXEL_MAP = "mahalanobis_smooth"

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("stage2", "stage3", "stage5"),
        backbone_weights: str | None = None,
        n_features: int = 100,
        epsilon: float = 0.01,
        leave_out_folds: int = 5,
        smooth_sigma: float = 4.0,
        pixel_auroc_thresholds: int | None = None,
        n_examples: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_backbone_settings(backbone, image_size)
        check(epsilon > 0, f"model.epsilon must be > 0, got {epsilon}")
        check(leave_out_folds >= 2, f"model.leave_out_folds must be >= 2, got {leave_out_folds}")
        check(smooth_sigma >= 0, f"model.smooth_sigma must be >= 0, got {smooth_sigma}")
        self.save_hyperparameters()
        self.net = Padim(
            image_size, backbone, tuple(layers), backbone_weights, n_features, smooth_sigma, seed
        )
        self.register_buffer("fitted", torch.tensor(False))
        self._init_base()

    @property
    def stats_ready(self) -> bool:
        return bool(self.fitted)

    # ------------------------------------------------------------------ fit
    def _sums(self, batches: Iterable[dict[str, torch.Tensor]], what: str) -> GaussianSums:
        net = self.net
        sums = GaussianSums(*net.mean.shape, self.device)
        with torch.no_grad():
            for batch in fit_progress(batches, what):
                sums.add(net.embed(batch["image"].to(self.device))[0])
        return sums

    def fit_statistics(self, batches: Iterable[dict[str, torch.Tensor]], reduce_sum: ReduceSum | None = None
                       ) -> dict[str, Any]:  # fmt: skip
        """Mean and inverse covariance per position from every training image."""
        p, d = self.net.mean.shape
        need = p * d * d * 8 * 2  # float64 sums and their inverse
        if need > 8 * 2**30:
            raise MemoryError(f"PaDiM's covariances need {need / 2**30:.1f} GiB at data.image_size="
                              f"{self.hparams.image_size} with model.n_features={d}: lower one of them")  # fmt: skip
        sums = self._sums(batches, "PaDiM: Gaussians")
        mean, inv_cov = sums.mean_and_inverse(self.hparams.epsilon)
        self.net.mean.copy_(mean)
        self.net.inv_cov.copy_(inv_cov)
        self.fitted.fill_(True)
        self._fit_sums = sums  # for leave_out_scores right after the fit (not saved)
        log.info("PaDiM: Gaussians at %d positions over %d channels from %d images", p, d, sums.n)
        return {}

    def leave_out_scores(self, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """Default image scores of the training images, each image scored by Gaussians refitted without its
        fold (``leave_out_folds`` contiguous folds; as many folds as images = leave-one-out)."""
        total = self.__dict__.pop("_fit_sums", None) or self._sums(batches, "PaDiM: Gaussians")
        n, k = total.n, min(self.hparams.leave_out_folds, total.n)
        fold_of = torch.arange(n) * k // n
        scores = torch.empty(n)
        for f in range(k):
            members = (fold_of == f).nonzero().flatten()  # a contiguous block
            emb, grid = self._embed_range(batches, int(members[0]), int(members[-1]) + 1)
            fold = GaussianSums(*self.net.mean.shape, self.device)
            fold.add(emb)
            mean, inv_cov = total.minus(fold).mean_and_inverse(self.hparams.epsilon)
            with torch.no_grad():
                smooth = self.net.maps(self.net.distances(emb, mean, inv_cov), grid)[1]
            scores[members] = smooth.amax(dim=(1, 2)).cpu()
        return scores

    def _embed_range(self, batches: Iterable[dict[str, torch.Tensor]], lo: int, hi: int
                     ) -> tuple[torch.Tensor, tuple[int, int]]:  # fmt: skip
        """Embeddings of the training images lo..hi-1 (positions in the batches' order)."""
        out, grid = [], (0, 0)
        with torch.no_grad():
            for x, _ in images_in_range(batches, lo, hi):
                emb, grid = self.net.embed(x.to(self.device))
                out.append(emb)
        return torch.cat(out), grid

    # ------------------------------------------------------------------ scoring
    def score(self, x: torch.Tensor) -> Scores:
        """Image scores (B,) and pixel maps (B, S, S) for images in [-1, 1]."""
        check(self.stats_ready, "PaDiM has no fitted Gaussians yet: fit it first (train=true)")
        with torch.no_grad():
            emb, grid = self.net.embed(x)
            raw, smooth = self.net.maps(self.net.distances(emb), grid)
        return {"max_distance": smooth.amax(dim=(1, 2))}, {"mahalanobis_smooth": smooth, "mahalanobis": raw}

    def scorer(self) -> nn.Module:
        """A copy of the network (Gaussians included) in eval mode: x -> (smoothed map, its max)."""
        return copy.deepcopy(self.net).eval()

    def map_scale(self, name: str) -> float:
        return float(self.net.mean.shape[1]) ** 0.5
