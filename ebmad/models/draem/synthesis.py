"""DRAEM's simulated anomalies: moved to :mod:`ebmad.synthesis.perlin_anomalies` (one implementation, shared
with the EBM's energy-margin training, ``model.oe_weight``)."""

from ebmad.synthesis.blend import blend
from ebmad.synthesis.perlin import rand_perlin_mask
from ebmad.synthesis.perlin_anomalies import BETA_MAX, CLEAN_PROB, synthesize

__all__ = ["BETA_MAX", "CLEAN_PROB", "blend", "rand_perlin_mask", "synthesize"]
