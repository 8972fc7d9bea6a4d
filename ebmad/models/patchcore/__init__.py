"""PatchCore (Roth et al., CVPR 2022): memory bank of pretrained patch features, nearest-neighbour scores."""

from ebmad.models.patchcore.lightning_model import PatchCoreModule

__all__ = ["PatchCoreModule"]
