"""The feature-space EBM: an energy over frozen pretrained patch features, trained by contrastive divergence."""

from ebmad.models.feature_ebm.lightning_model import FeatureEBMModule

__all__ = ["FeatureEBMModule"]
