"""Structured (non-i.i.d.) corruption of defect-free images: the SSAE's self-supervision.

Each image gets 1..``max_regions`` irregular regions (a randomly rotated ellipse whose border is
roughened by smooth noise). A region is filled with one of

- ``texture``: a randomly rotated/scaled/shifted texture: a folder image (``model.anomaly_source_dir``,
  e.g. DTD) if given, else another image of the batch or procedural value noise (half each);
- ``elastic``: the image itself, elastically deformed (smooth random displacement field);
- ``color``: a flat random colour (an occlusion),

blended in with a random opacity in [``opacity_min``, 1]. Pixels outside the returned mask are
bit-identical to the input. Everything is batched on the images' device, and every random number comes
from the passed ``torch.Generator``, so a seed fixes the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ebmad.synthesis.textures import FolderTextures, value_noise  # shared with DRAEM and validation

FILLS = ("texture", "elastic", "color")


class StructuredCorruption:
    """``corrupt(images01, generator) -> (corrupted, mask)`` for images (N, C, H, W) in [0, 1]."""

    def __init__(
        self,
        max_regions: int = 3,
        region_min: float = 0.05,
        region_max: float = 0.4,
        roughness: float = 0.5,
        opacity_min: float = 0.3,
        fill_weights: Sequence[float] = (0.5, 0.3, 0.2),
        elastic_strength: float = 0.05,
        clean_prob: float = 0.0,
        textures: FolderTextures | None = None,
    ) -> None:
        if max_regions < 1:
            raise ValueError(f"model.max_regions must be >= 1, got {max_regions}")
        if not 0 < region_min <= region_max <= 1:
            raise ValueError(
                f"need 0 < model.region_min <= model.region_max <= 1, got {region_min}, {region_max}"
            )
        if not 0 <= roughness < 1:
            raise ValueError(f"model.roughness must be in [0, 1), got {roughness}")
        if not 0 <= opacity_min <= 1:
            raise ValueError(f"model.opacity_min must be in [0, 1], got {opacity_min}")
        if len(fill_weights) != len(FILLS) or min(fill_weights) < 0 or sum(fill_weights) <= 0:
            raise ValueError(
                f"model.fill_weights must be {len(FILLS)} non-negative weights for {FILLS}, got {list(fill_weights)}"
            )
        if elastic_strength < 0:
            raise ValueError(f"model.elastic_strength must be >= 0, got {elastic_strength}")
        if not 0 <= clean_prob < 1:
            raise ValueError(f"model.clean_prob must be in [0, 1), got {clean_prob}")
        self.max_regions, self.region_min, self.region_max = max_regions, region_min, region_max
        self.roughness, self.opacity_min, self.elastic_strength = roughness, opacity_min, elastic_strength
        self.fill_weights = torch.tensor([float(w) for w in fill_weights]) / sum(fill_weights)
        self.clean_prob = clean_prob
        self.textures = textures

    def __call__(
        self, images01: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.corrupt(images01, generator)

    def corrupt(
        self, images01: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupted copies (N, C, H, W) in [0, 1] and the boolean mask (N, H, W) of the regions."""
        if images01.dim() != 4:
            raise ValueError(f"corrupt() needs images (N, C, H, W), got shape {tuple(images01.shape)}")
        x = images01
        n, _, h, w = x.shape
        dev, g = x.device, generator
        n_regions = torch.randint(1, self.max_regions + 1, (n,), generator=g, device=dev)
        clean = torch.rand(n, generator=g, device=dev) < self.clean_prob
        out = x.clone()
        mask = torch.zeros(n, h, w, dtype=torch.bool, device=dev)
        for r in range(self.max_regions):
            region = self.region(n, h, w, g, dev) & ((r < n_regions) & ~clean)[:, None, None]
            content = self.fill(out, x, g)
            alpha = self.opacity_min + (1 - self.opacity_min) * torch.rand(n, generator=g, device=dev)
            blended = (out + alpha[:, None, None, None] * (content - out)).clamp(0, 1)
            out = torch.where(region[:, None], blended, out)
            mask |= region
        return out, mask

    # ------------------------------------------------------------------ shapes
    def region(self, n: int, h: int, w: int, g: torch.Generator, dev: torch.device) -> torch.Tensor:
        """Boolean (N, H, W): a rotated ellipse centred on a pixel, border roughened by smooth noise.

        The centre pixel is always inside (roughness < 1), so every region is non-empty.
        """
        cy = torch.randint(0, h, (n, 1, 1), generator=g, device=dev).float()
        cx = torch.randint(0, w, (n, 1, 1), generator=g, device=dev).float()
        frac = self.region_min + (self.region_max - self.region_min) * torch.rand(
            n, 2, generator=g, device=dev
        )
        ay = (frac[:, 0] * h / 2).clamp(min=1.0)[:, None, None]
        ax = (frac[:, 1] * w / 2).clamp(min=1.0)[:, None, None]
        theta = math.pi * torch.rand(n, 1, 1, generator=g, device=dev)
        yy = torch.arange(h, device=dev, dtype=torch.float32)[None, :, None] - cy
        xx = torch.arange(w, device=dev, dtype=torch.float32)[None, None, :] - cx
        u = xx * torch.cos(theta) + yy * torch.sin(theta)
        v = -xx * torch.sin(theta) + yy * torch.cos(theta)
        dist = ((u / ax) ** 2 + (v / ay) ** 2).sqrt()
        rough = self.roughness * (2 * value_noise((n, 1, h, w), g, dev, octaves=2)[:, 0] - 1)
        return dist < 1 + rough

    # ----------------------------------------------------------------- content
    def fill(self, current: torch.Tensor, clean: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Replacement content (N, C, H, W) in [0, 1], one fill type per image."""
        n, c, h, w = current.shape
        dev = current.device
        kind = torch.multinomial(self.fill_weights.to(dev).expand(n, -1), 1, generator=g)[:, 0]
        texture = self.texture(clean, g)
        elastic = self.elastic(current, g)
        color = torch.rand(n, c, 1, 1, generator=g, device=dev).expand(n, c, h, w)
        k = kind[:, None, None, None]
        return torch.where(k == 0, texture, torch.where(k == 1, elastic, color))

    def texture(self, clean: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A texture per image, warped by a random similarity transform (reflection at the borders)."""
        n, c, h, w = clean.shape
        dev = clean.device
        if self.textures is not None:
            src = self.textures.sample(n, g, dev)
        else:
            shift = int(torch.randint(1, max(n, 2), (1,), generator=g, device=dev))
            noise = value_noise((n, c, h, w), g, dev)
            use_noise = (torch.rand(n, generator=g, device=dev) < 0.5)[:, None, None, None]
            src = torch.where(use_noise, noise, clean.roll(shift, dims=0))
        angle = 2 * math.pi * torch.rand(n, generator=g, device=dev)
        scale = torch.exp(math.log(2.0) * (2 * torch.rand(n, generator=g, device=dev) - 1))  # [0.5, 2]
        shift_xy = 2 * torch.rand(n, 2, generator=g, device=dev) - 1
        cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
        theta = torch.stack(
            [torch.stack([cos, -sin, shift_xy[:, 0]], 1), torch.stack([sin, cos, shift_xy[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def elastic(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The images resampled along a smooth random displacement field (at most ``elastic_strength`` of a side)."""
        n, c, h, w = images.shape
        dev = images.device
        coarse = 2 * torch.rand(n, 2, 4, 4, generator=g, device=dev) - 1
        disp = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
        identity = torch.eye(2, 3, device=dev).expand(n, 2, 3)
        grid = F.affine_grid(identity, [n, c, h, w], align_corners=False)
        grid = grid + 2 * self.elastic_strength * disp.permute(0, 2, 3, 1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def identity_noise(
    corrupted: torch.Tensor, clean: torch.Tensor, std: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity-anchored Gaussian noise (Bauer & Mueller 2025): ``(clip(corrupted + n), clip(clean + n))``.

    One draw ``n ~ N(0, std^2)`` per pixel and channel is added to both the network input and the target,
    both clipped to [0, 1]. Outside the corrupted regions ``corrupted == clean``, so input and target stay
    bit-identical there (the noise cancels in the residual): the model learns to keep normal content, noise
    included, as it is (a Tikhonov penalty on its Jacobian). Inside, input minus target is the corruption
    wherever neither side clips. ``std = 0`` returns the inputs unchanged and draws nothing from
    ``generator`` (call it after the corruption: its draws stay as without noise).
    """
    if std < 0:
        raise ValueError(f"model.identity_noise_std must be >= 0, got {std}")
    if std == 0:
        return corrupted, clean
    noise = std * torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    return (corrupted + noise).clamp(0, 1), (clean + noise).clamp(0, 1)
