"""DRAEM (Zavrtanik et al., ICCV 2021): networks, simulated anomalies, loss, LightningModule."""

from ebmad.models.draem.lightning_model import DraemModule, DraemScorer
from ebmad.models.draem.network import DraemNet

__all__ = ["DraemModule", "DraemNet", "DraemScorer"]
