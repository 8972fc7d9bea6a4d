"""Gradient maps, their training-set statistics, and the anomaly scores of Genc et al.

Notation (paper Sec. 3): g(x) = d log p(x)/dx = -dE(x)/dx, shape (C, H, W).
Standardized map: g_std = (g - mu) / sigma, with mu, sigma the per-pixel, per-channel mean and
standard deviation of g over the training set.
Eq. 2, pixel map:   a_r(x)[i, j] = ( sum_c |g[c, i, j]|^r )^(1/r)
Eq. 3, image score: A_r(x)       = ( sum_{i,j} a_r(x)[i, j]^r )^(1/r)
computed for r in {1, 2}, on the raw (g) and standardized (g_std) maps.

Options beyond the paper (each off by default; the paper's scores are always computed):
- ``a_ms`` / ``A_ms_max``: a multi-scale map, the mean of the standardized L2 map blurred with Gaussians
  of several sigmas (sigma 0: the map itself), and its maximum as an image score;
- ``e_patch`` / ``E_patch_max``: the energy split over the last feature map's 4x4 positions (each the
  energy of one receptive-field patch), standardized per position with the training set's statistics;
  the map is that grid upsampled, the image score its maximum;
- ``a_combo`` / ``A_combo_max`` (``combo_map``): ``a_ms`` and ``e_patch``, each standardized with its mean and
  std over the training pixels, summed; and its maximum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

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
    map_sigmas: tuple[float, ...] | None = None,
    patch: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """All image scores (B,) and pixel maps (B, H, W) of one batch, in one pass.

    ``map_sigmas`` adds the multi-scale map ``a_ms`` and ``A_ms_max``; ``patch`` (B, h, w), standardized
    patch energies, adds ``e_patch`` and ``E_patch_max``.
    """
    maps: dict[str, torch.Tensor] = {}
    images: dict[str, torch.Tensor] = {"energy": energy}
    for kind, g in (("raw", grad), ("std", standardize(grad, mean, std, eps))):
        for r in NORMS:
            a = pnorm(g, r, dims=(1,))  # eq. 2: over channels
            maps[f"a_{kind}_l{r}"] = a
            images[f"A_{kind}_l{r}"] = pnorm(a, r, dims=(1, 2))  # eq. 3: over pixels
    if map_sigmas:
        maps["a_ms"] = multiscale_map(maps["a_std_l2"], map_sigmas)
        images["A_ms_max"] = maps["a_ms"].amax(dim=(1, 2))
    if patch is not None:
        maps["e_patch"] = F.interpolate(patch[:, None], size=grad.shape[-2:], mode="bilinear",
                                        align_corners=False)[:, 0]  # fmt: skip
        images["E_patch_max"] = patch.amax(dim=(1, 2))
    return images, maps


def combine_maps(a_ms: torch.Tensor, e_patch: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """(a_ms - mean) / std + (e_patch - mean) / std, with ``stats`` = [[mean, std] of a_ms, [mean, std] of e_patch]."""
    (m_a, s_a), (m_e, s_e) = stats
    return (a_ms - m_a) / s_a.clamp_min(1e-12) + (e_patch - m_e) / s_e.clamp_min(1e-12)


def instance_normalize(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-image standardization over (C, H, W): one mean and one std per image, so colour relations stay.

    A global gain and offset of the image (x -> a x + b, a > 0: a brightness change) leaves it unchanged
    up to ``eps``.
    """
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    s = (x - m).pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return (x - m) / (s + eps)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalized 1-D Gaussian, radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of maps (B, H, W) with reflect padding (ONNX-exportable ops only)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma).to(maps)
    r = len(k) // 2
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


def multiscale_map(a: torch.Tensor, sigmas: tuple[float, ...]) -> torch.Tensor:
    """Mean of the map blurred at each sigma (0: unblurred): a Gaussian scale-space average."""
    return torch.stack([gaussian_blur(a, float(s)) for s in sigmas]).mean(0)


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
