"""The EBM of Genc et al.: energy network (plain module), SGLD, gradient-map scoring, LightningModule."""

from ebmad.models.ebm.lightning_model import EBMModule
from ebmad.models.ebm.network import EnergyNet

__all__ = ["EBMModule", "EnergyNet"]
