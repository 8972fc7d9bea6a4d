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
    step_size_end: float | None = None,
    noise_std_end: float | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``steps`` SGLD updates x <- clamp(x - step_size_k * dE/dx + noise_std_k * eps).

    ``step_size_end`` / ``noise_std_end`` (None: constant) anneal the step size / noise linearly along the
    chain, from the first to the last update. Gradients are taken with respect to the samples only; call
    it inside :func:`frozen` (as the Lightning module does) so that no parameter gradients are built.
    With ``stats`` (a dict), ``stats["grad_norm"]`` receives the mean per-sample L2 norm of dE/dx at the
    last update (a 0-dim tensor, no host sync). Returns detached samples.
    """
    lo, hi = data_range
    sizes = chain_schedule(step_size, step_size_end, steps)
    noises = chain_schedule(noise_std, noise_std_end, steps)
    x = x0.detach().clone()
    grad = None
    with torch.enable_grad():
        for k in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x = (x.detach() - sizes[k] * grad + noises[k] * noise).clamp_(lo, hi)
    if stats is not None and grad is not None:
        stats["grad_norm"] = grad.flatten(1).norm(dim=1).mean().detach()
    return x.detach()


def chain_schedule(start: float, end: float | None, steps: int) -> list[float]:
    """Per-update values along a chain: constant, or linear from ``start`` to ``end``."""
    if end is None or steps == 1:
        return [start] * steps
    return [start + (end - start) * k / (steps - 1) for k in range(steps)]
