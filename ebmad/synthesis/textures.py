"""Texture sources for pasted anomalies: a folder of images (e.g. DTD) or procedural textures.

One implementation for DRAEM's training synthesis, SSAE's corruption and the label-free validation
anomalies. Every source gives ``sample(n, generator) -> (n, C, size, size)`` textures in [0, 1] on the
generator's device, chosen only through that generator (so training steps stay reproducible).
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ebmad.data.io import IMAGE_SUFFIXES, DatasetError, is_hidden, load_image
from ebmad.synthesis.perlin import perlin_noise

log = logging.getLogger(__name__)
SETTING = "model.anomaly_source_dir"


class TextureSource(Protocol):
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor: ...


class TextureFolderMissing(FileNotFoundError, ValueError):
    """The texture folder does not exist (a bad setting: both a missing file and a bad value)."""


class FolderTextures:
    """Every image file under ``folder`` (nested folders too, hidden files skipped), decoded as RGB (or
    grayscale for ``channels=1``) and resized to ``size`` like the dataset images
    (:func:`ebmad.data.io.load_image`), kept as uint8 on the CPU.

    The official DRAEM code reads ``<anomaly_source_path>/*/*.jpg`` (the DTD ``images`` folder) and picks
    one uniformly per training image; so does :meth:`sample`.

    ``preload=False`` decodes only the files :meth:`sample` draws (a validation set needs a few dozen of
    DTD's thousands). ``keep_on_device`` keeps a copy of the whole bank on the sampling device (DRAEM:
    no host copy per step); without it only the drawn textures are copied (SSAE: 1.1 GB of DTD at 256²
    would not fit beside the model on a small GPU). ``setting`` names the option in error messages.
    """

    def __init__(self, folder: str | Path, size: int, channels: int = 3, *, setting: str = SETTING,
                 preload: bool = True, keep_on_device: bool = True) -> None:  # fmt: skip
        self.folder = Path(folder).expanduser()
        self.size, self.channels, self.setting = size, channels, setting
        self.keep_on_device = keep_on_device
        if channels not in (1, 3):
            raise ValueError(f"texture channels must be 1 or 3, got {channels}")
        if not self.folder.is_dir():
            raise TextureFolderMissing(
                f"anomaly texture folder {self.folder} ({setting}) does not exist or is not a folder"
            )
        self.files = sorted(
            p
            for p in self.folder.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(is_hidden(Path(part)) for part in p.relative_to(self.folder).parts)
        )
        if not self.files:
            raise DatasetError(
                f"anomaly texture folder {self.folder} ({setting}) contains no images: no image files "
                f"({', '.join(IMAGE_SUFFIXES)}), also not in subfolders"
            )
        self._bank: torch.Tensor | None = None
        self._decoded: dict[int, torch.Tensor] = {}
        self._on_device: torch.Tensor | None = None
        if preload:
            _ = self.bank

    def _load(self, path: Path) -> torch.Tensor:
        try:
            img, _ = load_image(path, self.size, self.channels)  # [-1, 1]
        except DatasetError as exc:
            raise ValueError(f"{exc} (an anomaly texture under {self.setting}={self.folder})") from exc
        return ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    @property
    def bank(self) -> torch.Tensor:
        """Every texture, uint8 (N, C, size, size) on the CPU (decoded on first use)."""
        if self._bank is None:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                self._bank = torch.stack(list(pool.map(self._load, self.files)))
            log.info("loaded %d anomaly textures from %s at %dx%d", len(self.files), self.folder,
                     self.size, self.size)  # fmt: skip
        return self._bank

    data = bank  # SSAE's name for it

    def __len__(self) -> int:
        return len(self.files)

    def sample(self, n: int, generator: torch.Generator, device: torch.device | None = None) -> torch.Tensor:
        """``n`` textures drawn uniformly with replacement, float in [0, 1] on the generator's device."""
        dev = generator.device
        if device is not None and torch.device(device) != dev:
            raise ValueError(f"textures are sampled on the generator's device {dev}, not {device}")
        idx = torch.randint(0, len(self.files), (n,), device=dev, generator=generator)
        if self._bank is None and not self.keep_on_device:  # decode only what is drawn
            picked = idx.cpu().tolist()
            for i in set(picked) - self._decoded.keys():
                self._decoded[i] = self._load(self.files[i])
            return torch.stack([self._decoded[i] for i in picked]).to(dev).float() / 255
        if self.keep_on_device:
            if self._on_device is None or self._on_device.device != dev:
                self._on_device = self.bank.to(dev)
            return self._on_device[idx].float() / 255
        return self.bank[idx.cpu()].to(dev).float() / 255


class ProceduralTextures:
    """Random RGB textures built on the device (no download): DRAEM's default anomaly source.

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


def value_noise(shape: tuple[int, int, int, int], generator: torch.Generator, device: torch.device,
                octaves: int = 4) -> torch.Tensor:  # fmt: skip
    """Multi-octave value noise (N, C, H, W) in [0, 1], min-max normalised per image and channel (SSAE's).

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


PATCH_SHIFT = (0.25, 0.75)  # other images are moved by this share of the side (each axis)


def shifted_others(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each image another image of the batch (never itself), rolled by a random (dy, dx) in
    ``PATCH_SHIFT`` of the side: the same region of another aligned object is normal, out of place it is not.

    Shared by the ``perlin_patch`` validation kind and :class:`BatchImages` (the EBM's training source).
    """
    g = generator
    n, _, h, w = images.shape
    if n < 2:
        raise ValueError(f"another image's region needs at least 2 images, got {n}")
    shift = torch.randint(1, n, (n,), device=g.device, generator=g)
    other = images[((torch.arange(n, device=g.device) + shift) % n).to(images.device)]
    lo, hi = PATCH_SHIFT
    offsets = (lo + (hi - lo) * torch.rand(n, 2, device=g.device, generator=g)) * torch.tensor(
        [h, w], device=g.device
    )
    return torch.stack(
        [o.roll(tuple(d), dims=(1, 2)) for o, d in zip(other, offsets.long().tolist(), strict=True)]
    )


class BatchImages:
    """Textures taken from the other images of a training batch (:func:`shifted_others`), in [0, 1]."""

    def __init__(self, images01: torch.Tensor) -> None:
        self.images = images01

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if n != len(self.images):
            raise ValueError(f"BatchImages samples one texture per batch image ({len(self.images)}), not {n}")
        return shifted_others(self.images, generator)


def texture_source(texture_dir: str | Path | None, size: int, setting: str = "data.val_texture_dir",
                   training: bool = False) -> TextureSource:  # fmt: skip
    """RGB textures: the folder's images, else procedural ones.

    For validation (default) a folder's images are decoded only when drawn; for ``training`` (DRAEM, the EBM's
    ``oe_*`` term) the whole folder is decoded once and kept on the sampling device.
    """
    if texture_dir:
        return FolderTextures(
            texture_dir, size, 3, setting=setting, preload=training, keep_on_device=training
        )
    return ProceduralTextures(size)
