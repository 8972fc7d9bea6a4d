"""Hydra entry point: ``python -m ebmad.train [overrides]`` (console script ``ebmad-train``).

The run's story: build the data and the model, fit (then the scoring statistics and thresholds), test,
validate without labels, evaluate and write. Job bookkeeping (skip/resume, status records) is in
:mod:`ebmad.run.jobs`, building from the config in :mod:`ebmad.run.builders`, evaluation-only loading in
:mod:`ebmad.run.restore`, outputs in :mod:`ebmad.run.outputs`, checkpoint files in :mod:`ebmad.reliability.checkpointing`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from ebmad.data import false_alarm_summary
from ebmad.evaluation.examples import write_run_examples
from ebmad.evaluation.protocol import run_figures, test_set_metrics
from ebmad.models import AnomalyModule
from ebmad.reliability.checkpointing import AtomicCheckpointIO, checkpoint_step, save_module_checkpoint
from ebmad.reliability.distributed import isolated_job, patch_lightning_hydra_launcher
from ebmad.reliability.guards import NonFiniteError, TrainingDiverged, diverged_after_training
from ebmad.run import quiet
from ebmad.run.builders import (
    DataModule,
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_model,
    check_config,
    config_model_type,
    instantiate,
)
from ebmad.run.callbacks import StatisticsCallback, preemption_signal
from ebmad.run.cli import USER_ERRORS, front_door, full_traceback, report_error
from ebmad.run.jobs import Preempted, in_multirun, job_overrides, prepare_job, record_failure, write_status
from ebmad.run.metadata import PROJECT_ROOT
from ebmad.run.outputs import result_line, write_outputs
from ebmad.run.restore import adopt_checkpoint_settings, load_for_test
from ebmad.run.selection import ValidationCheckpoint, per_kind_scores, score_validation
from ebmad.run.untrained import training_gain, untrained_reference
from ebmad.synthesis import describe

log = logging.getLogger("ebmad")
CONF_DIR = PROJECT_ROOT / "conf"
PIXEL_METRIC = re.compile(r"(^|/)(pixel_|aupro)")  # metric keys that need masks


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and/or test as configured; returns the results written to ``results.json``."""
    if cfg.get("ckpt_path") and Path(cfg.ckpt_path).is_file():
        adopt_checkpoint_settings(cfg)  # model type, size and channels come from the checkpoint
    check_config(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    done, resume_ckpt = prepare_job(cfg, out, config_model_type(cfg))
    if done is not None:
        log.info("[%s] already %s in %s: skipping (resume=false reruns it)", done.get("category"),
                 done.get("status"), out)  # fmt: skip
        print(f"SKIP category={done.get('category')} status={done.get('status')} out={out}", flush=True)
        return done
    if resume_ckpt:
        log.info("resuming from %s", resume_ckpt)
    ckpt_path = cfg.get("ckpt_path") or resume_ckpt
    start_step = checkpoint_step(ckpt_path) if ckpt_path else 0
    dm = build_datamodule(cfg)
    dm.test_needed = bool(cfg.test)
    pl.seed_everything(
        cfg.seed, workers=True
    )  # right before the model: its initial weights depend on the seed only
    model = build_model(cfg, dm) if cfg.train else load_for_test(cfg, dm)
    loggers = build_loggers(cfg, out, model.MODEL_TYPE)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers or False,
                                      plugins=[AtomicCheckpointIO()])  # fmt: skip
    for lg in loggers:
        lg.log_hyperparams({"cfg": OmegaConf.to_container(cfg, resolve=True), "category": dm.category,
                            "model_type": model.MODEL_TYPE, "overrides": job_overrides()})  # fmt: skip
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    try:
        if cfg.train:
            fit(trainer, model, dm, ckpt_path, out, start_step, timings)
        selection, tested = selected_checkpoint(trainer, cfg)
        if cfg.test:
            t0 = time.perf_counter()
            trainer.test(model, datamodule=dm, verbose=False, ckpt_path=tested)
            timings["test"] = time.perf_counter() - t0
        # after the test: with refit_stats, the validation is scored with the same (refitted) statistics
        validation = validate(model, dm, loggers, trainer.global_step) if dm.has_validation else {}
        if cfg.test and trainer.is_global_zero:
            extra = {"validation": validation, "resumed_from_step": start_step if cfg.train else None,
                     "selection": selection, "tested_checkpoint": tested or ("last" if cfg.train else cfg.ckpt_path)}  # fmt: skip
            if validation:  # and the synthetic anomalies the model trains on: validating on them favours it
                trained = list(model.training_anomaly_kinds())
                extra["validation_set"] = {**describe(dm.val_kinds, dm.seed, dm.val_texture_dir, dm.val_strengths),
                                           "trains_on_validation_kinds": [k for k in dm.val_kinds if k in trained],
                                           "model_trains_on": trained}  # fmt: skip
            extra.update(evaluate_test_set(cfg, model, dm, trainer, loggers, out, timings))
            results = write_outputs(out, cfg, model, dm, trainer, timings, extra)
    except NonFiniteError as exc:  # training's own guard, or NaN/inf found after training: status diverged
        step = trainer.global_step if cfg.train else start_step
        stop = exc if isinstance(exc, TrainingDiverged) else diverged_after_training(exc, step, model)
        if trainer.is_global_zero:
            write_status(out, "diverged", model=model.MODEL_TYPE, category=dm.category, error=str(stop),
                         quantity=stop.quantity, global_step=step,
                         resumed_from_step=start_step if cfg.train else None)  # fmt: skip
        raise stop from (None if stop is exc else exc)
    finally:
        for lg in loggers:
            if isinstance(lg, pl.loggers.WandbLogger) and trainer.is_global_zero:
                if results:
                    lg.experiment.summary.update({f"test/{k}": v for k, v in results["metrics"].items()})
                lg.experiment.finish()
    if results:  # the last line of a run
        print(result_line(results, model, out), flush=True)
    return results


def fit(trainer: pl.Trainer, model: AnomalyModule, dm: DataModule, ckpt_path: str | None, out: Path,
        start_step: int, timings: dict[str, float]) -> None:  # fmt: skip
    """``trainer.fit`` (then the statistics and thresholds, in StatisticsCallback); a signal ends as Preempted.

    Fit-only methods (PatchCore, PaDiM) take no training steps: :func:`fit_without_steps`.
    """
    t0 = time.perf_counter()
    if model.FIT_ONLY:
        fit_without_steps(trainer, model, dm, out)
        timings["fit"] = time.perf_counter() - t0
        return
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    timings["fit"] = time.perf_counter() - t0
    signum = preemption_signal(trainer)
    if signum is not None:
        if trainer.is_global_zero:
            write_status(out, "interrupted", category=dm.category, global_step=trainer.global_step,
                         signal=signum, resumed_from_step=start_step)  # fmt: skip
        raise Preempted(signum, trainer.global_step)


def fit_without_steps(trainer: pl.Trainer, model: AnomalyModule, dm: DataModule, out: Path) -> None:
    """Fit a fit-only model: one pass over the training images (no optimizer; ``trainer.max_steps`` does not
    apply), then its thresholds; ``checkpoints/last.ckpt`` as after any fit. A rerun refits (one pass).

    One process on one device: the pass is a fraction of the test's cost, so DDP would only add start-up.
    """
    if trainer.world_size > 1:
        raise ValueError(f"model={model.MODEL_TYPE} fits in one pass without training steps and runs on one "
                         f"device; got {trainer.world_size} processes: use trainer=gpu or trainer=cpu")  # fmt: skip
    stats = next((c for c in trainer.callbacks if isinstance(c, StatisticsCallback)), None)
    if stats is None:
        raise ValueError(f"model={model.MODEL_TYPE} is fitted by callbacks.statistics, which is disabled")
    dm.trainer = trainer  # the datamodule keeps its tensors on the run's device
    model.to(trainer.strategy.root_device)
    log.info("[%s] %s: fitting in one pass over the training images (no training steps; trainer.max_steps "
             "does not apply)", dm.category, model.MODEL_TYPE)  # fmt: skip
    stats.fit_now(trainer, model, dm)
    if trainer.is_global_zero:
        save_module_checkpoint(model, out / "checkpoints" / "last.ckpt")


def selected_checkpoint(trainer: pl.Trainer, cfg: DictConfig) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint selection's state (``callbacks.validation_checkpoint``) and, with ``test_ckpt=best``, the
    ``best.ckpt`` to test instead of the trained model (None: the model as trained, i.e. ``last.ckpt``)."""
    sel = next((c for c in trainer.callbacks if isinstance(c, ValidationCheckpoint)), None)
    state = (
        sel.state_dict() if sel is not None and sel.every_n_steps else None
    )  # copied before the test loads
    choice = cfg.get("test_ckpt", "last")
    if choice not in ("last", "best"):
        raise ValueError(f"test_ckpt must be 'last' or 'best', got {choice!r}")
    if choice == "last" or not cfg.train:
        return state, None
    if not state or not sel.best_model_path:
        raise ValueError("test_ckpt=best needs the checkpoint selection: callbacks.validation_checkpoint."
                         "every_n_steps=N and data.val_fraction > 0 (or a layout with validation images)")  # fmt: skip
    log.info("testing the selected checkpoint %s (step %s, validation score %.4f)", sel.best_model_path,
             state.get("best_step"), state.get("best_score", float("nan")))  # fmt: skip
    return state, sel.best_model_path


def validate(model: AnomalyModule, dm: DataModule, loggers: list[Any], step: int) -> dict[str, float]:
    """The label-free validation: held-out defect-free images and the same with synthetic anomalies.

    Every score/map's AUROC, ``validation/score`` (the selection score, :mod:`ebmad.run.selection`) and, with
    several anomaly kinds or strengths, ``validation/<kind>[@<strength>]/score``.
    """
    validation = score_validation(model, dm.validation_dataloader())
    if len(dm.val_kinds) * len(dm.val_strengths) > 1 and "kind" in dm.val_data:
        validation.update(
            per_kind_scores(model, dm.val_data, dm.val_kinds, dm.test_batch_size, dm.val_strengths)
        )
    for lg in loggers:
        lg.log_metrics(validation, step=step)
    log.info("validation (held-out good + synthetic anomalies %s): %s", "+".join(dm.val_kinds),
             ", ".join(f"{k.removeprefix('validation/')}={v:.4f}" for k, v in validation.items()))  # fmt: skip
    return validation


def evaluate_test_set(cfg: DictConfig, model: AnomalyModule, dm: DataModule, trainer: pl.Trainer,
                      loggers: list[Any], out: Path, timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """After ``trainer.test`` (rank 0): every metric, the untrained reference and the figures.

    A test set without defective images (a Folder dataset of normal images only) gives its false-alarm rate
    instead of metrics; one without masks gives no pixel metrics.
    """
    t0 = time.perf_counter()
    res = model.test_results
    resolution = OmegaConf.select(cfg, "eval.resolution", default="model")
    thresholds = {"image": float(model.image_threshold), "pixel": float(model.pixel_threshold)}
    extra: dict[str, Any] = {"eval_resolution": resolution, "thresholds": thresholds}
    if not getattr(dm, "has_defects", True):
        summary = false_alarm_summary(res["scores"][model.DEFAULT_IMAGE_SCORE], thresholds["image"])
        log.warning("[%s] %s", dm.category, summary["note"])
        res["metrics"] = {}  # AUROC, AP, AUPRO need defective images
        extra["false_alarms"] = summary
        return extra
    full = test_set_metrics(res, dm.test_meta, model.DEFAULT_IMAGE_SCORE, resolution, thresholds["image"],
                            thresholds["pixel"], OmegaConf.select(cfg, "eval.aupro_bins"))  # fmt: skip
    res["metrics"].update(full)
    if not getattr(dm, "has_masks", True):  # defect labels but no masks: image metrics only
        res["metrics"] = {k: v for k, v in res["metrics"].items() if not PIXEL_METRIC.search(k)}
        full = {k: v for k, v in full.items() if not PIXEL_METRIC.search(k)}
        log.warning("[%s] the defective test images have no masks: image metrics only", dm.category)
    for lg in loggers:
        lg.log_metrics({f"test/{k}": v for k, v in full.items()}, step=trainer.global_step)
    timings["metrics"] = time.perf_counter() - t0
    extra["examples"] = write_run_examples(out, model, dm).name  # maps and curves for the sweep report
    if use_untrained_reference(cfg, model):
        t0 = time.perf_counter()
        ref = untrained_reference(model, dm.load_train(), dm.load_test(), dm.test_batch_size,
                                  trainer.strategy.root_device)  # fmt: skip
        timings["untrained_reference"] = time.perf_counter() - t0
        extra["reference"] = {"untrained": ref}
        keys = [f"image_auroc/{model.DEFAULT_IMAGE_SCORE}", f"pixel_auroc/{model.DEFAULT_PIXEL_MAP}", "aupro"]
        log.info("[%s] %s", dm.category, training_gain(res["metrics"], ref, keys))
        for lg in loggers:
            lg.log_metrics({f"reference/untrained/{k}": v for k, v in ref.items()}, step=trainer.global_step)
    if OmegaConf.select(cfg, "eval.figures", default=True):
        t0 = time.perf_counter()
        model.to(trainer.strategy.root_device)
        paths = run_figures(out / "figures", model, res, f"{model.MODEL_TYPE} {dm.category}")
        timings["figures"] = time.perf_counter() - t0
        for lg in loggers:
            if isinstance(lg, pl.loggers.WandbLogger):
                for p in paths:  # one key per figure: W&B warns about (and misdraws) mixed sizes in one key
                    lg.log_image(f"test/figures/{p.stem}", images=[str(p)])
    return extra


def use_untrained_reference(cfg: DictConfig, model: AnomalyModule) -> bool:
    """``eval.untrained_reference``: true, false or auto (= the EBMs: pixel EBM and feature EBM runs)."""
    setting = OmegaConf.select(cfg, "eval.untrained_reference", default="auto")
    if setting == "auto":
        return model.MODEL_TYPE in ("ebm", "feature_ebm")
    return bool(setting)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
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
            record_failure(cfg, exc)  # results.json keeps the traceback
        if full_traceback(cfg) or not isinstance(exc, USER_ERRORS):  # a bug: its traceback helps
            if in_multirun():  # one failed job must not stop the sweep; the summary lists it
                log.exception("job failed: %s", exc)
                return None
            raise
        report_error(exc, cfg.paths.get("output_dir"))  # ebmad's own errors: one line
        if in_multirun():
            return None
        raise SystemExit(1) from None
    metric = cfg.get("optimized_metric")
    if not metric or not results:
        return results.get("image_auroc") if results else None
    value = {**results.get("metrics", {}), **results.get("validation", {})}.get(metric)
    if value is None:
        raise KeyError(f"optimized_metric={metric} is not among the results of this run")
    return float(value)


def main() -> float | None:
    """``python -m ebmad.train`` / ``ebmad-train``: settings checked first (did you mean ...), then Hydra."""
    quiet.install()  # library warnings that do not apply (ebmad.run.quiet)
    front_door(sys.argv[1:], CONF_DIR, "train")
    return hydra_main()


if __name__ == "__main__":
    main()
