"""Gradient maps, their training-set statistics, and the anomaly scores of Genc et al.

Notation (paper Sec. 3): g(x) = d log p(x)/dx = -dE(x)/dx, shape (C, H, W).
Standardized map: g_std = (g - mu) / sigma, with mu, sigma the per-pixel, per-channel mean and
standard deviation of g over the training set.
Eq. 2, pixel map:   a_r(x)[i, j] = ( sum_c |g[c, i, j]|^r )^(1/r)
Eq. 3, image score: A_r(x)       = ( sum_{i,j} a_r(x)[i, j]^r )^(1/r)
computed for r in {1, 2}, on the raw (g) and standardized (g_std) maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NORMS = (1, 2)
KINDS = ("raw", "std")
PIXEL_MAPS = tuple(f"a_{k}_l{r}" for k in KINDS for r in NORMS)
IMAGE_SCORES = ("energy",) + tuple(f"A_{k}_l{r}" for k in KINDS for r in NORMS)
DEFAULT_IMAGE_SCORE = "A_std_l2"
DEFAULT_PIXEL_MAP = "a_std_l2"


def energy_and_grad(energy_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """Return (E(x), g(x) = d log p(x)/dx) for a batch; works under ``torch.no_grad``.

    Raises a clear error under ``torch.inference_mode``, where input gradients cannot exist.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Gradient maps need autograd, but torch.inference_mode is active. "
            "Run the Trainer with inference_mode=False (trainer.inference_mode=false)."
        )
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        e = energy_fn(x)
        (grad_e,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), -grad_e.detach()


def pnorm(t: torch.Tensor, r: int, dims: tuple[int, ...]) -> torch.Tensor:
    """(sum |t|^r)^(1/r) over ``dims``."""
    if r == 1:
        return t.abs().sum(dim=dims)
    return t.abs().pow(r).sum(dim=dims).pow(1.0 / r)


def standardize(g: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(g - mean) / (std + eps * mean(std)); ``eps`` is relative so the result is scale free."""
    return (g - mean) / (std + eps * std.mean())


def compute_scores(
    energy: torch.Tensor,
    grad: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """All image scores (B,) and pixel maps (B, H, W) of one batch, in one pass."""
    maps: dict[str, torch.Tensor] = {}
    images: dict[str, torch.Tensor] = {"energy": energy}
    for kind, g in (("raw", grad), ("std", standardize(grad, mean, std, eps))):
        for r in NORMS:
            a = pnorm(g, r, dims=(1,))  # eq. 2: over channels
            maps[f"a_{kind}_l{r}"] = a
            images[f"A_{kind}_l{r}"] = pnorm(a, r, dims=(1, 2))  # eq. 3: over pixels
    return images, maps


class MomentAccumulator:
    """Float64 per-element sums of x and x^2 over a stream of batches (B, C, H, W)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, batch: torch.Tensor) -> None:
        b = batch.detach().to(torch.float64)
        self.sum += b.sum(0)
        self.sumsq += (b * b).sum(0)
        self.count += b.shape[0]

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the raw moments across processes (never per-rank means)."""
        self.sum = reduce_sum(self.sum)
        self.sumsq = reduce_sum(self.sumsq)
        self.count = reduce_sum(self.count)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and standard deviation."""
        n = float(self.count)
        if n < 1:
            raise RuntimeError("no samples were accumulated")
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp_min(0.0)
        return mean, var.sqrt()
