"""DRAEM's training loss, as in the official ``loss.py`` / ``train_DRAEM.py``.

loss = MSE(reconstruction, image) + (1 - SSIM(reconstruction, image)) + focal(softmax(logits), mask).

The SSIM is the official one: an 11x11 Gaussian window (sigma 1.5) per channel, zero padding of
5 pixels (a full-size map, borders included), C1 = (0.01 L)^2, C2 = (0.03 L)^2, mean over the map.
With ``data_range=None`` L follows the official rule on the first argument: 255 if its max > 128
else 1, minus -1 if its min < -0.5 else 0. kornia and torchmetrics pad by reflection (and
torchmetrics crops the border), so neither gives the official number; hence this implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalized 1-D Gaussian (size,), centred at size // 2."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def official_data_range(img: torch.Tensor) -> torch.Tensor:
    """The official ``ssim(val_range=None)`` range from the first image: (255 or 1) - (-1 or 0), no host sync."""
    max_val = torch.where(img.max() > 128, 255.0, 1.0)
    min_val = torch.where(img.min() < -0.5, -1.0, 0.0)
    return (max_val - min_val).to(img.dtype)


def ssim(
    img1: torch.Tensor,
    img2: torch.Tensor,
    window_size: int = 11,
    data_range: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean SSIM of two batches (B, C, H, W), zero-padded 'same' Gaussian statistics (official)."""
    c = img1.shape[1]
    g = gaussian_window(window_size).to(img1)
    window = (g[:, None] @ g[None, :]).expand(c, 1, window_size, window_size).contiguous()
    pad = window_size // 2
    L = official_data_range(img1) if data_range is None else data_range

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, padding=pad, groups=c)

    mu1, mu2 = filt(img1), filt(img2)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = filt(img1 * img1) - mu1_sq
    sigma2_sq = filt(img2 * img2) - mu2_sq
    sigma12 = filt(img1 * img2) - mu12
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    ssim_map = ((2 * mu12 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return ssim_map.mean()


def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """The official ``FocalLoss()`` (alpha=None, gamma=2, smooth=1e-5, mean) on class probabilities.

    ``probs``: (B, K, H, W) softmax output; ``target``: (B, 1, H, W) or (B, H, W) class indices.
    One-hot targets are clamped to [smooth / (K - 1), 1 - smooth]; p_t = <target, p> + smooth;
    loss = mean(-(1 - p_t)^gamma log p_t).
    """
    k = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, k)
    idx = target.reshape(-1).long()
    key = F.one_hot(idx, k).to(p.dtype).clamp(smooth / (k - 1), 1.0 - smooth)
    pt = (key * p).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def draem_loss(
    reconstruction: torch.Tensor, image: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The official objective: {"loss", "l2", "ssim", "focal"} (``ssim`` is the loss term 1 - SSIM)."""
    l2 = F.mse_loss(reconstruction, image)
    ssim_term = 1.0 - ssim(reconstruction, image)
    focal = focal_loss(torch.softmax(logits, dim=1), mask)
    return {"loss": l2 + ssim_term + focal, "l2": l2, "ssim": ssim_term, "focal": focal}
