"""What ``ebmad.predict`` draws: the anomaly map in fixed colours over the image at its original resolution,
the legend strip below it (colour bar with the pixel threshold, the image score against its threshold, the
defect area, where the threshold comes from), and the image as 8-bit RGB for it.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit; Pillow's convert would clip at 255


def display_rgb(img: Image.Image) -> np.ndarray:
    """The image as 8-bit RGB (H, W, 3) for the overlay; 16-bit and float images scaled, not clipped."""
    if img.mode in WIDE_GRAY_MODES:
        arr = np.asarray(img, dtype=np.float64) / 257.0
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64) * 255.0
    else:
        return np.asarray(img.convert("RGB"))
    gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def heat_colors(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """RGB uint8 colours of map values on a fixed scale [0, 2 * pixel_threshold] (threshold = mid colour)."""
    t = np.clip(amap / (2.0 * pixel_threshold), 0.0, 1.0)
    return (matplotlib.colormaps["jet"](t)[..., :3] * 255).round().astype(np.uint8)


def overlay(rgb: np.ndarray, amap: np.ndarray, pixel_threshold: float, alpha: float) -> Image.Image:
    """The map's colours blended over the image (both at the image's resolution)."""
    heat = heat_colors(amap, pixel_threshold).astype(np.float32)
    mixed = (1 - alpha) * rgb.astype(np.float32) + alpha * heat
    return Image.fromarray(mixed.round().astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def legend(image: Image.Image, score: float, image_thr: float, area: int, pixel_thr: float,
           source: str = "") -> Image.Image:  # fmt: skip
    """The overlay with a strip below it: the colour bar (0 .. 2 x pixel threshold, the threshold marked),
    the image score against its threshold with the decision, the defect area against the pixel threshold,
    and where the image threshold comes from (``source``)."""
    width = max(image.width, 420)
    unit = max(1, round(width / 420))
    bar_h, pad, text = 14 * unit, 6 * unit, 13 * unit
    font = _font(text)
    source_lines = wrap(f"image threshold: {source}", font, width - 2 * pad) if source else []
    strip_h = bar_h + (4 + len(source_lines)) * text + (6 + len(source_lines)) * pad
    panel = Image.new("RGB", (width, image.height + strip_h), (255, 255, 255))
    panel.paste(image, (0, 0))
    draw = ImageDraw.Draw(panel)
    x0, x1, y = pad, width - pad, image.height + pad
    ramp = np.linspace(0.0, 2.0 * pixel_thr, max(2, x1 - x0))[None, :].repeat(bar_h, axis=0)
    panel.paste(Image.fromarray(heat_colors(ramp, pixel_thr)), (x0, y))
    mid = (x0 + x1) // 2
    draw.line([(mid, y - 2), (mid, y + bar_h + 2)], fill=(0, 0, 0), width=max(1, unit))
    y += bar_h + 2
    draw.text((x0, y), "0", fill=(0, 0, 0), font=font)
    draw.text((mid, y), f"{pixel_thr:.4g} (pixel threshold)", fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((x1, y), f"{2 * pixel_thr:.4g}", fill=(0, 0, 0), font=font, anchor="ra")
    decision = "DEFECTIVE" if score >= image_thr else "good"
    colour = (200, 0, 0) if decision == "DEFECTIVE" else (0, 120, 0)
    y += text + pad
    draw.text((x0, y), f"image score {score:.4g} {'>=' if score >= image_thr else '<'} image threshold "
                       f"{image_thr:.4g}: {decision}", fill=colour, font=font)  # fmt: skip
    y += text + pad
    draw.text(
        (x0, y), f"defect area {area} px (map >= pixel threshold {pixel_thr:.4g})", fill=(0, 0, 0), font=font
    )
    for line in source_lines:
        y += text + pad
        draw.text((x0, y), line, fill=(0, 0, 0), font=font)
    return panel


def wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a longer word stays whole)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and measure.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def upsample(amap: torch.Tensor, width: int, height: int) -> np.ndarray:
    """A (S, S) map resized bilinearly to (height, width)."""
    return F.interpolate(amap[None, None].float(), size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0].cpu().numpy()  # fmt: skip
