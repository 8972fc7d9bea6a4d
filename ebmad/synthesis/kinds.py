"""Label-free validation anomalies: seeded synthetic defects planted into held-out defect-free images.

Every kind changes pixels only inside its mask (outside, the output is bit-identical to the input), and
the mask is the pixel label: where the change has a weight > 0. Each kind is drawn once per image (mask
and content from a generator seeded by the seed and the kind's name, so adding a kind leaves the others
as they were) and applied at every strength in (0, 1]:

- ``perlin_texture``: a Perlin mask as DRAEM draws them, filled with a texture (a folder such as DTD,
  else procedural textures), opacity = strength;
- ``perlin_patch``: a Perlin mask filled with another image of the set, moved by a random quarter to three
  quarters of the side (its content out of place), opacity = strength;
- ``warp``: a smooth random displacement inside a soft elliptical blob, at most ``strength * WARP_MAX``
  of the image side;
- ``color``: a hue rotation (RGB) and brightness shift inside a soft blob, ``strength`` times
  ``COLOR_HUE`` / ``COLOR_BRIGHTNESS``;
- ``spots_scratches``: the planted spots and scratches of :func:`ebmad.data.corruption.plant_defects`
  (today's validation), opacity = strength (at 1.0 exactly those).

:data:`KINDS` records, per kind, the model families whose training synthesis draws the same anomalies
(``trained_by``: validating such a model on it favours it) and those whose synthesis is only related
(``similar_to``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import adjust_brightness, adjust_hue
from kornia.geometry.transform import remap
from kornia.utils import create_meshgrid

from ebmad.synthesis.blend import paste
from ebmad.synthesis.perlin import rand_perlin_mask

if TYPE_CHECKING:
    from ebmad.synthesis.textures import TextureSource
# ebmad.data (plant_defects, and the image decoding under the texture folders) is imported where it is used:
# the datamodule imports this module, so importing ebmad.data here would be an import cycle

STRENGTHS = (0.2, 0.4, 0.8)
WARP_MAX = 0.08  # largest displacement at strength 1, as a fraction of the image side
COLOR_HUE = 0.5  # hue rotation at strength 1 (radians)
COLOR_BRIGHTNESS = 0.15  # brightness shift at strength 1, in [0, 1] intensity units
BLOB_AXES = (0.08, 0.2)  # blob semi-axes, fractions of the side
BLOB_EDGE = 0.3  # the outer share of the blob radius over which the weight falls smoothly to 0

Made = tuple[list[torch.Tensor], torch.Tensor]  # one output per strength, the boolean mask (N, H, W)


@dataclass(frozen=True)
class Ctx:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    strengths: tuple[float, ...]
    generator: torch.Generator
    seed: int
    textures: TextureSource | None


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[Ctx], Made]
    trained_by: tuple[str, ...]  # model families that train on these very anomalies
    similar_to: tuple[str, ...]  # model families whose training synthesis is related
    description: str


# ------------------------------------------------------------------------------------ shapes
def nonempty_perlin_masks(n: int, size: tuple[int, int], g: torch.Generator, tries: int = 50) -> torch.Tensor:
    """Boolean (n, H, W) DRAEM Perlin masks; an empty one is drawn again (DRAEM would count it as normal)."""
    masks = rand_perlin_mask(n, size, g)[:, 0] > 0
    for _ in range(tries):
        empty = ~masks.flatten(1).any(1)
        if not empty.any():
            return masks
        masks[empty] = rand_perlin_mask(int(empty.sum()), size, g)[:, 0] > 0
    raise RuntimeError(f"Perlin masks still empty after {tries} draws at size {size}")


def soft_blobs(n: int, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Weights (n, 1, H, W) in [0, 1]: a rotated ellipse, 1 inside, falling smoothly to 0 at its border.

    Centre uniform in the middle 60 % of the image, semi-axes ``BLOB_AXES`` of the side.
    """
    h, w = size
    dev = g.device
    u = torch.rand(n, 5, device=dev, generator=g)
    cy, cx = (0.2 + 0.6 * u[:, 0]) * h, (0.2 + 0.6 * u[:, 1]) * w
    lo, hi = BLOB_AXES
    ay, ax = (lo + (hi - lo) * u[:, 2]) * h, (lo + (hi - lo) * u[:, 3]) * w
    theta = math.pi * u[:, 4]
    yy = torch.arange(h, device=dev, dtype=torch.float32)[None, :, None] - cy[:, None, None]
    xx = torch.arange(w, device=dev, dtype=torch.float32)[None, None, :] - cx[:, None, None]
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    r = (
        ((xx * cos + yy * sin) / ax[:, None, None]) ** 2 + ((yy * cos - xx * sin) / ay[:, None, None]) ** 2
    ).sqrt()
    t = ((1 - r) / BLOB_EDGE).clamp(0, 1)
    return (t * t * (3 - 2 * t))[:, None]  # smoothstep: C1 at the border, so a warp there is smooth


# ------------------------------------------------------------------------------------- kinds
def _opacities(ctx: Ctx, content: torch.Tensor, mask: torch.Tensor) -> Made:
    weight = mask[:, None].to(ctx.images.dtype)
    return [paste(ctx.images, content, s * weight) for s in ctx.strengths], mask


def _perlin_texture(ctx: Ctx) -> Made:
    x, g = ctx.images, ctx.generator
    n, c, h, w = x.shape
    if h != w:
        raise ValueError(f"perlin_texture needs square images, got {h}x{w}")
    mask = nonempty_perlin_masks(n, (h, w), g)
    tex = ctx.textures.sample(n, g).to(x.dtype)  # type: ignore[union-attr]
    if tex.shape[-2:] != (h, w):
        raise ValueError(f"textures are {tuple(tex.shape[-2:])}, the images {h}x{w}")
    if c == 1 and tex.shape[1] == 3:
        tex = rgb_to_grayscale(tex)
    return _opacities(ctx, tex * 2 - 1, mask)


def _perlin_patch(ctx: Ctx) -> Made:
    from ebmad.synthesis.textures import shifted_others

    x, g = ctx.images, ctx.generator
    n, _, h, w = x.shape
    if n < 2:
        raise ValueError(f"perlin_patch needs at least 2 validation images (another image's region), got {n}")
    mask = nonempty_perlin_masks(n, (h, w), g)
    return _opacities(ctx, shifted_others(x, g), mask)


def _warp(ctx: Ctx) -> Made:
    x, g = ctx.images, ctx.generator
    n, _, h, w = x.shape
    weight = soft_blobs(n, (h, w), g).to(x)
    field = F.interpolate(torch.randn(n, 2, 4, 4, device=g.device, generator=g), size=(h, w), mode="bicubic",
                          align_corners=False).to(x)  # fmt: skip
    field = field * weight
    peak = field.norm(dim=1).flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
    field = field / peak  # largest displacement inside the blob: 1 (times the strength's size)
    grid = create_meshgrid(h, w, normalized_coordinates=False, device=x.device, dtype=x.dtype)  # (1, H, W, 2)
    outs = []
    for s in ctx.strengths:
        d = s * WARP_MAX * max(h, w) * field
        warped = remap(x, grid[..., 0] + d[:, 0], grid[..., 1] + d[:, 1], mode="bilinear",
                       padding_mode="border", align_corners=True)  # fmt: skip
        outs.append(paste(x, warped.clamp(-1, 1), (weight > 0).to(x.dtype)))
    return outs, weight[:, 0] > 0


def _color(ctx: Ctx) -> Made:
    x, g = ctx.images, ctx.generator
    n, c, h, w = x.shape
    weight = soft_blobs(n, (h, w), g).to(x)
    sign = torch.where(torch.rand(n, 2, device=g.device, generator=g) < 0.5, -1.0, 1.0).to(x)
    x01 = (x + 1) / 2
    outs = []
    for s in ctx.strengths:
        shifted = adjust_hue(x01, sign[:, 0] * s * COLOR_HUE) if c == 3 else x01
        shifted = adjust_brightness(shifted, sign[:, 1] * s * COLOR_BRIGHTNESS)
        outs.append(paste(x, shifted * 2 - 1, weight))
    return outs, weight[:, 0] > 0


def _spots_scratches(ctx: Ctx) -> Made:
    from ebmad.data.corruption import plant_defects

    planted, mask = plant_defects(ctx.images, seed=ctx.seed)  # today's validation defects, same seed
    return _opacities(ctx, planted, mask)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("perlin_texture", _perlin_texture, ("draem",), ("ssae",),
             "DRAEM Perlin mask filled with a texture (folder or procedural)"),
        Kind("perlin_patch", _perlin_patch, (), ("ssae",), "Perlin mask filled with another image of the set, moved"),
        Kind("warp", _warp, ("ssae",), (), "smooth local displacement inside a soft blob"),
        Kind("color", _color, (), ("ssae",), "hue/brightness shift inside a soft blob"),
        Kind("spots_scratches", _spots_scratches, (), ("ssae",),
             "inverted-colour spots and bright/dark scratches (ebmad.data.corruption)"),
    )
}  # fmt: skip
# Why: DRAEM trains on Perlin masks of (augmented) textures, exactly perlin_texture. SSAE's corruption
# (ebmad/models/ssae/corruption.py) fills rough ellipses with a texture (a folder, procedural noise or
# another batch image, randomly rotated/scaled), the image elastically deformed (= warp), or a flat colour
# at opacity >= 0.3 (related to color and spots_scratches). The EBM trains on no synthetic anomalies.


# ------------------------------------------------------------------------------------ public
def _check(kinds: Sequence[str], strengths: Sequence[float]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    kinds, strengths = tuple(kinds), tuple(float(s) for s in strengths)
    if not kinds:
        raise ValueError(f"no validation anomaly kinds given; choose from {sorted(KINDS)}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown validation anomaly kind(s) {unknown}; choose from {sorted(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"validation anomaly kinds listed twice: {list(kinds)}")
    if not strengths or not all(0 < s <= 1 for s in strengths):
        raise ValueError(
            f"validation anomaly strengths must be a non-empty list in (0, 1], got {list(strengths)}"
        )
    return kinds, strengths


def kind_seed(seed: int, kind: str) -> int:
    """The generator seed of one kind: depends on the seed and the kind's name only."""
    return (seed * 1_000_003 + zlib.crc32(kind.encode())) % 2**63


def validation_anomalies(
    images: torch.Tensor,
    kinds: Sequence[str],
    seed: int = 0,
    texture_dir: str | Path | None = None,
    strengths: Sequence[float] = STRENGTHS,
    texture_setting: str = "data.val_texture_dir",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anomalous copies of defect-free ``images`` (N, C, H, W) in [-1, 1], C = 1 or 3.

    Returns (images (M, C, H, W), boolean masks (M, H, W), kind_index (M,) into ``kinds``) with
    M = len(kinds) * len(strengths) * N, ordered kind, then strength, then image (see :func:`layout`).
    Deterministic for a seed on a given device (the datamodule builds them on the CPU).
    """
    kinds, strengths = _check(kinds, strengths)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise ValueError(
            f"validation images must be (N, 1 or 3, H, W) with N >= 1, got {tuple(images.shape)}"
        )
    if float(images.min()) < -1 - 1e-6 or float(images.max()) > 1 + 1e-6:
        raise ValueError(
            f"validation images must be in [-1, 1], got {float(images.min())}..{float(images.max())}"
        )
    from ebmad.synthesis.textures import texture_source

    n = len(images)
    textures = (
        texture_source(texture_dir, images.shape[-1], texture_setting) if "perlin_texture" in kinds else None
    )
    out, masks = [], []
    for k in kinds:
        g = torch.Generator(device=images.device).manual_seed(kind_seed(seed, k))
        made, mask = KINDS[k].make(Ctx(images, strengths, g, seed, textures))
        for y in made:  # the guarantee, whatever a kind computes: outside its mask, the input exactly
            out.append(torch.where(mask[:, None], y, images))
            masks.append(mask)
    kind_index, _, _ = layout(n, len(kinds), len(strengths))
    return torch.cat(out), torch.cat(masks), kind_index.to(images.device)


def layout(n: int, n_kinds: int, n_strengths: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kind_index, strength_index, image_index), each (n_kinds * n_strengths * n,), of the output order."""
    j = torch.arange(n_kinds * n_strengths * n)
    return j // (n_strengths * n), (j // n) % n_strengths, j % n


def trained_on(kind: str, model_type: str) -> bool:
    """Whether ``model_type`` (ebm, draem, ssae) trains on this very kind of anomaly."""
    return model_type in KINDS[kind].trained_by


def favoured(kinds: Sequence[str], model_types: Sequence[str]) -> dict[str, list[str]]:
    """Per model type, the given validation kinds it trains on (a comparison on them favours it)."""
    return {m: [k for k in kinds if trained_on(k, m)] for m in model_types}


def neutral_kinds(model_types: Sequence[str], strict: bool = False) -> list[str]:
    """Kinds none of ``model_types`` trains on (``strict``: nor trains on anything related)."""
    return [
        k
        for k, spec in KINDS.items()
        if not set(model_types) & set(spec.trained_by + strict * spec.similar_to)
    ]


def describe(kinds: Sequence[str], seed: int, texture_dir: str | Path | None = None,
             strengths: Sequence[float] = STRENGTHS) -> dict[str, Any]:  # fmt: skip
    """What a validation set was built from, for ``results.json`` (``validation_anomalies``)."""
    kinds, strengths = _check(kinds, strengths)
    return {
        "kinds": list(kinds),
        "strengths": list(strengths),
        "seed": seed,
        "texture_source": (str(texture_dir) if texture_dir else "procedural")
        if "perlin_texture" in kinds
        else None,
        "trained_by": {k: list(KINDS[k].trained_by) for k in kinds},
        "similar_to": {k: list(KINDS[k].similar_to) for k in kinds},
    }
