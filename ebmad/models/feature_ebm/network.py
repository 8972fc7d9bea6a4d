"""An energy over pretrained patch features: e(f) = e_prior(f) + e_theta(f), as a plain module.

Patch features f (D channels per grid position) are PatchCore's: a frozen ImageNet backbone, 3x3-averaged
stages concatenated on the finest grid (:class:`~ebmad.models.backbones.PatchFeatures`).

- ``e_prior``: a fixed, fitted prior. ``knn``: the distance to the nearest feature of a coreset memory bank
  (PatchCore's patch score); ``gaussian``: half the squared Mahalanobis distance to the position's Gaussian
  (PaDiM's model, on these features); ``none``: 0.
- ``e_theta``: a small learned head on the standardized feature z = (f - mu) / sigma (per channel): an
  optional 1x1 adaptor (initialized to the identity), then 1x1 convolutions with ELU; its last layer starts at
  zero, so an untrained model is its prior exactly.

Scores: the patch-energy map and its maximum; the paper's gradient maps are taken through the whole chain
(backbone included) by the LightningModule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ebmad.models.backbones import Backbone, PatchFeatures
from ebmad.models.maps import GaussianSmoothing, patch_map
from ebmad.models.padim.network import squared_mahalanobis
from ebmad.models.patchcore.memory import nearest

PRIORS = ("knn", "gaussian", "none")


class EnergyHead(nn.Module):
    """e_theta: (n, D) standardized patch features -> (n,) energies; last layer zero-initialized."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 2, adaptor: bool = False) -> None:
        super().__init__()
        self.adaptor = nn.Linear(dim, dim) if adaptor else None
        if self.adaptor is not None:
            nn.init.eye_(self.adaptor.weight)
            nn.init.zeros_(self.adaptor.bias)
        body: list[nn.Module] = []
        width = dim
        for _ in range(layers):
            body += [nn.Linear(width, hidden), nn.ELU()]
            width = hidden
        self.body = nn.Sequential(*body)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.adaptor is not None:
            z = self.adaptor(z)
        return self.out(self.body(z))[..., 0]


class FeatureEnergy(nn.Module):
    """Images (B, C, S, S) in [-1, 1] -> (smoothed patch-energy map (B, S, S), max patch energy (B,)).

    Buffers: ``feat_mean``/``feat_std`` (D,) channel statistics of the training patches; ``memory_bank``
    (M, D) and ``center`` (knn prior); ``prior_mean`` (P, D) / ``prior_inv_cov`` (P, D, D) (gaussian prior).
    """

    output_names = ("pixel_map", "image_score")

    def __init__(self, image_size: int, backbone: str = "efficientnet_lite0",
                 layers: Sequence[str] = ("stage3", "stage5"), backbone_weights: str | None = None,
                 prior: str = "knn", head_hidden: int = 256, head_layers: int = 2, adaptor: bool = False,
                 smooth_sigma: float = 4.0) -> None:  # fmt: skip
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"model.prior must be one of {PRIORS}, got {prior!r}")
        self.features = PatchFeatures(Backbone(backbone, layers, backbone_weights))
        self.image_size, self.prior = image_size, prior
        dim, side = self.features.dim, self.features.grid(image_size)
        self.head = EnergyHead(dim, head_hidden, head_layers, adaptor)
        self.smooth = GaussianSmoothing(smooth_sigma)
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.register_buffer("memory_bank", torch.zeros(0, dim))
        self.register_buffer("center", torch.zeros(dim))
        gaussian = prior == "gaussian"
        self.register_buffer("prior_mean", torch.zeros(side * side if gaussian else 0, dim))
        self.register_buffer("prior_inv_cov", torch.zeros(side * side if gaussian else 0, dim, dim))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "memory_bank" in state_dict:  # the fitted bank's size
            self.memory_bank = torch.empty_like(state_dict[prefix + "memory_bank"], device=self.center.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def patch_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch features (B, P, D) and the grid (h, w)."""
        f = self.features(x)
        b, d, h, w = f.shape
        return f.permute(0, 2, 3, 1).reshape(b, h * w, d), (h, w)

    def standardize(self, f: torch.Tensor) -> torch.Tensor:
        return (f - self.feat_mean) / self.feat_std

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.feat_std + self.feat_mean

    def prior_energy(self, f: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """e_prior of patch features f (..., D); ``positions`` (same leading shape) index the grid for the
        gaussian prior (default: f is (B, P, D) in grid order)."""
        if self.prior == "none":
            return f.new_zeros(f.shape[:-1])
        if self.prior == "knn":
            flat = f.reshape(-1, f.shape[-1]) - self.center
            return nearest(flat, self.memory_bank, 1)[0].reshape(f.shape[:-1])
        if positions is None:
            return 0.5 * squared_mahalanobis(f, self.prior_mean, self.prior_inv_cov)
        delta = f - self.prior_mean[positions]
        return 0.5 * torch.einsum("ni,nij,nj->n", delta, self.prior_inv_cov[positions], delta)

    def energy(self, f: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Patch energies e_prior(f) + e_theta(f) of features f (..., D)."""
        return self.prior_energy(f, positions) + self.head(self.standardize(f))

    def patch_energies(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch energies (B, P) of images and the grid (h, w)."""
        f, grid = self.patch_features(x)
        return self.energy(f), grid

    def maps(self, e: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(upsampled patch-energy map, smoothed map), each (B, S, S)."""
        return patch_map(e, grid, self.image_size, self.smooth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, grid = self.patch_energies(x)
        return self.maps(e, grid)[1], e.amax(dim=1)
