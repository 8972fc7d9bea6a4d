"""SSAE's texture images: the shared :class:`ebmad.synthesis.textures.FolderTextures`, kept on the CPU.

Folder images are decoded once, resized to the working resolution and kept as uint8 on the CPU (the
5,640 DTD images are ~1.1 GB at 256x256 RGB, too much to hold as floats on the GPU); each step copies
only the few it uses to the device. Procedural textures are multi-octave value noise
(:func:`ebmad.synthesis.textures.value_noise`), made on the device from the step's generator.
"""

from __future__ import annotations

from pathlib import Path

from ebmad.synthesis import textures as _shared
from ebmad.synthesis.textures import value_noise

__all__ = ["FolderTextures", "value_noise"]


class FolderTextures(_shared.FolderTextures):
    """All images under ``folder`` (recursively), as (N, C, size, size) uint8 on the CPU; ``sample`` copies
    only the drawn ones to the device."""

    def __init__(self, folder: str | Path, size: int, channels: int) -> None:
        super().__init__(folder, size, channels, keep_on_device=False)
