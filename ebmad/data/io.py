"""Image and mask decoding with Pillow (no torchvision), with errors that name the file.

Every image goes through the same steps; each case is either handled or refused with a
:class:`DatasetError` naming the file:

- formats: PNG, JPEG, BMP, TIFF (``IMAGE_SUFFIXES``, any case). Hidden files (``.DS_Store``,
  AppleDouble ``._x.png``) and ``Thumbs.db`` / ``desktop.ini`` are ignored; an empty (0-byte) or
  undecodable file is refused.
- orientation: the EXIF orientation tag is applied first (:func:`PIL.ImageOps.exif_transpose`), so
  sizes and pixels are those of the image as a viewer shows it.
- transparency (RGBA, LA, PA, palette or RGB with a transparent colour): composited on black,
  i.e. every channel is multiplied by alpha; a fully transparent pixel is black.
- bit depth: 16-bit images (Pillow modes ``I;16*``, or ``I`` with values in 0..65535) are scaled by
  1/65535 (Pillow's ``convert("L")`` would clip them at 255); float (``F``) images must lie in [0, 1].
- channels: a category is grayscale when all its training images are (modes ``1``/``L``/``LA``/
  16-bit, or a palette of gray entries only), otherwise colour; grayscale images of a colour category
  are replicated to three channels and colour images of a grayscale category are converted with the
  ITU-R 601-2 luma weights (Pillow's ``L``).
- size: every image is resized on its own (bilinear) to ``size`` x ``size``; non-square images are
  stretched, not cropped or padded, so a category may mix image sizes.
- masks: a pixel is defective when its value exceeds half of full scale (> 127 of 255, > 32767 of
  65535; any channel for colour masks; transparent = not defective), resized with nearest
  neighbour (``rule="half"``, MVTec AD and AD 2); or, for VisA (``rule="nonzero"``), when its stored
  value is non-zero, resized bilinearly as 0/1 and binarized at 0.5. A mask of another size than its image is accepted when the aspect ratios agree (within
  1%) and refused otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
IGNORED_NAMES = ("thumbs.db", "desktop.ini", "__macosx")
ASPECT_TOLERANCE = 0.01


class DatasetError(ValueError):
    """A dataset folder or file is missing, unreadable or inconsistent."""


def is_hidden(path: Path) -> bool:
    """Files and folders that operating systems leave behind: ``.DS_Store``, ``._x.png``, ``Thumbs.db``."""
    return path.name.startswith(".") or path.name.lower() in IGNORED_NAMES


def _check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc
    if size == 0:
        raise DatasetError(f"image file {path} is empty (0 bytes); delete or replace it")


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, EXIF orientation applied, or raise :class:`DatasetError` naming it."""
    path = Path(path)
    _check_not_empty(path)
    try:
        img = Image.open(path)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # Pillow raises many types on damaged files (OSError, SyntaxError, ...)
        raise DatasetError(f"cannot read image file {path}: {type(exc).__name__}: {exc}") from exc
    return img


def _gray_palette(img: Image.Image) -> bool:
    pal = img.getpalette("RGB") or []
    return pal[0::3] == pal[1::3] == pal[2::3]


def is_gray(img: Image.Image) -> bool:
    """Whether an image is grayscale by its mode (a palette counts as gray when all its entries are)."""
    if img.mode in ("P", "PA"):
        return _gray_palette(img)
    return img.mode in GRAY_MODES


def image_channels(path: Path) -> int:
    """1 for grayscale images, 3 otherwise (reads only the header)."""
    path = Path(path)
    _check_not_empty(path)
    try:
        with Image.open(path) as img:
            return 1 if is_gray(img) else 3
    except Exception as exc:
        raise DatasetError(f"cannot read image file {path}: {type(exc).__name__}: {exc}") from exc


def normalize_mode(img: Image.Image, path: Path) -> Image.Image:
    """An ``L`` or ``RGB`` (8-bit) image, or an ``F`` image in [0, 1] for 16-bit and float input.

    Transparency is composited on black; 16-bit values are divided by 65535.
    """
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(img)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DatasetError(
                f"image file {path} holds 32-bit integers in {arr.min()}..{arr.max()}; "
                "only 8-bit and 16-bit (0..65535) images are supported"
            )
        return Image.fromarray(arr.astype(np.float32) / 65535.0, "F")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise DatasetError(
                f"image file {path} is a float image with values outside [0, 1] "
                f"({np.nanmin(arr)}..{np.nanmax(arr)}); save it as 8-bit or 16-bit"
            )
        return img
    if mode == "1":
        return img.convert("L")
    if "A" in mode or "a" in mode or "transparency" in img.info:
        gray = is_gray(img)
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        rgb = Image.alpha_composite(black, img.convert("RGBA")).convert("RGB")
        return rgb.convert("L") if gray else rgb
    if mode in ("L", "RGB"):
        return img
    if mode == "P":
        return img.convert("L" if _gray_palette(img) else "RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _resize(img: Image.Image, size: int | tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """Resize to ``size`` x ``size`` or to ``size`` = (width, height)."""
    wh = (size, size) if isinstance(size, int) else tuple(size)
    if img.size == wh:
        return img
    return img.resize(wh, resample, reducing_gap=None)


def load_image(path: Path, size: int, channels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode, convert to ``channels`` and resize (stretch) to ``size`` x ``size``.

    Returns a float tensor (C, size, size) in [-1, 1] and the (width, height) after EXIF orientation.
    """
    img = open_image(path)
    orig = img.size
    img = normalize_mode(img, path)
    if img.mode == "F":  # high bit depth: kept as float through the resize
        arr = np.asarray(_resize(img, size, Image.BILINEAR), dtype=np.float32)[None] * 2.0 - 1.0
        if channels == 3:
            arr = np.repeat(arr, 3, axis=0)
        return torch.from_numpy(np.ascontiguousarray(arr)), orig
    img = _resize(img.convert("L" if channels == 1 else "RGB"), size, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).div_(127.5).sub_(1.0), orig


def same_aspect(a: tuple[int, int], b: tuple[int, int], tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Whether two (width, height) sizes have the same aspect ratio within a relative ``tolerance``."""
    ra, rb = a[0] / a[1], b[0] / b[1]
    return abs(ra - rb) <= tolerance * rb


def load_mask(path: Path, size: int | tuple[int, int], expected_size: tuple[int, int], image_path: Path,
              rule: str = "half") -> torch.Tensor:  # fmt: skip
    """Binary mask (size, size) (or (H, W) for ``size`` = (W, H)); checks it fits its image.

    ``rule="half"`` (MVTec): defective above half of full scale, resized with nearest neighbour.
    ``rule="nonzero"`` (VisA, masks stored as 0/1 or 0/255): defective where the stored value is non-zero
    (any channel, transparent = not defective), then resized as a 0/1 image (bilinear) and binarized at
    0.5, so a resize neither grows nor shrinks a region.
    A mask of another size than its image (``expected_size``, width x height) is accepted when the
    aspect ratios agree: both are stretched to ``size`` x ``size``, so they stay aligned.
    """
    if rule not in ("half", "nonzero"):
        raise ValueError(f"mask rule must be 'half' or 'nonzero', got {rule!r}")
    img = open_image(path)
    if img.size != expected_size and not same_aspect(img.size, expected_size):
        raise DatasetError(
            f"mask {path} is {img.size[0]}x{img.size[1]} but its image {image_path} is "
            f"{expected_size[0]}x{expected_size[1]} (different aspect ratio: the mask cannot be aligned)"
        )
    img = normalize_mode(img, path)
    if rule == "nonzero":
        arr = np.asarray(img)
        on = (arr.max(axis=2) if arr.ndim == 3 else arr) > 0
        resized = _resize(Image.fromarray(on.astype(np.float32), "F"), size, Image.BILINEAR)
        return torch.from_numpy(np.asarray(resized) > 0.5)
    if img.mode == "F":
        return torch.from_numpy(np.asarray(_resize(img, size, Image.NEAREST)) > 0.5)
    arr = np.asarray(img)
    if arr.ndim == 3:  # colour mask: defective where any channel is on
        img = Image.fromarray(arr.max(axis=2))
    return torch.from_numpy(np.asarray(_resize(img, size, Image.NEAREST)) > 127)


def list_images(folder: Path) -> list[Path]:
    """Sorted image files of a folder (hidden and system files left out)."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not is_hidden(p) and p.suffix.lower() in IMAGE_SUFFIXES
    )
