"""Hydra + Lightning DDP glue.

Lightning's subprocess launcher starts ranks 1..N-1 by re-running the command line. Under a Hydra
multirun that re-runs the whole sweep (``-m`` and all), and its ``hydra.run.dir`` is not the job's
folder, which gives duplicated output folders and wrong jobs. ``hydra_ddp_command`` instead starts
each extra rank as a single run of *this job*: the job's own overrides and its output folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def hydra_ddp_command(local_rank: int) -> tuple[Sequence[str], str]:
    """Command and cwd for DDP rank ``local_rank`` of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    run_dir = str(hc.runtime.output_dir).replace("\\", "\\\\").replace("'", "\\'")
    command = [sys.executable, "-m", "ebmad.train", *hc.overrides.task]
    command += [
        f"hydra.run.dir='{run_dir}'",  # quoted: sweep folders are named like "data.category=x,model.lr=y"
        "hydra.output_subdir=null",
        f"hydra.job.name=train_ddp_process_{local_rank}",
    ]
    return command, get_original_cwd()


def patch_lightning_hydra_launcher() -> None:
    """Make Lightning's DDP subprocess launcher use :func:`hydra_ddp_command`."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = hydra_ddp_command


@contextmanager
def isolated_job() -> Iterator[None]:
    """Run one job so that the next job of a multirun starts clean.

    Lightning's launcher leaves ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` ... in ``os.environ``
    and an initialized process group; the next DDP job would then believe its ranks were started
    externally and wait for them forever. Both are undone here.
    """
    env = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
