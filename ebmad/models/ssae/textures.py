"""Texture images for the pasted patches: an optional user folder (e.g. DTD) and procedural noise.

Folder images are decoded once, resized to the working resolution and kept as uint8 on the CPU (the
5,640 DTD images are ~1.1 GB at 256x256 RGB, too much to hold as floats on the GPU); each step copies
only the few it uses to the device. Procedural textures are multi-octave value noise, made on the
device from the step's generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ebmad.data.io import IMAGE_SUFFIXES, DatasetError, open_image


class FolderTextures:
    """All images under ``folder`` (recursively), as (N, C, size, size) uint8, loaded on first use."""

    def __init__(self, folder: str | Path, size: int, channels: int) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"model.anomaly_source_dir={self.folder} does not exist or is not a folder"
            )
        self.files = sorted(
            p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise DatasetError(f"model.anomaly_source_dir={self.folder} contains no images (.png, .jpg, ...)")
        self.size, self.channels = size, channels
        self._data: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def data(self) -> torch.Tensor:
        if self._data is None:
            self._data = torch.stack([self._load(p) for p in self.files])
        return self._data

    def _load(self, path: Path) -> torch.Tensor:
        img = open_image(path).convert("L" if self.channels == 1 else "RGB")
        img = img.resize((self.size, self.size), Image.BILINEAR, reducing_gap=None)
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy())

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """``n`` textures drawn with replacement, as floats in [0, 1] on ``device``."""
        idx = torch.randint(0, len(self.files), (n,), generator=generator, device=device).cpu()
        return self.data[idx].to(device).float().div_(255.0)


def value_noise(shape: tuple[int, int, int, int], generator: torch.Generator, device: torch.device,
                octaves: int = 4) -> torch.Tensor:  # fmt: skip
    """Multi-octave value noise (N, C, H, W) in [0, 1], min-max normalised per image and channel.

    Octave k is a random grid of 2^(k + base) cells (base in {1, 2, 3}, drawn per call), upsampled
    bilinearly and weighted 0.5^k.
    """
    n, c, h, w = shape
    base = int(torch.randint(1, 4, (1,), generator=generator, device=device))
    out = torch.zeros(shape, device=device)
    for k in range(octaves):
        cells = min(2 ** (k + base), h, w)
        grid = torch.rand((n, c, cells, cells), generator=generator, device=device)
        out += 0.5**k * F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    lo = out.amin(dim=(2, 3), keepdim=True)
    hi = out.amax(dim=(2, 3), keepdim=True)
    return (out - lo) / (hi - lo).clamp(min=1e-6)
