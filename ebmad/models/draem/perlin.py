"""DRAEM's Perlin masks: moved to :mod:`ebmad.synthesis.perlin` (shared with the validation anomalies)."""

from ebmad.synthesis.perlin import MAX_SCALE_EXP, perlin_noise, rand_perlin_mask, rand_perlin_noise

__all__ = ["MAX_SCALE_EXP", "perlin_noise", "rand_perlin_mask", "rand_perlin_noise"]
