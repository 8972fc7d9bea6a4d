"""What the methods on a frozen pretrained backbone share: a fit pass with progress, checkpoint provenance."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from ebmad.models.backbones import BACKBONES
from ebmad.models.base import AnomalyModule, check

log = logging.getLogger(__name__)


def check_backbone_settings(backbone: str, image_size: int) -> None:
    """Configuration checks common to the backbone methods (each names its setting)."""
    check(
        backbone in BACKBONES, f"model.backbone={backbone!r} is not known; choose one of {sorted(BACKBONES)}"
    )
    check(image_size >= 32, f"data.image_size={image_size} is too small for a pretrained backbone (>= 32)")


def fit_progress(batches: Iterable[dict[str, torch.Tensor]], what: str) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate the fit pass's batches with a progress bar on a terminal, else a log line every 30 s."""
    total = len(batches) if hasattr(batches, "__len__") else None
    if sys.stderr.isatty():
        yield from tqdm(batches, total=total, desc=what, unit="batch", leave=False)
        return
    last = start = time.perf_counter()
    for i, batch in enumerate(batches):
        yield batch
        now = time.perf_counter()
        if now - last >= 30:
            last = now
            log.info("%s: batch %d/%s, %.0f s", what, i + 1, total or "?", now - start)


def images_in_range(batches: Iterable[dict[str, torch.Tensor]], lo: int, hi: int
                    ) -> Iterator[tuple[torch.Tensor, int]]:  # fmt: skip
    """The training images lo..hi-1 (positions in the batches' order), batch by batch: (images, position of
    the first). For refits without a fold (leave-out scores)."""
    seen = 0
    for batch in batches:
        x = batch["image"]
        a, b = max(lo, seen) - seen, min(hi, seen + len(x)) - seen
        if a < b:
            yield x[a:b], seen + a
        seen += len(x)
        if seen >= hi:
            break


class PretrainedFeatureModule(AnomalyModule):
    """Base of the fit-only methods on a frozen backbone (PatchCore, PaDiM).

    Their fit is :meth:`fit_statistics` (one pass over the training images, no optimizer, no training
    steps: ``trainer.max_steps`` does not apply). The backbone's weights travel in the checkpoint, so a
    checkpoint made with ``model.backbone_weights=PATH`` loads where that file is absent.
    """

    FIT_ONLY = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        hp = checkpoint.get("hyper_parameters", {})
        if hp.get("backbone_weights"):  # the weights are in the state dict; keep where they came from
            checkpoint["ebmad_backbone_weights"] = str(hp["backbone_weights"])
            checkpoint["hyper_parameters"] = {**hp, "backbone_weights": None}
