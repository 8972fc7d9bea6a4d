"""DRAEM networks (Zavrtanik et al., ICCV 2021), as in the official ``model_unet.py``.

A reconstructive encoder-decoder (no skip connections, base width 128) maps an image to its
anomaly-free reconstruction; a discriminative U-Net (base width 64) takes the reconstruction and
the image, concatenated on channels, and predicts two-class logits per pixel. Module and attribute
names follow the official code, so its state dicts load with ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _block(cin: int, cmid: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU layers."""
    return nn.Sequential(*_conv_bn_relu(cin, cmid), *_conv_bn_relu(cmid, cout))


def _up(cin: int, cout: int) -> nn.Sequential:
    """x2 bilinear upsampling (align_corners=True) then 3x3 conv + BN + ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_conv_bn_relu(cin, cout)
    )


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.MaxPool2d(2))


def weights_init(m: nn.Module) -> None:
    """The official ``weights_init``: conv weights N(0, 0.02), BN weights N(1, 0.02) and biases 0."""
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class EncoderReconstructive(nn.Module):
    def __init__(self, in_channels: int, w: int) -> None:
        super().__init__()
        self.block1 = _block(in_channels, w, w)
        self.mp1 = _pool()
        self.block2 = _block(w, 2 * w, 2 * w)
        self.mp2 = _pool()
        self.block3 = _block(2 * w, 4 * w, 4 * w)
        self.mp3 = _pool()
        self.block4 = _block(4 * w, 8 * w, 8 * w)
        self.mp4 = _pool()
        self.block5 = _block(8 * w, 8 * w, 8 * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.block1(x)
        b2 = self.block2(self.mp1(b1))
        b3 = self.block3(self.mp2(b2))
        b4 = self.block4(self.mp3(b3))
        return self.block5(self.mp4(b4))


class DecoderReconstructive(nn.Module):
    def __init__(self, w: int, out_channels: int) -> None:
        super().__init__()
        self.up1 = _up(8 * w, 8 * w)
        self.db1 = _block(8 * w, 8 * w, 4 * w)
        self.up2 = _up(4 * w, 4 * w)
        self.db2 = _block(4 * w, 4 * w, 2 * w)
        self.up3 = _up(2 * w, 2 * w)
        self.db3 = _block(2 * w, 2 * w, w)
        self.up4 = _up(w, w)
        self.db4 = _block(w, w, w)
        self.fin_out = nn.Sequential(nn.Conv2d(w, out_channels, kernel_size=3, padding=1))

    def forward(self, b5: torch.Tensor) -> torch.Tensor:
        x = self.db1(self.up1(b5))
        x = self.db2(self.up2(x))
        x = self.db3(self.up3(x))
        x = self.db4(self.up4(x))
        return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Module):
    """Encoder-decoder without skips (4 poolings): image -> reconstruction, ``in_channels`` -> ``out_channels``."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128) -> None:
        super().__init__()
        self.encoder = EncoderReconstructive(in_channels, base_width)
        self.decoder = DecoderReconstructive(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class EncoderDiscriminative(nn.Module):
    def __init__(self, in_channels: int, w: int) -> None:
        super().__init__()
        self.block1 = _block(in_channels, w, w)
        self.mp1 = _pool()
        self.block2 = _block(w, 2 * w, 2 * w)
        self.mp2 = _pool()
        self.block3 = _block(2 * w, 4 * w, 4 * w)
        self.mp3 = _pool()
        self.block4 = _block(4 * w, 8 * w, 8 * w)
        self.mp4 = _pool()
        self.block5 = _block(8 * w, 8 * w, 8 * w)
        self.mp5 = _pool()
        self.block6 = _block(8 * w, 8 * w, 8 * w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b1 = self.block1(x)
        b2 = self.block2(self.mp1(b1))
        b3 = self.block3(self.mp2(b2))
        b4 = self.block4(self.mp3(b3))
        b5 = self.block5(self.mp4(b4))
        b6 = self.block6(self.mp5(b5))
        return b1, b2, b3, b4, b5, b6


class DecoderDiscriminative(nn.Module):
    def __init__(self, w: int, out_channels: int) -> None:
        super().__init__()
        self.up_b = _up(8 * w, 8 * w)
        self.db_b = _block(16 * w, 8 * w, 8 * w)
        self.up1 = _up(8 * w, 4 * w)
        self.db1 = _block(12 * w, 4 * w, 4 * w)
        self.up2 = _up(4 * w, 2 * w)
        self.db2 = _block(6 * w, 2 * w, 2 * w)
        self.up3 = _up(2 * w, w)
        self.db3 = _block(3 * w, w, w)
        self.up4 = _up(w, w)
        self.db4 = _block(2 * w, w, w)
        self.fin_out = nn.Sequential(nn.Conv2d(w, out_channels, kernel_size=3, padding=1))

    def forward(self, b1, b2, b3, b4, b5, b6) -> torch.Tensor:  # noqa: ANN001
        x = self.db_b(torch.cat((self.up_b(b6), b5), dim=1))
        x = self.db1(torch.cat((self.up1(x), b4), dim=1))
        x = self.db2(torch.cat((self.up2(x), b3), dim=1))
        x = self.db3(torch.cat((self.up3(x), b2), dim=1))
        x = self.db4(torch.cat((self.up4(x), b1), dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    """U-Net with skips (5 poolings): (reconstruction, image) -> per-pixel logits."""

    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_channels: int = 64) -> None:
        super().__init__()
        self.encoder_segment = EncoderDiscriminative(in_channels, base_channels)
        self.decoder_segment = DecoderDiscriminative(base_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_segment(*self.encoder_segment(x))


class DraemNet(nn.Module):
    """Both sub-networks: ``forward(x01) -> (reconstruction, logits)`` for images in [0, 1].

    Image sides must be multiples of 32 (five poolings in the discriminative U-Net).
    """

    def __init__(self, in_channels: int = 3, recon_base_width: int = 128, disc_base_width: int = 64) -> None:
        super().__init__()
        self.reconstructive = ReconstructiveSubNetwork(in_channels, in_channels, recon_base_width)
        self.discriminative = DiscriminativeSubNetwork(2 * in_channels, 2, disc_base_width)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.reconstructive(x)
        # not detached in training, as in the official train_DRAEM.py: the focal loss also reaches
        # the reconstructive network
        logits = self.discriminative(torch.cat((rec, x), dim=1))
        return rec, logits
