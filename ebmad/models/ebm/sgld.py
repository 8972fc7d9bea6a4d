"""Short-run SGLD sampling from the EBM (Nijkamp et al. style, non-persistent)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def frozen(module: nn.Module):
    """Temporarily stop gradients flowing into ``module``'s parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


def uniform_init(
    shape: tuple[int, ...],
    data_range: tuple[float, float],
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Chain starts drawn uniformly over the data range."""
    lo, hi = data_range
    return torch.rand(shape, device=device, generator=generator) * (hi - lo) + lo


def sgld_sample(
    energy: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    steps: int,
    step_size: float,
    noise_std: float,
    data_range: tuple[float, float] = (-1.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run ``steps`` SGLD updates x <- clamp(x - step_size * dE/dx + noise_std * eps).

    Gradients are taken with respect to the samples only; call it inside :func:`frozen`
    (as the Lightning module does) so that no parameter gradients are built.
    Returns detached samples.
    """
    lo, hi = data_range
    x = x0.detach().clone()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x = (x.detach() - step_size * grad + noise_std * noise).clamp_(lo, hi)
    return x.detach()
