"""Anomaly texture sources for DRAEM: a folder of images (e.g. DTD) or procedural textures.

Both give ``sample(n, generator) -> (n, 3, size, size)`` RGB textures in [0, 1] on the generator's
device, chosen only through that generator (so training steps stay reproducible).
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from ebmad.data.io import IMAGE_SUFFIXES, DatasetError, is_hidden, load_image
from ebmad.models.draem.perlin import perlin_noise

log = logging.getLogger(__name__)
SETTING = "model.anomaly_source_dir"


class TextureSource(Protocol):
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor: ...


class FolderTextures:
    """Every image file under ``folder`` (nested folders too, hidden files skipped), decoded once as RGB
    and resized to ``size`` like the dataset images (:func:`ebmad.data.io.load_image`), kept as uint8.

    The official code reads ``<anomaly_source_path>/*/*.jpg`` (the DTD ``images`` folder) and picks one
    uniformly per training image; so does :meth:`sample`.
    """

    def __init__(self, folder: str | Path, size: int) -> None:
        self.folder = Path(folder).expanduser()
        self.size = size
        if not self.folder.is_dir():
            raise ValueError(
                f"anomaly texture folder {self.folder} ({SETTING}) does not exist or is not a folder"
            )
        files = sorted(
            p
            for p in self.folder.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(is_hidden(Path(part)) for part in p.relative_to(self.folder).parts)
        )
        if not files:
            raise ValueError(
                f"anomaly texture folder {self.folder} ({SETTING}) contains no image files "
                f"({', '.join(IMAGE_SUFFIXES)}), also not in subfolders"
            )
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            self.bank = torch.stack(list(pool.map(self._load, files)))  # uint8 (N, 3, size, size)
        log.info("loaded %d anomaly textures from %s at %dx%d", len(files), self.folder, size, size)
        self._on_device: torch.Tensor | None = None

    def _load(self, path: Path) -> torch.Tensor:
        try:
            img, _ = load_image(path, self.size, 3)  # [-1, 1]
        except DatasetError as exc:
            raise ValueError(f"{exc} (an anomaly texture under {SETTING}={self.folder})") from exc
        return ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def __len__(self) -> int:
        return len(self.bank)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` textures drawn uniformly with replacement, float in [0, 1]."""
        dev = generator.device
        if self._on_device is None or self._on_device.device != dev:
            self._on_device = self.bank.to(dev)
        idx = torch.randint(0, len(self._on_device), (n,), device=dev, generator=generator)
        return self._on_device[idx].float() / 255


class ProceduralTextures:
    """Random textures built on the device (no download): the default anomaly source.

    Each texture is one of four patterns (fractal Perlin noise of 4 octaves, sine/hard stripes,
    a rotated checkerboard, overlapping colour blobs) painted between two random colours, plus a
    random amount of fractal noise along a random colour direction. Everything comes from the generator.
    """

    KINDS = ("perlin", "stripes", "checker", "blobs")

    def __init__(self, size: int) -> None:
        self.size = size

    def _fractal(self, n: int, g: torch.Generator, octaves: int = 4) -> torch.Tensor:
        """Sum of Perlin octaves (n, S, S), base resolution 2^U{0..2}, normalized to [0, 1] per image."""
        dev, s = g.device, self.size
        base = 2 ** torch.randint(0, 3, (n, 2), device=dev, generator=g)
        side = 4 * 2 ** (octaves - 1) + 1
        angles = 2 * math.pi * torch.rand(octaves, n, side, side, device=dev, generator=g)
        noise = sum(0.5**o * perlin_noise(angles[o], base * 2**o, (s, s)) for o in range(octaves))
        lo = noise.flatten(1).amin(1)[:, None, None]
        hi = noise.flatten(1).amax(1)[:, None, None]
        return (noise - lo) / (hi - lo).clamp_min(1e-6)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        g, dev, s = generator, generator.device, self.size

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(n, *shape, device=dev, generator=g)

        ax = (torch.arange(s, device=dev, dtype=torch.float32) + 0.5) / s
        yy, xx = ax[None, :, None], ax[None, None, :]
        theta = math.pi * rand()[:, None, None]
        freq = (2 + 14 * rand())[:, None, None]  # cycles across the image
        phase = 2 * math.pi * rand()[:, None, None]
        t1 = xx * torch.cos(theta) + yy * torch.sin(theta)
        t2 = -xx * torch.sin(theta) + yy * torch.cos(theta)
        s1 = torch.sin(2 * math.pi * freq * t1 + phase)
        hardness = (1 + 20 * rand())[:, None, None]  # soft sine to hard-edged stripes
        stripes = torch.sigmoid(hardness * s1)
        checker = (s1 * torch.sin(2 * math.pi * freq * t2 + phase) > 0).float()
        centres, radii = rand(8, 2), 0.04 + 0.2 * rand(8)
        d2 = (xx[..., None] - centres[:, None, None, :, 0]) ** 2 + (
            yy[..., None] - centres[:, None, None, :, 1]
        ) ** 2
        blobs = torch.exp(-d2 / (2 * radii[:, None, None, :] ** 2)).amax(-1)
        patterns = torch.stack((self._fractal(n, g), stripes, checker, blobs), dim=1)  # (n, 4, S, S)
        kind = torch.randint(0, len(self.KINDS), (n,), device=dev, generator=g)
        pattern = patterns[torch.arange(n, device=dev), kind][:, None]  # (n, 1, S, S)
        c0, c1 = rand(3)[:, :, None, None], rand(3)[:, :, None, None]
        tex = c0 + (c1 - c0) * pattern
        # fractal noise along a random colour direction, of random strength
        colour_noise = (self._fractal(n, g)[:, None] - 0.5) * (2 * rand(3) - 1)[:, :, None, None]
        tex = tex + 0.6 * rand()[:, None, None, None] * colour_noise
        return tex.clamp(0, 1)
