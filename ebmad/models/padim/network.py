"""PaDiM (Defard et al., ICPR 2020 workshops) as a plain module: a Gaussian per feature-grid position.

Patch embedding: the backbone's stages upsampled to the finest one's grid and concatenated, then a fixed random
subset of ``n_features`` channels (the paper's random dimensionality reduction). Fit: per position the mean and
covariance of the training embeddings, plus ``epsilon`` I (the paper's 0.01). Score: the Mahalanobis distance
per position, upsampled to the image and Gaussian-smoothed; the image score is the map's maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ebmad.models.backbones import Backbone, PatchFeatures
from ebmad.models.maps import GaussianSmoothing, patch_map


class GaussianSums:
    """Running sums (count, sum x, sum x x^T) of embeddings (B, P, d) per position, in float64."""

    def __init__(self, positions: int, dim: int, device: torch.device) -> None:
        self.n = 0
        self.s1 = torch.zeros(positions, dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(positions, dim, dim, dtype=torch.float64, device=device)

    def add(self, emb: torch.Tensor) -> None:
        e = emb.double()
        self.n += len(e)
        self.s1 += e.sum(0)
        self.s2 += torch.einsum("bpi,bpj->pij", e, e)

    def minus(self, other: GaussianSums) -> GaussianSums:
        out = GaussianSums.__new__(GaussianSums)
        out.n, out.s1, out.s2 = self.n - other.n, self.s1 - other.s1, self.s2 - other.s2
        return out

    def mean_and_inverse(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (P, d) and inverse of (unbiased covariance + epsilon I) (P, d, d), as float32."""
        if self.n < 2:
            raise ValueError(f"PaDiM needs at least 2 training images for a covariance, got {self.n}")
        mean = self.s1 / self.n
        cov = (self.s2 - self.n * mean[:, :, None] * mean[:, None, :]) / (self.n - 1)
        cov += epsilon * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return mean.float(), torch.linalg.inv(cov).float()


def squared_mahalanobis(emb: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances (B, P) of embeddings (B, P, d) to per-position Gaussians (P, d), (P, d, d)."""
    delta = emb - mean
    return torch.einsum("bpi,pij,bpj->bp", delta, inv_cov, delta)


class Padim(nn.Module):
    """Images (B, C, S, S) in [-1, 1] -> (smoothed Mahalanobis map (B, S, S), its maximum (B,)).

    Buffers: ``channel_index`` (d,) the chosen channels, ``mean`` (P, d), ``inv_cov`` (P, d, d).
    """

    output_names = ("pixel_map", "image_score")

    def __init__(self, image_size: int, backbone: str = "efficientnet_lite0",
                 layers: Sequence[str] = ("stage2", "stage3", "stage5"), backbone_weights: str | None = None,
                 n_features: int = 100, smooth_sigma: float = 4.0, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.features = PatchFeatures(Backbone(backbone, layers, backbone_weights), neighbourhood=1)
        self.image_size = image_size
        self.smooth = GaussianSmoothing(smooth_sigma)
        total = self.features.dim
        if not 1 <= n_features <= total:
            raise ValueError(
                f"model.n_features must be in [1, {total}] (the stages' channels), got {n_features}"
            )
        index = (
            torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_features].sort().values
        )
        side = self.features.grid(image_size)
        self.register_buffer("channel_index", index)
        self.register_buffer("mean", torch.zeros(side * side, n_features))
        self.register_buffer("inv_cov", torch.zeros(side * side, n_features, n_features))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embeddings (B, P, d) and the grid (h, w)."""
        f = self.features(x).index_select(1, self.channel_index)
        b, d, h, w = f.shape
        return f.permute(0, 2, 3, 1).reshape(b, h * w, d), (h, w)

    def distances(self, emb: torch.Tensor, mean: torch.Tensor | None = None,
                  inv_cov: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Mahalanobis distance (B, P) of each embedding to its position's Gaussian (the fitted one by default)."""
        sq = squared_mahalanobis(
            emb, self.mean if mean is None else mean, self.inv_cov if inv_cov is None else inv_cov
        )
        return sq.clamp_min(0).sqrt()

    def maps(self, dist: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(upsampled distance map, smoothed map), each (B, S, S)."""
        return patch_map(dist, grid, self.image_size, self.smooth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, grid = self.embed(x)
        smooth = self.maps(self.distances(emb), grid)[1]
        return smooth, smooth.amax(dim=(1, 2))
