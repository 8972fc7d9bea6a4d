"""Energy trained against synthetic anomalies, beside contrastive divergence (``model.oe_weight`` > 0).

Energy-bounded learning with outlier exposure (Liu et al., "Energy-based Out-of-distribution Detection",
NeurIPS 2020): squared hinge losses keep the energy of normal data below a margin ``m_in`` and the energy
of outliers above another margin ``m_out``,

    L = mean (max(0, E_in - m_in))^2 + mean (max(0, m_out - E_out))^2.

Here the outliers are synthetic anomalies planted into the positives with DRAEM's synthesis
(:func:`ebmad.synthesis.perlin_anomalies.synthesize`: a Perlin mask filled with an augmented texture from a
folder such as DTD, procedural textures, or another training image moved), and the loss is applied per
patch through the patch-energy head (the mask decides which patch is an outlier, see :func:`patch_labels`)
and/or per image. Energies are per patch: a patch's contribution to the energy plus its share of the
head's bias, so that the image energy is the sum of the patch energies and one pair of margins serves both
levels (per image: the mean patch energy E / P).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = ("patch", "image", "both")
SOURCES = ("texture", "images")
SETTING_DIR = "model.oe_source_dir"


def hinge_margin_loss(e_in: torch.Tensor, e_out: torch.Tensor, m_in: float, m_out: float) -> torch.Tensor:
    """Liu et al.'s squared hinges: mean relu(e_in - m_in)^2 + mean relu(m_out - e_out)^2 (an empty set: 0)."""
    zero = e_in.new_zeros(())
    loss_in = F.relu(e_in - m_in).pow(2).mean() if e_in.numel() else zero
    loss_out = F.relu(m_out - e_out).pow(2).mean() if e_out.numel() else zero
    return loss_in + loss_out


def patch_labels(
    mask: torch.Tensor, grid: tuple[int, int], cover: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which patch energies are outliers and which are normal, from pixel masks (B, 1, H, W) or (B, H, W).

    Patch (i, j) of a ``grid`` (h, w) covers the cell of rows ``i H/h .. (i+1) H/h`` and columns likewise (the
    last feature map's positions tile the input, stride H/h). Its anomalous share is the mean of the mask
    over that cell: outlier where the share is >= ``cover``, normal where it is 0, neither in between.
    Returns boolean (outlier, normal), each (B, h, w).
    """
    m = mask if mask.dim() == 4 else mask[:, None]
    h, w = m.shape[-2:]
    if h % grid[0] or w % grid[1]:
        raise ValueError(f"masks of {h}x{w} do not tile into the {grid[0]}x{grid[1]} patch grid")
    share = F.avg_pool2d(m.float(), (h // grid[0], w // grid[1]))[:, 0]
    return share >= cover, share == 0


def patch_energies(patch: torch.Tensor, bias: torch.Tensor | float) -> torch.Tensor:
    """Per-patch energies (B, h, w): the head's contributions plus an equal share of its bias (sum = E)."""
    n = patch.shape[-1] * patch.shape[-2]
    return patch + bias / n


__all__ = ["LEVELS", "SETTING_DIR", "SOURCES", "hinge_margin_loss", "patch_energies", "patch_labels"]
