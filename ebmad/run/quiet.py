"""Library messages that do not apply to an ebmad run, silenced precisely: each by its message (and warning
category or logger), each with the reason it does not apply. Never a blanket filter.

:func:`install` is called by the entry points (``ebmad.train``, ``ebmad.report``, ``ebmad.export``) before
any work; :func:`quiet_wandb_logger` by the logger builder. What ebmad itself has to say (a threshold fitted
on few images, a test set without defects) stays: those are ebmad's own log lines, not these.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from lightning_fabric.utilities.warnings import PossibleUserWarning

# (message regex, category, why it does not apply)
WARNING_FILTERS: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "pytorch_lightning's own use of a torch pytree API torch deprecates; nothing a user can change",
    ),
    (
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        PossibleUserWarning,
        "ebmad trains for trainer.max_steps and logs every log_every_n_steps global steps across epochs: the "
        "per-epoch logs the warning is about are not used",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        UserWarning,
        "the feature EBM's pretrained backbone is frozen in eval mode on purpose (ImageNet batch-norm statistics); "
        "only its small energy head trains",
    ),
    (
        r"No (positive|negative) samples in targets",
        UserWarning,
        "a test set without defects (or without defect pixels): ebmad reports its false-alarm rate instead of an "
        "AUROC and says so in one line of its own",
    ),
)
# (logger names, message regex, why it does not apply)
LOG_FILTERS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"),
        r"litlogger",
        "an advertisement for a cloud logger, printed by every Trainer",
    ),
    (
        ("pytorch_lightning.trainer.connectors.checkpoint_connector",),
        r"`weights_only` was not set",
        "ebmad writes full checkpoints on purpose (exact resume needs the optimizer and loop state) and loads "
        "every checkpoint with weights_only=True (ebmad.reliability.checkpointing)",
    ),
)


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern``."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Install the filters of :data:`WARNING_FILTERS` and :data:`LOG_FILTERS` (idempotent)."""
    for message, category, _why in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for names, pattern, _why in LOG_FILTERS:
        for name in names:
            logger = logging.getLogger(name)
            if not any(isinstance(f, DropMessages) and f.pattern.pattern == pattern for f in logger.filters):
                logger.addFilter(DropMessages(pattern))


def quiet_wandb_logger(logger: Any) -> Any:
    """Lightning's WandbLogger always passes ``anonymous=None`` to ``wandb.init``, which W&B answers with
    "The anonymous setting has no effect"; an unset value is dropped here (the setting is unused)."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    return logger
