"""PatchCore (Roth et al., CVPR 2022) as a plain module: patch features, memory bank, scores.

Scores of an image: each patch feature's distance to its nearest memory-bank feature (the patch map, upsampled
to the image and Gaussian-smoothed), and the paper's reweighted image score (eq. 7): with m_test* the patch of
largest distance s*, m* its nearest bank feature and N_b(m*) the b bank features nearest to m* (m* included),
s = (1 - exp(|m_test* - m*|) / sum_{m in N_b(m*)} exp(|m_test* - m|)) * s*.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ebmad.models.backbones import Backbone, PatchFeatures
from ebmad.models.maps import GaussianSmoothing, patch_map
from ebmad.models.patchcore.memory import nearest


class PatchCore(nn.Module):
    """Images (B, C, S, S) in [-1, 1] -> (smoothed distance map (B, S, S), reweighted score (B,)).

    Buffers: ``memory_bank`` (M, D) (stored minus ``center``, the mean of the fitted features, for accurate
    distances), ``bank_source`` (M,) the index of the training image each bank feature came from.
    """

    output_names = ("pixel_map", "image_score")

    def __init__(self, image_size: int, backbone: str = "efficientnet_lite0",
                 layers: Sequence[str] = ("stage3", "stage5"), backbone_weights: str | None = None,
                 num_neighbors: int = 9, smooth_sigma: float = 4.0) -> None:  # fmt: skip
        super().__init__()
        self.features = PatchFeatures(Backbone(backbone, layers, backbone_weights))
        self.image_size, self.num_neighbors = image_size, num_neighbors
        self.smooth = GaussianSmoothing(smooth_sigma)
        dim = self.features.dim
        self.register_buffer("memory_bank", torch.zeros(0, dim))
        self.register_buffer("bank_source", torch.zeros(0, dtype=torch.long))
        self.register_buffer("center", torch.zeros(dim))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("memory_bank", "bank_source"):  # fitted sizes: take the stored shape
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.center.device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def patch_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch features (B, h*w, D) and the grid (h, w)."""
        f = self.features(x)
        b, d, h, w = f.shape
        return f.permute(0, 2, 3, 1).reshape(b, h * w, d), (h, w)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch features minus ``center`` (the bank's coordinates) and the grid (h, w)."""
        f, grid = self.patch_features(x)
        return f - self.center, grid

    def patch_scores(self, feats: torch.Tensor, owner: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Nearest-bank distances (B, P) and bank indices (B, P); ``owner`` (B,): the training image each
        image is, whose own bank features it may not use (leave-one-out), or None."""
        b, p, d = feats.shape
        q_owner = owner.repeat_interleave(p) if owner is not None else None
        dist, idx = nearest(feats.reshape(b * p, d), self.memory_bank, 1, q_owner, self.bank_source)
        return dist.view(b, p), idx.view(b, p)

    def image_scores(self, feats: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor,
                     owner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(reweighted score (B,), max patch distance s* (B,)) from :meth:`patch_scores`."""
        s_star, j = dist.max(dim=1)
        m_star = idx.gather(1, j[:, None])[:, 0]
        q = feats[torch.arange(feats.shape[0], device=feats.device), j]  # (B, D) the most anomalous patch
        k = min(self.num_neighbors, len(self.memory_bank))
        _, support = nearest(self.memory_bank[m_star], self.memory_bank, k, owner, self.bank_source)
        d = (q[:, None, :] - self.memory_bank[support]).pow(2).sum(-1).sqrt()  # (B, b)
        weight = 1 - torch.exp(s_star - torch.logsumexp(d, dim=1))
        return weight * s_star, s_star

    def maps(self, dist: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(upsampled distance map, smoothed map), each (B, S, S)."""
        return patch_map(dist, grid, self.image_size, self.smooth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, grid = self.embed(x)
        dist, idx = self.patch_scores(feats)
        score, _ = self.image_scores(feats, dist, idx)
        return self.maps(dist, grid)[1], score
