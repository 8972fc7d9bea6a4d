"""Anomaly synthesis shared by training (DRAEM, SSAE) and the label-free validation.

:mod:`.perlin` (DRAEM's Perlin masks), :mod:`.textures` (folder and procedural texture sources),
:mod:`.blend` (DRAEM's blend, masked paste) and :mod:`.kinds` (the validation anomaly kinds).
"""

from ebmad.synthesis.kinds import (
    KINDS,
    STRENGTHS,
    describe,
    favoured,
    layout,
    neutral_kinds,
    validation_anomalies,
)

__all__ = ["KINDS", "STRENGTHS", "describe", "favoured", "layout", "neutral_kinds", "validation_anomalies"]
