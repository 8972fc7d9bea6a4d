"""DRAEM's simulated anomalies, batched: Perlin-shaped patches of an augmented texture.

Used by DRAEM's training (its equality with the official code is tested) and by the EBM's energy-margin
term (``model.oe_weight``), which draws every image anomalous (``anomaly_prob=1``).

As the official ``augment_image``: mask M from thresholded, rotated Perlin noise; texture A
augmented by 3 random operations; I_a = I (1 - M) + (1 - b) A M + b I M with b ~ U[0, 0.8);
half of the images (p = 0.5) are left clean with an all-zero mask, and an image whose Perlin mask
came out empty counts as normal (has_anomaly 0). Composed from the shared :mod:`ebmad.synthesis`
pieces (Perlin masks, texture sources, blend); ``blend`` stays importable from here.
"""

from __future__ import annotations

import torch
from kornia.color import rgb_to_grayscale

from ebmad.synthesis.augment import rand_augment
from ebmad.synthesis.blend import blend
from ebmad.synthesis.perlin import rand_perlin_mask
from ebmad.synthesis.textures import TextureSource

BETA_MAX = 0.8  # official: beta = torch.rand(1) * 0.8
CLEAN_PROB = 0.5  # official: no_anomaly = torch.rand(1) > 0.5
__all__ = ["BETA_MAX", "CLEAN_PROB", "blend", "synthesize"]


def synthesize(
    images01: torch.Tensor,
    textures: TextureSource,
    generator: torch.Generator,
    augment: bool = True,
    anomaly_prob: float = 1 - CLEAN_PROB,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simulated anomalies for a batch (B, C, H, W) in [0, 1], C = 1 or 3.

    Returns (augmented images (B, C, H, W), masks (B, 1, H, W) in {0, 1}, has_anomaly (B,) in {0, 1}).
    Textures are RGB; for one-channel images they are converted to grayscale after augmentation.
    ``augment=False`` skips the texture augmentation (for tests). ``anomaly_prob``: the share of images that
    get an anomaly (DRAEM: 0.5); the random draws are the same for every value.
    """
    n, c, h, w = images01.shape
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    dev = generator.device
    mask = rand_perlin_mask(n, (h, w), generator).to(images01.dtype)
    tex = textures.sample(n, generator).to(images01.dtype)
    if augment:
        tex = rand_augment(tex, generator)
    if c == 1 and tex.shape[1] == 3:
        tex = rgb_to_grayscale(tex)
    beta = BETA_MAX * torch.rand(n, device=dev, generator=generator).to(images01.dtype)
    anomalous = torch.rand(n, device=dev, generator=generator) <= anomaly_prob
    mask = mask * anomalous.to(mask.dtype)[:, None, None, None]
    augmented = blend(images01, tex, mask, beta)
    has_anomaly = (mask.flatten(1).amax(1) > 0).to(images01.dtype)
    return augmented, mask, has_anomaly
