"""DRAEM's anomaly texture sources: moved to :mod:`ebmad.synthesis.textures` (one implementation, shared
with SSAE and the validation anomalies). DRAEM uses RGB textures kept on the training device."""

from ebmad.synthesis.textures import SETTING, FolderTextures, ProceduralTextures, TextureSource

__all__ = ["SETTING", "FolderTextures", "ProceduralTextures", "TextureSource"]
