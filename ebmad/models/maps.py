"""Anomaly-map post-processing shared by the methods: Gaussian smoothing and upsampling to the image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GaussianSmoothing(nn.Module):
    """Separable Gaussian filter of maps (B, H, W), edges replicated (scipy ``mode="nearest"``, truncate 4).

    ``sigma=0`` is the identity. The kernel is a non-persistent buffer derived from ``sigma``.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.radius = int(4.0 * sigma + 0.5) if sigma > 0 else 0
        t = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigma) ** 2) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", (k / k.sum()).view(1, 1, 1, -1), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return maps
        r = self.radius
        x = F.pad(maps[:, None], (r, r, r, r), mode="replicate")
        x = F.conv2d(x, self.kernel)  # along width
        x = F.conv2d(x, self.kernel.transpose(2, 3))  # along height
        return x[:, 0]


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps (B, h, w) -> (B, size, size), bilinear (the patch grid onto the image)."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def patch_map(dist: torch.Tensor, grid: tuple[int, int], size: int, smooth: nn.Module
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Patch scores (B, h*w) -> (upsampled map, smoothed map), each (B, size, size)."""
    raw = upsample(dist.reshape(-1, *grid), size)
    return raw, smooth(raw)
