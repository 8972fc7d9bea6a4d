"""The all-convolutional energy network of Genc et al., Table 3."""

from __future__ import annotations

import math

import torch
from torch import nn

PAPER_WIDTHS = (64, 128, 256, 256, 256)


def stage_widths(image_size: int, widths: tuple[int, ...] = PAPER_WIDTHS) -> list[int]:
    """Output widths of the stride-2 stages for a square input of ``image_size``.

    Each 4x4/s2 stage halves the resolution; the final 4x4/s1/p0 conv needs a 4x4 map,
    so there are ``log2(image_size / 4)`` stages. The paper's 128x128 net has five;
    smaller inputs drop trailing stages, larger inputs repeat the last width.
    """
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"model.image_size must be a power of two >= 8, got {image_size}")
    n = int(math.log2(image_size // 4))
    return [widths[min(i, len(widths) - 1)] for i in range(n)]


class EnergyNet(nn.Module):
    """E(x): 3x3 conv to ``base`` channels, 4x4/s2 convs, a 4x4/s1/p0 conv to one scalar; ELU between."""

    def __init__(self, in_channels: int = 3, image_size: int = 128, base: int = 32) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"model.in_channels must be 1 or 3, got {in_channels}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base, 3, 1, 1), nn.ELU()]
        prev = base
        for width in stage_widths(image_size):
            layers += [nn.Conv2d(prev, width, 4, 2, 1), nn.ELU()]
            prev = width
        layers.append(nn.Conv2d(prev, 1, 4, 1, 0))
        self.body = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Energy per sample, shape (B,)."""
        return self.body(x).flatten(1).squeeze(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map h (B, C, 4, 4), before the final 4x4 conv (the energy head)."""
        return self.body[:-1](x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Energy (B,) from the last feature map."""
        return self.body[-1](h).flatten(1).squeeze(1)

    def patch_contributions(self, h: torch.Tensor) -> torch.Tensor:
        """The energy split over the 4x4 positions of the last feature map, (B, 4, 4), bias left out.

        The head is linear, so E(x) = bias + sum of these: each entry is the energy of one receptive-field
        patch of the input (at 128x128 a 4x4 grid of overlapping patches).
        """
        return (h * self.body[-1].weight[0]).sum(1)


def apply_spectral_norm(net: EnergyNet) -> EnergyNet:
    """Spectral normalization (Miyato et al.) of every conv of ``net``, in place."""
    for i, m in enumerate(net.body):
        if isinstance(m, nn.Conv2d):
            net.body[i] = nn.utils.parametrizations.spectral_norm(m)
    return net
