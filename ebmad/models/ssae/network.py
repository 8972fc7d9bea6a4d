"""The SSAE autoencoder: a U-Net-like encoder/decoder with a stacked-dilated-convolution bottleneck.

Bauer, Nakajima & Mueller report two variants: SDC-AE (no skip connections) and SDC-CCM, whose skip
connections are convex combination modules (CCM). Encoder stages halve the resolution; the
bottleneck is a stack of SDC blocks (parallel 3x3 convolutions at several dilation rates, concatenated
and fused); the decoder doubles the resolution back and, with CCM, mixes in the encoder features of the
same scale as ``a * enc + (1 - a) * dec`` with a per-pixel, per-channel gate ``a = sigmoid(conv([enc, dec]))``.

Plain ``torch.nn`` only (Conv2d, ConvTranspose2d, BatchNorm2d, ReLU, sigmoid), so it exports to ONNX
with a dynamic batch. Input and output are images in [0, 1]; the output layer is linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution (same padding), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SDCBlock(nn.Module):
    """Stacked dilated convolutions: parallel 3x3 branches at each dilation, concatenated, fused by 1x1, residual."""

    def __init__(self, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        branch = -(-channels // len(dilations))  # ceil: the concatenation has at least `channels` channels
        self.branches = nn.ModuleList(conv_bn_relu(channels, branch, dilation=d) for d in dilations)
        self.fuse = nn.Sequential(
            nn.Conv2d(branch * len(dilations), channels, 1, bias=False), nn.BatchNorm2d(channels)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.fuse(torch.cat([b(x) for b in self.branches], dim=1)))


class ConvexCombination(nn.Module):
    """CCM skip connection: ``a * enc + (1 - a) * dec``, ``a = sigmoid(conv3x3([enc, dec]))`` in (0, 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(2 * channels, channels, 3, padding=1)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.gate(torch.cat([enc, dec], dim=1)))
        return a * enc + (1 - a) * dec


class SSAENet(nn.Module):
    """Autoencoder ``f``: corrupted image in [0, 1] -> restored image (same shape).

    ``widths[0]`` is the full-resolution width; each further width adds a stride-2 stage, so image
    sides must be divisible by ``2 ** (len(widths) - 1)``. ``skip="ccm"`` is SDC-CCM, ``"none"`` SDC-AE.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        sdc_blocks: int = 4,
        dilations: Sequence[int] = (1, 2, 4, 8, 16, 32),
        skip: str = "ccm",
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"model.in_channels must be 1 or 3, got {in_channels}")
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"model.widths needs at least two positive widths, got {list(widths)}")
        if sdc_blocks < 0 or not dilations or min(dilations) < 1:
            raise ValueError(
                f"model.sdc_blocks must be >= 0 and model.dilations positive, got {sdc_blocks}, {list(dilations)}"
            )
        if skip not in ("ccm", "none"):
            raise ValueError(f"model.skip must be 'ccm' or 'none', got {skip!r}")
        self.widths, self.skip = list(widths), skip
        self.stem = nn.Sequential(conv_bn_relu(in_channels, widths[0]), conv_bn_relu(widths[0], widths[0]))
        pairs = list(zip(widths[:-1], widths[1:], strict=True))  # (finer, coarser) width per stage
        self.down = nn.ModuleList(
            nn.Sequential(conv_bn_relu(a, b, stride=2), conv_bn_relu(b, b)) for a, b in pairs
        )
        self.bottleneck = nn.Sequential(*(SDCBlock(widths[-1], dilations) for _ in range(sdc_blocks)))
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in pairs)
        ccm = widths[:-1] if skip == "ccm" else []
        self.merge = nn.ModuleList(ConvexCombination(a) for a in ccm)
        self.dec = nn.ModuleList(nn.Sequential(conv_bn_relu(a, a), conv_bn_relu(a, a)) for a in widths[:-1])
        self.head = nn.Conv2d(widths[0], in_channels, 1)

    @property
    def divisor(self) -> int:
        """Image sides must be multiples of this."""
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        skips = [h]
        for stage in self.down:
            h = stage(h)
            skips.append(h)
        h = self.bottleneck(skips.pop())
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if self.skip == "ccm":
                h = self.merge[i](skips[i], h)
            h = self.dec[i](h)
        return self.head(h)
