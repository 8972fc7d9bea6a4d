"""LightningModule of PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Fit (no training steps): locally aware patch features of every training image from a frozen ImageNet backbone,
a greedy k-center coreset of them as the memory bank (a buffer: it travels with the checkpoint). Scores: the
nearest-neighbour distance of each patch (map, upsampled and smoothed) and the reweighted image score.
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
from ebmad.models.patchcore.memory import greedy_coreset
from ebmad.models.patchcore.network import PatchCore
from ebmad.models.pretrained import (
    PretrainedFeatureModule,
    check_backbone_settings,
    fit_progress,
    images_in_range,
)

log = logging.getLogger(__name__)


def free_memory_bytes(device: torch.device) -> int:
    """Memory available for the bank on ``device`` (CUDA: free device memory; CPU: available RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # unknown: do not refuse


class PatchCoreModule(PretrainedFeatureModule):
    """PatchCore on a frozen EfficientNet-Lite. Fit-only: ``fit_statistics`` builds the memory bank.

    Image scores: ``reweighted`` (the paper's eq. 7; default), ``max_distance`` (s*, the largest patch
    distance). Pixel maps: ``distance_smooth`` (default; Gaussian sigma ``smooth_sigma`` px), ``distance``.
    """

    MODEL_TYPE = "patchcore"
    IMAGE_SCORES = ("reweighted", "max_distance")
    PIXEL_MAPS = ("distance_smooth", "distance")
    DEFAULT_IMAGE_SCORE = "reweighted"
    DEFAULT_PIXEL_MAP = "distance_smooth"

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("stage3", "stage5"),
        backbone_weights: str | None = None,
        coreset_ratio: float = 0.1,
        coreset_projection: int | None = 128,
        max_patches: int = 1_000_000,
        num_neighbors: int = 9,
        smooth_sigma: float = 4.0,
        leave_out_folds: int = 5,
        pixel_auroc_thresholds: int | None = None,
        n_examples: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_backbone_settings(backbone, image_size)
        check(0 < coreset_ratio <= 1, f"model.coreset_ratio must be in (0, 1], got {coreset_ratio}")
        check(max_patches >= 1, f"model.max_patches must be >= 1, got {max_patches}")
        check(num_neighbors >= 1, f"model.num_neighbors must be >= 1, got {num_neighbors}")
        check(smooth_sigma >= 0, f"model.smooth_sigma must be >= 0, got {smooth_sigma}")
        check(leave_out_folds >= 2, f"model.leave_out_folds must be >= 2, got {leave_out_folds}")
        self.save_hyperparameters()
        self.net = PatchCore(
            image_size, backbone, tuple(layers), backbone_weights, num_neighbors, smooth_sigma
        )
        self._init_base()

    @property
    def stats_ready(self) -> bool:
        return len(self.net.memory_bank) > 0

    # ------------------------------------------------------------------ fit
    def fit_statistics(self, batches: Iterable[dict[str, torch.Tensor]], reduce_sum: ReduceSum | None = None
                       ) -> dict[str, Any]:  # fmt: skip
        """The memory bank: the patch features of every training image (at most ``max_patches`` in all: a
        seeded random share of each image's patches beyond), then their greedy coreset (``coreset_ratio``)."""
        feats, owners = self._collect(batches)
        center, bank, source = self._memory(feats, owners)  # centers feats in place (no second copy)
        self.net.center.copy_(center)
        self.net.memory_bank, self.net.bank_source = bank, source
        self._fit_patches = (feats, center, owners)  # for leave_out_scores right after the fit (not saved)
        log.info("PatchCore memory bank: %d of %d patch features from %d images (coreset ratio %g)",
                 len(bank), len(feats), int(owners.max()) + 1, self.hparams.coreset_ratio)  # fmt: skip
        return {}

    def _memory(
        self, feats: torch.Tensor, owners: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(center, greedy-coreset bank in centered coordinates, owner image of each bank row) of patch features
        ``feats``, which are centered in place (the fit's peak memory holds them once)."""
        hp = self.hparams
        center = feats.mean(0)
        feats -= center
        n_bank = max(1, math.ceil(hp.coreset_ratio * len(feats)))
        chosen = (
            greedy_coreset(feats, n_bank, hp.coreset_projection, hp.seed)
            if n_bank < len(feats)
            else torch.arange(len(feats), device=feats.device)
        )
        return center, feats[chosen].contiguous(), owners[chosen].contiguous()

    def _collect(self, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features (n, D) of the training images and the image index of each, bounded by max_patches."""
        hp = self.hparams
        per_image = self.net.features.grid(hp.image_size) ** 2
        n_images = getattr(batches, "n", None)
        keep = per_image if not n_images else min(per_image, max(1, hp.max_patches // n_images))
        if n_images:
            self._check_memory(n_images * keep)
        g = torch.Generator().manual_seed(hp.seed)
        feats, owners, seen = [], [], 0
        with torch.no_grad():
            for batch in fit_progress(batches, "PatchCore: patch features"):
                f, _ = self.net.patch_features(batch["image"].to(self.device))
                for one in f:
                    pick = one if keep == per_image else one[torch.randperm(per_image, generator=g)[:keep]]
                    feats.append(pick)
                    owners.append(torch.full((len(pick),), seen, dtype=torch.long, device=f.device))
                    seen += 1
        if not feats:
            raise ValueError("PatchCore: no training images to build the memory bank from")
        return torch.cat(feats), torch.cat(owners)

    def _check_memory(self, patches: int) -> None:
        """A clear error before the fit runs out of memory (features + projected copy for the coreset)."""
        hp = self.hparams
        need = patches * (2 * self.net.features.dim + (hp.coreset_projection or 0)) * 4
        free = free_memory_bytes(self.device)
        if need > 0.8 * free:
            raise MemoryError(
                f"PatchCore needs about {need / 2**30:.1f} GiB for {patches} patch features at "
                f"data.image_size={hp.image_size}, but {free / 2**30:.1f} GiB is free: lower model.max_patches "
                f"(now {hp.max_patches}; a random share of each image's patches) or data.image_size"
            )

    def leave_out_scores(self, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """Default image scores of the training images (in the order ``fit_statistics`` saw them), each scored by
        a memory bank refitted without its fold (``leave_out_folds`` contiguous folds of images; the coreset is
        chosen again; as many folds as images = leave-one-out). Only dropping an image's own patches from the
        full bank is not enough: that coreset was chosen to cover the image, and thresholds fitted on such
        scores flag more new good images than they promise."""
        fitted = self.__dict__.pop("_fit_patches", None)
        if fitted is None:
            feats, owners = self._collect(batches)
            center = torch.zeros_like(feats[0])
        else:
            feats, center, owners = fitted  # feats centered by the full fit's center
        n = int(owners.max()) + 1
        k = min(self.hparams.leave_out_folds, n)
        fold_of = torch.arange(n) * k // n
        scores = torch.empty(n)
        saved = (self.net.center.clone(), self.net.memory_bank, self.net.bank_source)
        try:
            for f in fit_progress(range(k), "PatchCore: leave-out folds"):
                members = (fold_of == f).nonzero().flatten()  # a contiguous block of images
                lo, hi = int(members[0]), int(members[-1]) + 1
                keep = (owners < lo) | (owners >= hi)
                rest = feats[keep].add_(center)  # a copy, back in feature coordinates
                fold_center, self.net.memory_bank, self.net.bank_source = self._memory(rest, owners[keep])
                del rest
                self.net.center.copy_(fold_center)
                with torch.no_grad():
                    for x, at in images_in_range(batches, lo, hi):
                        emb, _ = self.net.embed(x.to(self.device))
                        dist, idx = self.net.patch_scores(emb)
                        scores[at : at + len(x)] = self.net.image_scores(emb, dist, idx)[0].cpu()
        finally:
            self.net.center.copy_(saved[0])
            self.net.memory_bank, self.net.bank_source = saved[1], saved[2]
        return scores

    # ------------------------------------------------------------------ scoring
    def score(self, x: torch.Tensor) -> Scores:
        """Image scores (B,) and pixel maps (B, S, S) for images in [-1, 1]."""
        check(self.stats_ready, "PatchCore has no memory bank yet: fit it first (train=true)")
        with torch.no_grad():
            feats, grid = self.net.embed(x)
            dist, idx = self.net.patch_scores(feats)
            reweighted, s_star = self.net.image_scores(feats, dist, idx)
            raw, smooth = self.net.maps(dist, grid)
        return {"reweighted": reweighted, "max_distance": s_star}, {
            "distance_smooth": smooth,
            "distance": raw,
        }

    def scorer(self) -> nn.Module:
        """A copy of the network (bank included) in eval mode: x -> (smoothed map (B, S, S), score (B,))."""
        return copy.deepcopy(self.net).eval()

    def map_scale(self, name: str) -> float:
        return float(self.net.memory_bank.norm(dim=1).mean()) if self.stats_ready else 1.0
