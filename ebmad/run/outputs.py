"""A finished run's outputs: ``results.json``, ``scores.csv`` and the RESULT line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ebmad.evaluation.thresholds import false_alarm_estimate
from ebmad.models import AnomalyModule
from ebmad.run.builders import DataModule
from ebmad.run.metadata import device_info, git_commit, score_statistics, write_json


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
        "thresholds": threshold_report(model, extra.get("thresholds", {})),
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


def threshold_report(model: AnomalyModule, thresholds: dict[str, Any]) -> dict[str, Any]:
    """``results.json`` ``thresholds``: the values, how the image threshold was fitted (label-free: sources,
    n, target, expected false-alarm rate and its bound, warning) and the false-alarm rate measured at it on
    the defect-free test images (reported, never used to choose anything)."""
    fit = {k: v for k, v in model.threshold_fit.items() if k != "scores"}
    report = {**thresholds, "image_fit": fit}
    res = model.test_results
    good = [s for s, y in zip(res["scores"][model.DEFAULT_IMAGE_SCORE], res["labels"], strict=True) if y == 0]
    if good and fit:
        measured = false_alarm_estimate(good, float(model.image_threshold), fit.get("confidence", 0.95))
        report["measured_on_test_good"] = {"n": measured["n"], "false_alarms": measured["false_alarms"],
                                           "rate": measured["rate"], "lower_bound": measured["lower_bound"],
                                           "fit_upper_bound": fit["upper_bound"],
                                           "within_fit_bound": measured["rate"] <= fit["upper_bound"],
                                           # the count does not show the rate above the bound (its one-sided
                                           # lower Clopper-Pearson bound is below it): few images vary a lot
                                           "consistent_with_fit_bound": measured["lower_bound"] <= fit["upper_bound"]}  # fmt: skip
    return report


def threshold_text(results: dict[str, Any]) -> str:
    """The RESULT line's threshold part: the threshold, its expected false-alarm rate and bound, n, warning."""
    thr = results.get("thresholds", {})
    fit = thr.get("image_fit") or {}
    if not fit:
        return ""
    conf = round(100 * fit.get("confidence", 0.95))
    used = "+".join(f"{s['n']}_{s['source']}" for s in fit.get("sources", []))
    text = f" image_threshold={thr.get('image', float('nan')):.4g} n_fit={fit['n']}({used})"
    if "expected_rate" in fit:
        text += (f" false_alarm_target={fit['target']:g} false_alarm_expected={fit['expected_rate']:.4f} "
                 f"false_alarm_bound{conf}={fit['upper_bound']:.4f}")  # fmt: skip
    measured = thr.get("measured_on_test_good")
    if measured and "false_alarms" not in results:  # (else the line's head already says it)
        text += f" false_alarm_test_good={measured['rate']:.4f}({measured['false_alarms']}/{measured['n']})"
    if not fit.get("enough", True):
        text += (f" WARNING: {fit['n']} defect-free images cannot fit a {100 * fit['target']:g} % false-alarm rate "
                 f"(needs >= {fit['n_needed']}): the threshold is their highest score;")  # fmt: skip
    if fit.get("in_sample"):
        text += " WARNING: fitted on the training images themselves (optimistic; set data.val_fraction);"
    return text


def result_line(results: dict[str, Any], model: AnomalyModule, out: Path) -> str:
    """``RESULT category=... model=... image_auroc=... pixel_auroc=... image_threshold=... out=...``: the run's
    last line, with the image threshold's expected false-alarm rate, its bound and a warning when n is small."""
    head = f"RESULT category={results['category']} model={model.MODEL_TYPE}"
    thr = threshold_text(results)
    if "false_alarms" in results:  # defect-free test images only
        fa = results["false_alarms"]
        return (f"{head} false_alarm_rate={fa['false_alarm_rate']:.4f} ({fa['n_false_alarms']}/{fa['n_test_good']} "
                f"defect-free test images flagged; no defect AUROC: no defective test images){thr} out={out}")  # fmt: skip
    energy = results["metrics"].get("image_auroc/energy")  # the EBM's second image score
    extra = f" image_auroc_energy={energy:.4f}" if energy is not None else ""
    pixel = results.get("pixel_auroc")
    pixel_text = f"{pixel:.4f}" if pixel is not None else "n/a (no masks)"
    return f"{head} image_auroc={results['image_auroc']:.4f}{extra} pixel_auroc={pixel_text}{thr} out={out}"
