"""Batched Perlin noise and DRAEM's anomaly-shape masks, on the device of a ``torch.Generator``.

Shared by DRAEM's training synthesis and the label-free validation anomalies (:mod:`ebmad.synthesis.kinds`).

Follows the official ``rand_perlin_2d_np`` (gradient noise with the quintic fade, scaled by sqrt(2))
and ``augment_image`` of ``data_loader.py``: per image the lattice resolution is 2^U{0..5}
independently per axis, the noise is rotated by U(-90, 90) degrees (bilinear, zero fill, as the
``iaa.Affine(rotate=(-90, 90))`` there) and thresholded at 0.5.
"""

from __future__ import annotations

import math

import torch
from kornia.geometry.transform import rotate

MAX_SCALE_EXP = 5  # official: 2 ** torch.randint(0, 6)


def _fade(t: torch.Tensor) -> torch.Tensor:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(angles: torch.Tensor, res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Perlin noise (B, H, W) from lattice gradient angles.

    Args:
        angles: (B, R0 + 1, R1 + 1) gradient angles in radians; image b uses ``angles[b, :res0+1, :res1+1]``.
        res: (B, 2) integer lattice resolution (rows, columns) per image.
        size: output (H, W).
    """
    n, rows, cols = angles.shape
    h, w = size
    res = res.to(device=angles.device, dtype=angles.dtype)
    # pixel i sits at lattice coordinate i * res / size (the official np.mgrid grid)
    u = torch.arange(h, device=angles.device, dtype=angles.dtype)[None] * res[:, :1] / h  # (B, H)
    v = torch.arange(w, device=angles.device, dtype=angles.dtype)[None] * res[:, 1:] / w  # (B, W)
    iu, iv = u.floor().long(), v.floor().long()
    fu, fv = (u - iu)[:, :, None], (v - iv)[:, None, :]  # (B, H, 1), (B, 1, W)
    gx, gy = torch.cos(angles).reshape(n, rows * cols), torch.sin(angles).reshape(n, rows * cols)

    def corner(du: int, dv: int) -> torch.Tensor:
        idx = ((iu + du)[:, :, None] * cols + (iv + dv)[:, None, :]).reshape(n, h * w)
        cos_a, sin_a = torch.gather(gx, 1, idx).view(n, h, w), torch.gather(gy, 1, idx).view(n, h, w)
        return (fu - du) * cos_a + (fv - dv) * sin_a

    tu, tv = _fade(fu), _fade(fv)
    n0 = torch.lerp(corner(0, 0), corner(1, 0), tu)
    n1 = torch.lerp(corner(0, 1), corner(1, 1), tu)
    return math.sqrt(2) * torch.lerp(n0, n1, tv)


def rand_perlin_noise(
    n: int, size: tuple[int, int], generator: torch.Generator, max_exp: int = MAX_SCALE_EXP
) -> torch.Tensor:
    """Perlin noise (n, H, W) with resolution 2^U{0..max_exp} per axis and uniform gradient angles."""
    dev = generator.device
    res = 2 ** torch.randint(0, max_exp + 1, (n, 2), device=dev, generator=generator)
    side = 2**max_exp + 1
    angles = 2 * math.pi * torch.rand(n, side, side, device=dev, generator=generator)
    return perlin_noise(angles, res, size)


def rand_perlin_mask(
    n: int, size: int | tuple[int, int], generator: torch.Generator, threshold: float = 0.5
) -> torch.Tensor:
    """Anomaly masks (n, 1, H, W) with values in {0, 1}: rotated Perlin noise > ``threshold``."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    noise = rand_perlin_noise(n, size, generator)[:, None]
    angle = torch.rand(n, device=generator.device, generator=generator) * 180.0 - 90.0
    noise = rotate(noise, angle, mode="bilinear", padding_mode="zeros", align_corners=True)
    return (noise > threshold).to(noise.dtype)
