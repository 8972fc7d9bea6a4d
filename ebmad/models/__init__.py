"""The anomaly-detection methods ebmad runs, by name (``model=ebm|draem|ssae|patchcore|padim|feature_ebm``)."""

from __future__ import annotations

import importlib

from ebmad.models.base import AnomalyModule

MODEL_CLASSES = {
    "ebm": "ebmad.models.ebm.EBMModule",
    "draem": "ebmad.models.draem.DraemModule",
    "ssae": "ebmad.models.ssae.SSAEModule",
    "patchcore": "ebmad.models.patchcore.PatchCoreModule",
    "padim": "ebmad.models.padim.PadimModule",
    "feature_ebm": "ebmad.models.feature_ebm.FeatureEBMModule",
}


def model_class(name: str) -> type[AnomalyModule]:
    """The LightningModule class of a model type, e.g. ``model_class("draem")``."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model type {name!r}; known: {sorted(MODEL_CLASSES)}")
    module, _, cls = MODEL_CLASSES[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)


__all__ = ["AnomalyModule", "MODEL_CLASSES", "model_class"]
