"""Hydra entry point: ``python -m ebmad.train [overrides]`` (console script ``ebmad-train``).

Trains one EBM on one category's defect-free images, fits the gradient statistics, evaluates on
the test set and writes ``results.json`` (plus ``scores.csv``) into the run's output folder.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from ebmad.data.mvtec import MVTecDataModule
from ebmad.data.synthetic import generate_category
from ebmad.module import EBMModule
from ebmad.utils import PROJECT_ROOT, device_info, git_commit, score_statistics, write_json

log = logging.getLogger("ebmad")
CONF_DIR = PROJECT_ROOT / "conf"


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


def build_model(cfg: DictConfig, dm: MVTecDataModule) -> EBMModule:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if model_cfg.get("in_channels") in (None, "auto"):
        model_cfg["in_channels"] = dm.num_channels
    return instantiate(model_cfg)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]


def check_config(cfg: DictConfig) -> None:
    """Reject settings that would give silently wrong numbers."""
    if cfg.trainer.get("inference_mode", True):
        raise ValueError(
            "trainer.inference_mode must be false: gradient-map scores need autograd at test time"
        )
    if not cfg.train and cfg.test and not cfg.get("ckpt_path"):
        raise ValueError("train=false test=true needs ckpt_path=<path to a checkpoint written after fit>")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")


def load_for_test(cfg: DictConfig, dm: MVTecDataModule) -> EBMModule:
    """A module from a checkpoint with its own architecture; test-time options from the config."""
    model = EBMModule.load_from_checkpoint(
        cfg.ckpt_path, map_location="cpu",
        pixel_auroc_thresholds=cfg.model.get("pixel_auroc_thresholds"), n_examples=cfg.model.get("n_examples", 8),
    )  # fmt: skip
    hp = model.hparams
    if hp.image_size != dm.image_size or hp.in_channels != dm.num_channels:
        raise ValueError(
            f"checkpoint {cfg.ckpt_path} was trained at {hp.in_channels}x{hp.image_size}x{hp.image_size} but "
            f"data.image_size={dm.image_size} with {dm.num_channels} channels"
        )
    return model


def write_outputs(out: Path, cfg: DictConfig, model: EBMModule, dm: MVTecDataModule, trainer: pl.Trainer,
                  timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
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
        "category": dm.category,
        "metrics": res["metrics"],
        "image_auroc": res["metrics"].get("image_auroc/A_std_l2"),
        "pixel_auroc": res["metrics"].get("pixel_auroc/a_std_l2"),
        "score_statistics": score_statistics(res["scores"], res["labels"]),
        "n_train": len(dm.load_train()["image"]),
        "n_test": len(meta),
        "global_step": trainer.global_step,
        "checkpoint": str(out / "checkpoints" / "last.ckpt"),
        "timings_s": timings,
        "device": device_info(model.device),
        "git": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out / "results.json", results)
    return results


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and/or test as configured; returns the results written to ``results.json``."""
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm) if cfg.train else load_for_test(cfg, dm)
    loggers = build_loggers(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams({"cfg": OmegaConf.to_container(cfg, resolve=True)})
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    try:
        if cfg.train:
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
            timings["fit"] = time.perf_counter() - t0
        if cfg.test:
            t0 = time.perf_counter()
            trainer.test(model, datamodule=dm, verbose=False)
            timings["test"] = time.perf_counter() - t0
            if trainer.is_global_zero:
                results = write_outputs(out, cfg, model, dm, trainer, timings)
                m = results["metrics"]
                log.info(
                    "[%s] image AUROC %.4f (A_std_l2), %.4f (energy) | pixel AUROC %.4f (a_std_l2) | %s",
                    dm.category, m["image_auroc/A_std_l2"], m["image_auroc/energy"], m["pixel_auroc/a_std_l2"], out,
                )  # fmt: skip
                print(f"RESULT category={dm.category} image_auroc={m['image_auroc/A_std_l2']:.4f} "
                      f"image_auroc_energy={m['image_auroc/energy']:.4f} "
                      f"pixel_auroc={m['pixel_auroc/a_std_l2']:.4f} out={out}", flush=True)  # fmt: skip
    finally:
        for lg in loggers:
            if isinstance(lg, pl.loggers.WandbLogger):
                if results:
                    lg.experiment.summary.update({f"test/{k}": v for k, v in results["metrics"].items()})
                lg.experiment.finish()
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra main; returns the standardized image AUROC (for sweepers)."""
    torch.set_float32_matmul_precision("high")
    results = run(cfg)
    return results.get("image_auroc") if results else None


if __name__ == "__main__":
    main()
