"""Synthetic defects planted into defect-free tensors: a validation signal that needs no test labels.

Hyperparameter search must not look at the test set. Instead, a held-out part of ``train/good`` is
scored twice: as is (normal) and with a planted defect (anomalous, with its mask). Defects are an
off-colour elliptical spot (colours inverted) or a bright/dark line segment, drawn with a seeded
generator so every trial is judged on the same images.
"""

from __future__ import annotations

import math

import torch


def _grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size, device=device, dtype=torch.float32),
                            torch.arange(size, device=device, dtype=torch.float32), indexing="ij")  # fmt: skip
    return yy, xx


def plant_defects(images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (defective copies, boolean masks) of a batch (N, C, H, W) of images in [-1, 1]."""
    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = _grid(h, images.device)
    out, masks = images.clone(), torch.zeros(n, h, w, dtype=torch.bool, device=images.device)
    for i in range(n):
        u = torch.rand(6, generator=g).tolist()
        cy, cx = (0.2 + 0.6 * u[0]) * h, (0.2 + 0.6 * u[1]) * w
        if u[2] < 0.5:  # spot
            ry, rx = (0.06 + 0.08 * u[3]) * h, (0.06 + 0.08 * u[4]) * w
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            out[i][:, m] = -0.8 * images[i][:, m]
        else:  # scratch
            angle, length, width = math.pi * u[3], (0.25 + 0.25 * u[4]) * h, max(1.0, h / 48)
            dx, dy = math.cos(angle), math.sin(angle)
            t = (xx - cx) * dx + (yy - cy) * dy
            d = (-(xx - cx) * dy + (yy - cy) * dx).abs()
            m = (t.abs() <= length / 2) & (d <= width)
            out[i][:, m] = 0.9 if u[5] < 0.5 else -0.9
        masks[i] = m
    return out, masks
