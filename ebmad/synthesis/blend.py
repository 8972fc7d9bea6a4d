"""Blending new content into images inside a mask."""

from __future__ import annotations

import torch


def blend(image: torch.Tensor, texture: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor | float
          ) -> torch.Tensor:  # fmt: skip
    """DRAEM's I (1 - M) + (1 - beta) A M + beta I M; ``beta`` is a scalar or one value per image (B,)."""
    beta = beta.view(-1, *([1] * (image.dim() - 1))) if torch.is_tensor(beta) and beta.dim() else beta
    return image * (1 - mask) + (1 - beta) * texture * mask + beta * image * mask


def paste(image: torch.Tensor, content: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``image + weight (content - image)``: exactly ``content`` where ``weight`` is 1, ``image`` where it is 0.

    ``weight`` (B, 1, H, W) or (B, H, W) in [0, 1] is the per-pixel opacity of ``content``.
    """
    w = weight if weight.dim() == image.dim() else weight[:, None]
    mixed = torch.where(w >= 1, content, torch.lerp(image, content, w))
    return torch.where(w > 0, mixed, image)
