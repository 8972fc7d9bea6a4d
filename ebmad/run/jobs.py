"""Job bookkeeping of a run folder: its identity, skip/resume decisions and status records.

A run folder holds ``job.json`` (the data/model/seed identity it was started with) and, once the job ends,
``results.json`` with its ``status``: ``completed``, ``diverged``, ``interrupted`` or ``failed``. Re-running
the same command (or sweep) skips completed and diverged jobs, resumes interrupted ones from their newest
valid checkpoint, and refuses a folder that belongs to another configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from ebmad.reliability.checkpointing import pick_resume_checkpoint
from ebmad.run.metadata import write_json

MAX_JOB_DIR = 120
IDENTITY_KEYS = ("data", "model", "seed")  # what must match to resume or skip a job in the same folder
NOT_IDENTITY = {"data": ("root", "test_batch_size"), "model": ("n_examples", "pixel_auroc_thresholds")}
FINAL = (
    "completed",
    "diverged",
)  # a diverged job would diverge again (same seed): skipped like a completed one


def job_dir_name(override_dirname: str) -> str:
    """A sweep job's folder name: its overrides, or ``<category>-<hash>`` when they are too long for a path.

    Deterministic, so re-running a sweep finds the same folders; the full overrides are always in
    ``.hydra/overrides.yaml``.
    """
    if not override_dirname:
        return "default"
    if len(override_dirname) <= MAX_JOB_DIR:
        return override_dirname
    category = next(
        (kv.split("=", 1)[1] for kv in override_dirname.split(",") if kv.startswith("data.category=")), "job"
    )
    return f"{category}-{hashlib.sha1(override_dirname.encode()).hexdigest()[:12]}"


OmegaConf.register_new_resolver("ebmad_job_dir", job_dir_name, replace=True)
# the launch folder without Hydra's runtime (not yet set when a config's `hydra.mode: MULTIRUN` starts a sweep)
OmegaConf.register_new_resolver("ebmad_cwd", os.getcwd, replace=True)


class Preempted(Exception):
    """Training stopped on a signal after writing its checkpoint."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum = signum


def job_identity(cfg: DictConfig) -> dict[str, Any]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    identity = {k: resolved.get(k) for k in IDENTITY_KEYS}
    for group, keys in NOT_IDENTITY.items():
        for key in keys:
            (identity.get(group) or {}).pop(key, None)
    return identity


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def prepare_job(cfg: DictConfig, out: Path, model_type: str) -> tuple[dict[str, Any] | None, str | None]:
    """Decide what an existing run folder means: (results to reuse, checkpoint to resume from).

    With ``resume=true`` (the default) a folder whose ``results.json`` says completed (or diverged) is
    skipped, and one with a valid checkpoint resumes from it. A folder holding a run of a different
    data/model/seed configuration is refused rather than mixed.
    """
    job_file = out / "job.json"
    identity = job_identity(cfg)
    if cfg.get("resume", True) and job_file.is_file():
        before = json.loads(job_file.read_text())["identity"]
        if before != identity:
            diff = diff_keys(before, identity)
            raise ValueError(
                f"{out} holds a run with a different configuration ({', '.join(diff)} differ); use another "
                "sweep_name / hydra.run.dir, or resume=false to start over in this folder"
            )
        results_file = out / "results.json"
        if results_file.is_file():
            results = json.loads(results_file.read_text())
            if results.get("status") in FINAL and (cfg.test or not cfg.train):
                return results, None
        if cfg.train and not cfg.get("ckpt_path"):
            ckpt = pick_resume_checkpoint(out / "checkpoints", model_type, cfg.data.image_size,
                                          cfg.data.get("channels"))  # fmt: skip
            if ckpt is not None:
                return None, str(ckpt)
    if rank_zero_only.rank == 0:
        write_json(job_file, {"identity": identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return None, None


def wandb_run_id(out: Path) -> str:
    """A W&B run id kept in the run folder, so that a resumed job continues the same W&B run."""
    path = out / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    if rank_zero_only.rank == 0:
        path.write_text(run_id)
    return run_id


def write_status(out: Path, status: str, **fields: Any) -> None:
    """``results.json`` of a job that ended without results (``diverged``, ``interrupted``)."""
    write_json(out / "results.json", {"status": status, **fields})


def job_overrides() -> list[str]:
    """This job's command-line overrides (empty outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(cfg: DictConfig, exc: BaseException) -> None:
    """results.json with status failed, so sweeps and reports show the job instead of dropping it."""
    out = Path(cfg.paths.output_dir)
    category = OmegaConf.select(cfg, "data.category", default=None)
    write_status(out, "failed", category=category, error=f"{type(exc).__name__}: {exc}",
                 traceback=traceback.format_exc(), overrides=job_overrides())  # fmt: skip


# ----------------------------------------------------------------------------------------- sweep order
# {"total": the job count of the running local sweep}, set by the launcher patch
SWEEP_SIZE: dict[str, int | None] = {}


def seed_major(job_overrides: list[list[str]], key: str = "seed") -> list[int]:
    """Launch order of a sweep's jobs: by the position of their ``seed`` value (first seen first), else as given.

    Every method and category then gets its first seed before any gets a second, so a sweep stopped early
    still compares every method.
    """
    rank: dict[str, int] = {}
    seeds = []
    for overrides in job_overrides:
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), "")
        seeds.append(rank.setdefault(value, len(rank)))
    return sorted(range(len(job_overrides)), key=lambda i: seeds[i])


def order_sweep_jobs() -> None:
    """Make Hydra's local launcher run a sweep seed-major (:func:`seed_major`) and record its size, for the
    "job i/N" lines (:func:`sweep_position`). Results go back to the sweeper in its own order. Idempotent.

    Called when a multirun starts (``ebmad.report.SweepSummary``): Hydra re-executes its plugin modules when
    it scans them, which would undo a patch made earlier."""
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    launch = BasicLauncher.launch
    if getattr(launch, "ebmad_seed_major", False):
        return

    def seed_major_launch(self: Any, job_overrides: Any, initial_job_idx: int) -> Any:
        jobs = [list(o) for o in job_overrides]
        order = seed_major(jobs)
        sweeper = (self.config.hydra.get("sweeper") if self.config is not None else None) or {}
        SWEEP_SIZE["total"] = sweeper.get("n_trials") or (
            None if sweeper.get("max_batch_size") else initial_job_idx + len(jobs)
        )
        runs = launch(self, [jobs[i] for i in order], initial_job_idx)
        back: list[Any] = [None] * len(jobs)
        for pos, i in enumerate(order):
            back[i] = runs[pos]
        return back

    seed_major_launch.ebmad_seed_major = True  # type: ignore[attr-defined]
    BasicLauncher.launch = seed_major_launch


def sweep_position() -> tuple[int, int | None] | None:
    """(this job's 1-based number, the sweep's job count or None when unknown) in a multirun, else None."""
    if not in_multirun():
        return None
    num = HydraConfig.get().job.get("num")
    return (int(num) + 1 if num is not None else 0), SWEEP_SIZE.get("total")
