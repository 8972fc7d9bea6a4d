"""The self-supervised autoencoder (SSAE) of Bauer, Nakajima & Mueller: network, corruption, loss, LightningModule."""

from ebmad.models.ssae.lightning_model import SSAEModule
from ebmad.models.ssae.network import SSAENet

__all__ = ["SSAEModule", "SSAENet"]
