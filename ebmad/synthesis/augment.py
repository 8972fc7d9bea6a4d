"""DRAEM's texture augmentations (shared by every training synthesis), batched on tensors in [0, 1] (N, 3, H, W).

The anomaly texture is changed by 3 of the 10 operations of the official ``data_loader.py``,
drawn without replacement and applied in the drawn order (``randAugmenter``), each with the
default parameter ranges of the imgaug augmenter used there. Values are kept on the 8-bit grid
(rounded to k/255 after every operation), as the official pipeline works on uint8 images.
The normal training image is rotated by U(-90, 90) degrees with probability 0.3: the official
``transform_image`` rotates when ``torch.rand(1) > 0.7``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import kornia.color as kc
import torch
from kornia.enhance import equalize as kornia_equalize
from kornia.enhance import sharpness as kornia_sharpness
from kornia.enhance import solarize as kornia_solarize
from kornia.geometry.transform import rotate

Params = dict[str, torch.Tensor]

# brightness channel of each colour space of imgaug's WithBrightnessChannels: (to, from, channel, scale)
BRIGHTNESS_SPACES: tuple[tuple[Callable, Callable, int, float], ...] = (
    (kc.rgb_to_ycbcr, kc.ycbcr_to_rgb, 0, 1.0),  # YCrCb: Y
    (kc.rgb_to_hsv, kc.hsv_to_rgb, 2, 1.0),  # HSV: V
    (kc.rgb_to_hls, kc.hls_to_rgb, 1, 1.0),  # HLS: L
    (kc.rgb_to_lab, kc.lab_to_rgb, 0, 100.0),  # Lab: L in [0, 100]
    (kc.rgb_to_luv, kc.luv_to_rgb, 0, 100.0),  # Luv: L in [0, 100]
    (kc.rgb_to_yuv, kc.yuv_to_rgb, 0, 1.0),  # YUV: Y
)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid k/255 and clip to [0, 1]."""
    return (x * 255).round().clamp(0, 255) / 255


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, device=g.device, generator=g)


def _randint(n: int, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    """Integers in the closed interval [lo, hi] (imgaug's DiscreteUniform)."""
    return torch.randint(lo, hi + 1, (n,), device=g.device, generator=g)


# ----------------------------------------------------------------------------- operations
def gamma_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """iaa.GammaContrast: 255 * (v / 255) ** gamma, one gamma per image and channel (N, C)."""
    return x.clamp_min(0).pow(gamma[:, :, None, None])


def multiply_add_brightness(
    x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, mul_first: torch.Tensor, space: torch.Tensor
) -> torch.Tensor:
    """iaa.MultiplyAndAddToBrightness: scale and shift the brightness channel of a random colour space.

    ``add`` is in units of the 8-bit range (add / 255 of the channel range); the order of multiply
    and add is random per image; the channel is clipped to its range after each, as on uint8.
    """
    out = x.clone()
    for k, (to_space, from_space, ch, scale) in enumerate(BRIGHTNESS_SPACES):
        idx = (space == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        img = to_space(x[idx])
        c = img[:, ch] / scale
        m, a, first = mul[idx, None, None], add[idx, None, None], mul_first[idx, None, None]
        c_ma = ((c * m).clamp(0, 1) + a / 255).clamp(0, 1)
        c_am = ((c + a / 255).clamp(0, 1) * m).clamp(0, 1)
        img = img.clone()
        img[:, ch] = torch.where(first, c_ma, c_am) * scale
        out[idx] = from_space(img).clamp(0, 1)
    return out


def enhance_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """iaa.pillike.EnhanceSharpness (PIL ImageEnhance.Sharpness): kornia's PIL-equivalent sharpness."""
    return kornia_sharpness(x, factor)


def add_hue_saturation(x: torch.Tensor, hue: torch.Tensor, sat: torch.Tensor) -> torch.Tensor:
    """iaa.AddToHueAndSaturation: add ``hue`` (of 255 = 360 degrees, cyclic) and ``sat`` (of 255, clipped)."""
    hsv = kc.rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + hue[:, None, None] / 255 * 2 * math.pi, 2 * math.pi)
    s = (hsv[:, 1] + sat[:, None, None] / 255).clamp(0, 1)
    return kc.hsv_to_rgb(torch.stack((h, s, hsv[:, 2]), dim=1)).clamp(0, 1)


def solarize(x: torch.Tensor, threshold: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """iaa.Solarize(p): where ``apply``, invert the values >= ``threshold`` (in [0, 1])."""
    return torch.where(apply[:, None, None, None], kornia_solarize(x, threshold), x)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """iaa.Posterize: keep the ``bits`` highest bits of each 8-bit value (PIL ImageOps.posterize)."""
    levels = (x * 255).round().long()
    keep = (256 - 2 ** (8 - bits)).view(-1, 1, 1, 1)  # mask of the highest bits
    return (levels & keep).to(x.dtype) / 255


def invert(x: torch.Tensor) -> torch.Tensor:
    """iaa.Invert (p=1): 255 - v."""
    return 1.0 - x


def autocontrast(x: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """iaa.pillike.Autocontrast (PIL ImageOps.autocontrast), per channel, ``cutoff`` percent (N,).

    The ``cutoff`` % darkest and lightest pixels are ignored; the remaining range [lo, hi] is
    stretched to [0, 255] with PIL's lookup table int((v - lo) * 255 / (hi - lo)), clipped.
    """
    n, c, h, w = x.shape
    levels = (x * 255).round().flatten(2).double()  # (N, C, P)
    ordered = levels.sort(dim=2).values
    cut = (h * w * cutoff.long()) // 100
    lo = ordered.gather(2, cut.view(n, 1, 1).expand(n, c, 1))
    hi = ordered.gather(2, (h * w - 1 - cut).view(n, 1, 1).expand(n, c, 1))
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1)  # tensor / tensor: IEEE division as PIL's
    out = (levels * scale - lo * scale).clamp(0, 255).floor()
    out = torch.where(hi > lo, out, levels)
    return (out / 255).to(x.dtype).view(n, c, h, w)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """iaa.pillike.Equalize (PIL ImageOps.equalize), per channel: kornia's PIL-equivalent equalize."""
    return kornia_equalize(x)


def rotate_images(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """iaa.Affine(rotate=angle): rotation about the centre in degrees, bilinear, zero fill."""
    return rotate(x, angle.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


# ------------------------------------------------------------------ the official augmenter list
def _draw(n: int, g: torch.Generator) -> dict[str, Params]:
    """Parameters of every operation for every image, always drawn in full (fixed RNG consumption)."""
    return {
        "gamma_contrast": {
            "gamma": _uniform(n, 0.5, 2.0, g, 3)
        },  # GammaContrast((0.5, 2.0), per_channel=True)
        "brightness": {  # MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))
            "mul": _uniform(n, 0.8, 1.2, g),
            "add": _uniform(n, -30.0, 30.0, g),
            "mul_first": torch.rand(n, device=g.device, generator=g) < 0.5,
            "space": _randint(n, 0, len(BRIGHTNESS_SPACES) - 1, g),
        },
        "sharpness": {"factor": _uniform(n, 0.0, 2.0, g)},  # pillike.EnhanceSharpness(), factor (0, 2)
        "hue_saturation": {
            "hue": _randint(n, -50, 50, g),
            "sat": _randint(n, -50, 50, g),
        },  # (-50, 50), per_channel
        "solarize": {  # Solarize(0.5, threshold=(32, 128))
            "threshold": _uniform(n, 32.0, 128.0, g) / 255,
            "apply": torch.rand(n, device=g.device, generator=g) < 0.5,
        },
        "posterize": {"bits": _randint(n, 1, 8, g)},  # Posterize(), nb_bits (1, 8)
        "invert": {},  # Invert()
        "autocontrast": {"cutoff": _randint(n, 0, 20, g)},  # pillike.Autocontrast(), cutoff (0, 20)
        "equalize": {},  # pillike.Equalize()
        "rotate": {"angle": _uniform(n, -45.0, 45.0, g)},  # Affine(rotate=(-45, 45))
    }


OPERATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gamma_contrast": gamma_contrast,
    "brightness": multiply_add_brightness,
    "sharpness": enhance_sharpness,
    "hue_saturation": add_hue_saturation,
    "solarize": solarize,
    "posterize": posterize,
    "invert": invert,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "rotate": rotate_images,
}
OP_NAMES = tuple(OPERATIONS)


def choose_operations(n: int, generator: torch.Generator, k: int = 3) -> torch.Tensor:
    """(n, k) indices into ``OP_NAMES``: k distinct operations per image, in application order."""
    return torch.rand(n, len(OP_NAMES), device=generator.device, generator=generator).argsort(dim=1)[:, :k]


def rand_augment(x: torch.Tensor, generator: torch.Generator, k: int = 3) -> torch.Tensor:
    """The official ``randAugmenter``: k of the 10 operations per image, without replacement, in order.

    ``x``: RGB images (N, 3, H, W) in [0, 1]; returns new images on the 8-bit grid.
    """
    if x.shape[1] != 3:
        raise ValueError(f"rand_augment needs RGB images (N, 3, H, W), got shape {tuple(x.shape)}")
    chosen = choose_operations(len(x), generator, k)
    params = _draw(len(x), generator)
    x = quantize(x)
    for step in range(k):
        for j, name in enumerate(OP_NAMES):
            idx = (chosen[:, step] == j).nonzero().flatten()
            if len(idx) == 0:
                continue
            kwargs = {key: v[idx] for key, v in params[name].items()}
            x = x.index_copy(0, idx, quantize(OPERATIONS[name](x[idx], **kwargs)))
    return x


def rotate_normal(
    x: torch.Tensor, generator: torch.Generator, p: float = 0.3, max_angle: float = 90.0
) -> torch.Tensor:
    """The official rotation of the normal image: with probability ``p``, U(-max_angle, max_angle) degrees."""
    n = len(x)
    which = torch.rand(n, device=generator.device, generator=generator) < p
    angle = _uniform(n, -max_angle, max_angle, generator)
    return torch.where(which[:, None, None, None], rotate_images(x, angle), x)
