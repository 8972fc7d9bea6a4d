"""The untrained reference: the same architecture at its initial weights, scored the same way.

A trained model is only worth its training if it beats this reference (for the EBM of Genc et al. the
randomly initialised network's standardized gradient maps localize defects surprisingly well). The
reference is rebuilt from the trained model's own hyperparameters and seed, so its weights are exactly
the ones training started from; it fits its own statistics on the same training images.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from ebmad.data.loader import DeviceBatchLoader
from ebmad.models.base import AnomalyModule


def initial_model(model: AnomalyModule) -> AnomalyModule:
    """A fresh module of the same class and hyperparameters, initialised as training was (same seed)."""
    with torch.random.fork_rng(devices=[]):
        pl.seed_everything(int(model.hparams.seed), workers=True, verbose=False)
        return type(model)(**model.hparams)


def untrained_reference(model: AnomalyModule, train: dict[str, torch.Tensor], test: dict[str, torch.Tensor],
                        batch_size: int, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Metrics of the initial-weights model on the test set (statistics fitted on all training images)."""
    ref = initial_model(model).to(device)
    ref.adopt_fixed_parts(model)
    ref.eval()
    with torch.no_grad():
        ref.fit_statistics(DeviceBatchLoader({"image": train["image"]}, batch_size))
    return ref.evaluate(DeviceBatchLoader(test, batch_size))


def training_gain(trained: dict[str, float], untrained: dict[str, float], keys: list[str]) -> str:
    """One log line: each metric of ``keys`` untrained -> trained (difference), where both exist.

    ``what training added (untrained reference -> trained): image_auroc/energy 0.490 -> 0.948 (+0.458), ...``
    """
    parts = [f"{k} {untrained[k]:.3f} -> {trained[k]:.3f} ({trained[k] - untrained[k]:+.3f})"
             for k in keys if k in trained and k in untrained]  # fmt: skip
    return "what training added (untrained reference -> trained): " + (
        ", ".join(parts) if parts else "nothing to compare"
    )
