"""Image and mask decoding with Pillow (no torchvision), with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class DatasetError(ValueError):
    """A dataset folder or file is missing, unreadable or inconsistent."""


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, or raise :class:`DatasetError` naming it."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc
    return img


def image_channels(path: Path) -> int:
    """1 for grayscale images, 3 otherwise (reads only the header)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc
    return 1 if mode in GRAY_MODES else 3


def load_image(path: Path, size: int, channels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode, convert to ``channels`` and resize to ``size`` x ``size``.

    Returns a float tensor (C, size, size) in [-1, 1] and the original (width, height).
    """
    img = open_image(path)
    orig = img.size
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).div_(127.5).sub_(1.0), orig


def load_mask(path: Path, size: int, expected_size: tuple[int, int], image_path: Path) -> torch.Tensor:
    """Binary mask (size, size), resized with nearest neighbour; checks it matches its image."""
    img = open_image(path)
    if img.size != expected_size:
        raise DatasetError(
            f"mask {path} is {img.size[0]}x{img.size[1]} but its image {image_path} is "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    img = img.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(img) > 127)


def list_images(folder: Path) -> list[Path]:
    """Sorted image files of a folder."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
