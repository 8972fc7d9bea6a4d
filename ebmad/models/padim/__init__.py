"""PaDiM (Defard et al., 2020): a Gaussian of pretrained patch embeddings per position, Mahalanobis scores."""

from ebmad.models.padim.lightning_model import PadimModule

__all__ = ["PadimModule"]
