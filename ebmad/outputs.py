"""A finished run's outputs: ``results.json``, ``scores.csv`` and the RESULT line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ebmad.builders import DataModule
from ebmad.models import AnomalyModule
from ebmad.utils import device_info, git_commit, score_statistics, write_json


def write_outputs(out: Path, cfg: DictConfig, model: AnomalyModule, dm: DataModule, trainer: pl.Trainer,
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


def result_line(results: dict[str, Any], model: AnomalyModule, out: Path) -> str:
    """``RESULT category=... model=... image_auroc=... pixel_auroc=... out=...``: the run's last line."""
    head = f"RESULT category={results['category']} model={model.MODEL_TYPE}"
    if "false_alarms" in results:  # defect-free test images only
        fa = results["false_alarms"]
        return (f"{head} false_alarm_rate={fa['false_alarm_rate']:.4f} ({fa['n_false_alarms']}/{fa['n_test_good']} "
                f"defect-free test images flagged; no defect AUROC: no defective test images) out={out}")  # fmt: skip
    energy = results["metrics"].get("image_auroc/energy")  # the EBM's second image score
    extra = f" image_auroc_energy={energy:.4f}" if energy is not None else ""
    pixel = results.get("pixel_auroc")
    pixel_text = f"{pixel:.4f}" if pixel is not None else "n/a (no masks)"
    return f"{head} image_auroc={results['image_auroc']:.4f}{extra} pixel_auroc={pixel_text} out={out}"
