"""Training objective: restore the clean image from its corrupted copy, squared error over all pixels.

The paper's objective is a denoising autoencoder's with structured noise, E ||f(x~) - x||^2: the
corrupted regions teach the model to replace irregular content, the untouched rest to keep normal
content as it is. ``masked_weight`` (default 1: the plain objective) optionally reweights the pixels
inside the corruption mask.
"""

from __future__ import annotations

import torch


def restoration_loss(
    restored: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor, masked_weight: float = 1.0
) -> torch.Tensor:
    """Weighted mean squared error: mean over (N, C, H, W) of w * (f(x~) - x)^2, w = masked_weight inside the mask, 1 outside."""
    err = (restored - clean).pow(2)
    if masked_weight == 1.0:
        return err.mean()
    weight = torch.where(mask[:, None], masked_weight, 1.0).to(err.dtype)
    return (weight * err).mean()
