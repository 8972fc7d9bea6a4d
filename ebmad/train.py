"""Hydra entry point: ``python -m ebmad.train [overrides]`` (console script ``ebmad-train``).

Trains one model (``model=ebm|draem|ssae``) on one category's defect-free images, fits its scoring
statistics, evaluates on the test set and writes ``results.json`` (plus ``scores.csv``) into the run's
output folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from ebmad.callbacks import preemption_signal
from ebmad.checkpointing import AtomicCheckpointIO, pick_resume_checkpoint, validate_checkpoint
from ebmad.data.mvtec import MVTecDataModule
from ebmad.data.synthetic import generate_category
from ebmad.distributed import isolated_job, patch_lightning_hydra_launcher
from ebmad.evaluation.protocol import run_figures, test_set_metrics
from ebmad.guards import TrainingDiverged
from ebmad.models import AnomalyModule, model_class
from ebmad.untrained import untrained_reference
from ebmad.utils import PROJECT_ROOT, device_info, git_commit, score_statistics, write_json

log = logging.getLogger("ebmad")
CONF_DIR = PROJECT_ROOT / "conf"
MAX_JOB_DIR = 120


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


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising our own configuration errors unwrapped (they name the key)."""
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, ValueError | OSError):
            raise exc.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig) -> MVTecDataModule:
    """Instantiate the datamodule; writes the synthetic category first when ``data.synthetic`` is set."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    synth = data_cfg.pop("synthetic", None)
    if synth:
        generate_category(data_cfg["root"], data_cfg["category"], **synth)
    return instantiate(data_cfg)


def build_model(cfg: DictConfig, dm: MVTecDataModule) -> AnomalyModule:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if model_cfg.get("in_channels") in (None, "auto"):
        model_cfg["in_channels"] = dm.num_channels
    return instantiate(model_cfg)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]


def build_loggers(cfg: DictConfig, out: Path, model_type: str = "ebm") -> list[Any]:
    """The configured loggers; a W&B run is named ``<name>-<model>`` and tagged with the model type, so the
    models of one sweep (one W&B group) can be told apart and compared."""
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c or "_target_" not in c:
            continue
        if c._target_.endswith("WandbLogger"):
            tags = [*(c.get("tags") or []), f"model:{model_type}"]
            loggers.append(instantiate(c, id=wandb_run_id(out), resume="allow", name=f"{c.name}-{model_type}",
                                       tags=tags))  # fmt: skip
        else:
            loggers.append(instantiate(c))
    return loggers


def check_config(cfg: DictConfig) -> None:
    """Reject settings that would give silently wrong numbers."""
    if cfg.trainer.get("inference_mode", True):
        raise ValueError(
            "trainer.inference_mode must be false: gradient-map scores need autograd at test time"
        )
    if not cfg.train and cfg.test and not cfg.get("ckpt_path"):
        raise ValueError("train=false test=true needs ckpt_path=<path to a checkpoint written after fit>")
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        validate_checkpoint(cfg.ckpt_path, config_model_type(cfg), image_size=cfg.data.image_size,
                            in_channels=cfg.data.get("channels"))  # fmt: skip


def config_model_type(cfg: DictConfig) -> str:
    """The model type the config selects (``model=...``)."""
    target = str(cfg.model.get("_target_", ""))
    module, _, cls = target.rpartition(".")
    try:
        return hydra.utils.get_class(target).MODEL_TYPE
    except Exception as exc:
        raise ValueError(f"model._target_={target!r} is not an ebmad model ({module}.{cls})") from exc


def load_for_test(cfg: DictConfig, dm: MVTecDataModule) -> AnomalyModule:
    """A module from a checkpoint with its own architecture; test-time options from the config."""
    kind = config_model_type(cfg)
    validate_checkpoint(cfg.ckpt_path, kind, dm.image_size, dm.num_channels)
    load = dict(
        pixel_auroc_thresholds=cfg.model.get("pixel_auroc_thresholds"),
        n_examples=cfg.model.get("n_examples", 8),
    )
    model = model_class(kind).load_from_checkpoint(cfg.ckpt_path, map_location="cpu", **load)
    scoring = scoring_overrides(cfg, model.hparams)
    if scoring:  # built again with them: they decide the module's scores and buffers
        model = model_class(kind).load_from_checkpoint(cfg.ckpt_path, map_location="cpu", **load, **scoring)
        log.info("checkpoint %s scored with %s (scoring options; the weights are the checkpoint's)", cfg.ckpt_path,
                 ", ".join(f"model.{k}={v!r}" for k, v in scoring.items()))  # fmt: skip
    hp = model.hparams
    if hp.image_size != dm.image_size or hp.in_channels != dm.num_channels:
        raise ValueError(
            f"checkpoint {cfg.ckpt_path} was trained at {hp.in_channels}x{hp.image_size}x{hp.image_size} but "
            f"data.image_size={dm.image_size} with {dm.num_channels} channels"
        )
    ignored = {k: v for k, v in ignored_model_settings(cfg, hp).items() if k not in scoring}
    if ignored:
        log.warning("checkpoint %s: these settings differ from the checkpoint's and are NOT used (the checkpoint's "
                    "values are part of the trained model; retrain to change them): %s", cfg.ckpt_path,
                    ", ".join(f"model.{k}={v!r} (checkpoint: {hp[k]!r})" for k, v in ignored.items()))  # fmt: skip
    return model


TEST_TIME_KEYS = ("_target_", "pixel_auroc_thresholds", "n_examples", "in_channels", "image_size", "seed")
# scoring options a trained checkpoint can be scored with (no new weights or buffers); those that change the
# fitted statistics need refit_stats=true
SCORING_KEYS = ("map_sigmas", "default_image_score", "default_pixel_map", "stats_gains")
REFIT_KEYS = ("stats_gains",)


def scoring_overrides(cfg: DictConfig, stored: dict[str, Any]) -> dict[str, Any]:
    """``model.*`` scoring options that differ from the checkpoint's, to score it with (see ``SCORING_KEYS``)."""
    want = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else {}
    have = {k: stored.get(k) for k in SCORING_KEYS if k in want}
    changed = {k: v for k, v in ignored_model_settings(cfg, have).items() if k in SCORING_KEYS}
    need_refit = [k for k in changed if k in REFIT_KEYS]
    if need_refit and not cfg.get("refit_stats"):
        raise ValueError(
            f"{', '.join(f'model.{k}' for k in need_refit)} changes the fitted statistics of checkpoint "
            f"{cfg.ckpt_path}: add refit_stats=true to refit them, or drop the override"
        )
    return changed


def ignored_model_settings(cfg: DictConfig, hp: Any) -> dict[str, Any]:
    """``model.*`` config values that differ from a loaded checkpoint's hyperparameters (which win)."""
    want = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else {}
    out = {}
    for k, v in want.items():
        if k in TEST_TIME_KEYS or k not in hp:
            continue
        have = hp[k]
        same = (
            (list(v) == list(have))
            if isinstance(v, list | tuple) and isinstance(have, list | tuple)
            else v == have
        )
        if not same:
            out[k] = v
    return out


def write_outputs(out: Path, cfg: DictConfig, model: AnomalyModule, dm: MVTecDataModule, trainer: pl.Trainer,
                  timings: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    res = model.test_results
    meta = dm.test_meta
    with open(out / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        names = list(res["scores"])
        w.writerow(["index", "path", "defect", "label", *names])
        for row, i in enumerate(res["index"]):
            item = meta[i]
            w.writerow([i, str(item.image), item.defect, item.label, *(res["scores"][k][row] for k in names)])
    results = {
        "status": "completed",
        "model": model.MODEL_TYPE,
        "category": dm.category,
        "metrics": res["metrics"],
        "image_score": model.DEFAULT_IMAGE_SCORE,
        "pixel_map": model.DEFAULT_PIXEL_MAP,
        "image_auroc": res["metrics"].get(
            "image_auroc", res["metrics"].get(f"image_auroc/{model.DEFAULT_IMAGE_SCORE}")
        ),
        "pixel_auroc": res["metrics"].get(
            "pixel_auroc", res["metrics"].get(f"pixel_auroc/{model.DEFAULT_PIXEL_MAP}")
        ),
        "pixel_ap": res["metrics"].get("pixel_ap"),
        "aupro": res["metrics"].get("aupro"),
        **extra,
        "score_statistics": score_statistics(res["scores"], res["labels"]),
        "n_train": len(dm.load_train()["image"]),
        "n_test": len(meta),
        "global_step": trainer.global_step,
        "checkpoint": str(out / "checkpoints" / "last.ckpt"),
        "timings_s": timings,
        "device": device_info(trainer.strategy.root_device),
        "git": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out / "results.json", results)
    return results


IDENTITY_KEYS = ("data", "model", "seed")  # what must match to resume or skip a job in the same folder
NOT_IDENTITY = {"data": ("root", "test_batch_size"), "model": ("n_examples", "pixel_auroc_thresholds")}


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


def prepare_job(cfg: DictConfig, out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Decide what an existing run folder means: (results to reuse, checkpoint to resume from).

    With ``resume=true`` (the default) a folder whose ``results.json`` says completed is skipped,
    and one with ``checkpoints/last.ckpt`` resumes from it. A folder holding a run of a different
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
            # a diverged job would diverge again (same seed): skipped like a completed one
            if results.get("status") in ("completed", "diverged") and (cfg.test or not cfg.train):
                return results, None
        if cfg.train and not cfg.get("ckpt_path"):
            ckpt = pick_resume_checkpoint(out / "checkpoints", config_model_type(cfg), cfg.data.image_size,
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and/or test as configured; returns the results written to ``results.json``."""
    check_config(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    done, resume_ckpt = prepare_job(cfg, out)
    if done is not None:
        log.info("[%s] already completed in %s: skipping (resume=false reruns it)", done.get("category"), out)
        print(f"SKIP category={done.get('category')} status=completed out={out}", flush=True)
        return done
    if resume_ckpt:
        log.info("resuming from %s", resume_ckpt)
    ckpt_path = cfg.get("ckpt_path") or resume_ckpt
    dm = build_datamodule(cfg)
    pl.seed_everything(
        cfg.seed, workers=True
    )  # right before the model: its initial weights depend on the seed only
    model = build_model(cfg, dm) if cfg.train else load_for_test(cfg, dm)
    loggers = build_loggers(cfg, out, model.MODEL_TYPE)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers or False,
                                      plugins=[AtomicCheckpointIO()])  # fmt: skip
    for lg in loggers:
        lg.log_hyperparams({"cfg": OmegaConf.to_container(cfg, resolve=True), "category": dm.category,
                            "model_type": model.MODEL_TYPE,
                            "overrides": job_overrides()})  # fmt: skip
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    validation: dict[str, float] = {}
    start_step = 0
    try:
        if cfg.train:
            t0 = time.perf_counter()
            start_step = (
                int(torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
                if ckpt_path
                else 0
            )
            try:
                trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
            except TrainingDiverged as exc:
                if trainer.is_global_zero:
                    write_json(out / "results.json", {"status": "diverged", "model": model.MODEL_TYPE,
                                                      "category": dm.category, "error": str(exc),
                                                      "global_step": trainer.global_step,
                                                      "resumed_from_step": start_step})  # fmt: skip
                raise
            timings["fit"] = time.perf_counter() - t0
            signum = preemption_signal(trainer)
            if signum is not None:
                if trainer.is_global_zero:
                    write_json(out / "results.json", {"status": "interrupted", "category": dm.category,
                                                      "global_step": trainer.global_step, "signal": signum,
                                                      "resumed_from_step": start_step})  # fmt: skip
                raise Preempted(signum, trainer.global_step)
        if cfg.test:
            t0 = time.perf_counter()
            trainer.test(model, datamodule=dm, verbose=False)
            timings["test"] = time.perf_counter() - t0
        # after the test: with refit_stats, the validation is scored with the same (refitted) statistics
        if dm.val_fraction > 0:
            validation = {f"validation/{k}": v for k, v in model.evaluate(dm.validation_dataloader()).items()}
            for lg in loggers:
                lg.log_metrics(validation, step=trainer.global_step)
            log.info("validation (held-out good + planted defects): %s", validation)
        if cfg.test:
            if trainer.is_global_zero:
                extra = {"validation": validation, "resumed_from_step": start_step if cfg.train else None}
                extra.update(evaluate_test_set(cfg, model, dm, trainer, loggers, out, timings))
                results = write_outputs(out, cfg, model, dm, trainer, timings, extra)
                log.info("[%s] %s: image AUROC %.4f (%s) | pixel AUROC %.4f (%s) | %s", dm.category,
                         model.MODEL_TYPE, results["image_auroc"], model.DEFAULT_IMAGE_SCORE,
                         results["pixel_auroc"], model.DEFAULT_PIXEL_MAP, out)  # fmt: skip
                energy = results["metrics"].get("image_auroc/energy")  # the EBM's second image score
                extra_scores = f" image_auroc_energy={energy:.4f}" if energy is not None else ""
                print(f"RESULT category={dm.category} model={model.MODEL_TYPE} image_auroc={results['image_auroc']:.4f}"
                      f"{extra_scores} pixel_auroc={results['pixel_auroc']:.4f} out={out}", flush=True)  # fmt: skip
    finally:
        for lg in loggers:
            if isinstance(lg, pl.loggers.WandbLogger) and trainer.is_global_zero:
                if results:
                    lg.experiment.summary.update({f"test/{k}": v for k, v in results["metrics"].items()})
                lg.experiment.finish()
    return results


def evaluate_test_set(cfg: DictConfig, model: AnomalyModule, dm: MVTecDataModule, trainer: pl.Trainer,
                      loggers: list[Any], out: Path, timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """After ``trainer.test`` (rank 0): every metric, the untrained reference and the figures."""
    t0 = time.perf_counter()
    res = model.test_results
    resolution = OmegaConf.select(cfg, "eval.resolution", default="model")
    thresholds = {"image": float(model.image_threshold), "pixel": float(model.pixel_threshold)}
    full = test_set_metrics(res, dm.test_meta, model.DEFAULT_IMAGE_SCORE, resolution, thresholds["image"],
                            thresholds["pixel"], OmegaConf.select(cfg, "eval.aupro_bins"))  # fmt: skip
    res["metrics"].update(full)
    extra: dict[str, Any] = {"eval_resolution": resolution, "thresholds": thresholds}
    for lg in loggers:
        lg.log_metrics({f"test/{k}": v for k, v in full.items()}, step=trainer.global_step)
    timings["metrics"] = time.perf_counter() - t0
    if use_untrained_reference(cfg, model):
        t0 = time.perf_counter()
        ref = untrained_reference(model, dm.load_train(), dm.load_test(), dm.test_batch_size,
                                  trainer.strategy.root_device)  # fmt: skip
        timings["untrained_reference"] = time.perf_counter() - t0
        extra["reference"] = {"untrained": ref}
        for lg in loggers:
            lg.log_metrics({f"reference/untrained/{k}": v for k, v in ref.items()}, step=trainer.global_step)
    if OmegaConf.select(cfg, "eval.figures", default=True):
        t0 = time.perf_counter()
        model.to(trainer.strategy.root_device)
        paths = run_figures(out / "figures", model, res, f"{model.MODEL_TYPE} {dm.category}")
        timings["figures"] = time.perf_counter() - t0
        for lg in loggers:
            if isinstance(lg, pl.loggers.WandbLogger):
                lg.log_image("test/figures", images=[str(p) for p in paths], caption=[p.stem for p in paths])
    return extra


def use_untrained_reference(cfg: DictConfig, model: AnomalyModule) -> bool:
    """``eval.untrained_reference``: true, false or auto (= EBM runs)."""
    setting = OmegaConf.select(cfg, "eval.untrained_reference", default="auto")
    if setting == "auto":
        return model.MODEL_TYPE == "ebm"
    return bool(setting)


def job_overrides() -> list[str]:
    """This job's command-line overrides (empty outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(cfg: DictConfig, exc: BaseException) -> None:
    """results.json with status failed, so sweeps and reports show the job instead of dropping it."""
    out = Path(cfg.paths.output_dir)
    category = OmegaConf.select(cfg, "data.category", default=None)
    write_json(out / "results.json", {"status": "failed", "category": category, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc(), "overrides": job_overrides()})  # fmt: skip


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra main; returns ``cfg.optimized_metric`` from the results (for sweepers)."""
    torch.set_float32_matmul_precision("high")
    if HydraConfig.initialized():
        patch_lightning_hydra_launcher()
    try:
        with isolated_job():
            results = run(cfg)
    except Preempted as exc:
        log.warning("%s; rerun the same command to resume", exc)
        raise SystemExit(128 + int(exc.signum)) from None
    except TrainingDiverged as exc:  # results.json says diverged (written where it happened)
        log.error("%s", exc)
        if in_multirun():
            return None
        raise SystemExit(1) from None
    except Exception as exc:
        if rank_zero_only.rank == 0:
            record_failure(cfg, exc)
        if in_multirun():  # one failed job must not stop the sweep; the summary lists it
            log.exception("job failed: %s", exc)
            return None
        raise
    metric = cfg.get("optimized_metric")
    if not metric or not results:
        return results.get("image_auroc") if results else None
    value = {**results.get("metrics", {}), **results.get("validation", {})}.get(metric)
    if value is None:
        raise KeyError(f"optimized_metric={metric} is not among the results of this run")
    return float(value)


if __name__ == "__main__":
    main()
