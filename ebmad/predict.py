"""Score new images with a trained model: ``python -m ebmad.predict ckpt_path=... input=... output=...``.

Console script ``ebmad-predict``. ``input`` is a folder (its images), a glob or one file; any model type's
checkpoint works (``backend=torch``), or an ONNX model from :mod:`ebmad.export` (``backend=onnx``). The drawing is in :mod:`ebmad.deploy.overlays`. For
every image it writes ``overlays/<name>.png`` (the anomaly map over the image at its original resolution,
colours fixed to [0, 2 * pixel_threshold], and below it a legend: the colour bar with the pixel threshold
marked, the image score against the image threshold with the decision, the defect area), and
``masks/<name>.png`` (map >= pixel_threshold, at the original resolution), plus one ``predictions.csv`` row:
path, score, image_threshold, decision (score >= image_threshold: defective), defect area in pixels
(map >= pixel_threshold), pixel_threshold, size, error. Files from others are untrusted: an image declaring more than ``max_image_pixels``
(a decompression bomb, or just too large) is refused from its header before anything is decoded, and an
empty, unreadable or truncated file, or one that is an image in name only, is listed with its error; the
run goes on with the other images (one image decoded at a time, so memory stays bounded) and the exit
status is then 1.

Thresholds: the image threshold is the command line's ``image_threshold``, else a calibrated one from the
thresholds file beside the model (``<model file>.threshold.json``, or ``thresholds_file=``), else the
label-free one stored with the model; each row, the summary and the legend say which, with its expected
false-alarm rate and bound (:mod:`ebmad.deploy.calibration`). ``calibrate=<folder with good/ and defective/ | CSV>``
first scores those labelled shots, picks the image threshold for ``calibrate_goal`` (``recall>=R``,
``false_alarm<=F`` or ``f1``), prints their confusion matrix and writes the thresholds file; without
``input`` it stops there.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from ebmad.data.io import IMAGE_SUFFIXES, DatasetError, list_images, load_image, open_image
from ebmad.deploy.calibration import (
    calibration_record,
    describe,
    estimate_for,
    labelled_shots,
    read_thresholds_file,
    summary_of_fit,
    thresholds_file_for,
    write_thresholds_file,
)
from ebmad.deploy.onnx import INPUT_NAME, OUTPUT_NAMES, load_module, onnx_session
from ebmad.deploy.overlays import display_rgb, legend, overlay, upsample
from ebmad.run.cli import USER_ERRORS, front_door, full_traceback, report_error
from ebmad.run.metadata import device_info
from ebmad.train import CONF_DIR

# decision: score >= image_threshold (the image-level rule); defect_area_px: pixels whose map value is >=
# pixel_threshold (the pixel-level rule). The two thresholds are fitted separately on defect-free images, so
# a "good" image can still have a few pixels above the pixel threshold: both rules are in every row.
# threshold_source: label-free | calibrated | command line; expected_false_alarm_rate / false_alarm_upper_bound:
# the image threshold's expected share of defect-free images flagged and its upper bound (NaN: unknown).
CSV_FIELDS = ("path", "score", "image_threshold", "decision", "defect_area_px", "pixel_threshold", "width", "height",
              "error", "threshold_source", "expected_false_alarm_rate", "false_alarm_upper_bound")  # fmt: skip
ScoreFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- inputs
def find_images(spec: str) -> list[Path]:
    """The images ``input`` names: a folder's image files (not sub-folders), a glob's, or one file."""
    if not spec:
        raise ValueError("input=<folder | glob | file> is required")
    if any(c in spec for c in "*?["):
        found = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
        files = [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        path = Path(spec)
        if path.is_dir():
            files = list_images(path)
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"input={spec} does not exist")
    if not files:
        raise FileNotFoundError(f"input={spec} matched no image ({', '.join(IMAGE_SUFFIXES)}); sub-folders are "
                                "not searched, use a glob such as 'dir/**/*.png'")  # fmt: skip
    return files


def check_pixels(path: Path, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` (width x height), without decoding it.

    Pillow's own decompression-bomb limit (about 179 megapixels) is applied too; both raise
    :class:`DatasetError` naming the file and the size.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"image file {path} refused as a decompression bomb: {exc}") from None
    except Exception:  # empty, not an image, damaged: load_image names the problem
        return
    if width * height > max_pixels:
        raise DatasetError(
            f"image file {path} declares {width} x {height} = {width * height:,} pixels, more than "
            f"max_image_pixels={max_pixels:,} (a decompression bomb or an oversized image); refused before "
            "decoding. Raise max_image_pixels to score it"
        )


def error_text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, DatasetError) else f"{type(exc).__name__}: {exc}"


def output_names(paths: list[Path]) -> list[Path]:
    """Output file names mirroring the inputs' folders below their common parent; unique."""
    full = [p.resolve() for p in paths]
    base = Path(os.path.commonpath([p.parent for p in full]))
    rel = [p.relative_to(base) for p in full]
    stems = Counter(r.with_suffix("") for r in rel)
    return [r.with_suffix("") if stems[r.with_suffix("")] == 1 else r.with_name(r.name.replace(".", "_"))
            for r in rel]  # fmt: skip


# ---------------------------------------------------------------------------- scorers
@dataclass
class Scorer:
    """A batch scorer x (B, C, S, S) -> (image scores (B,), pixel maps (B, S, S)) and what it needs."""

    score: ScoreFn
    model_type: str
    image_size: int
    in_channels: int
    image_score: str
    image_threshold: float
    pixel_threshold: float
    source: str  # where the thresholds come from, for errors
    device: str
    model_path: str = ""  # the checkpoint or ONNX file: its thresholds file lies beside it
    threshold_fit: dict[str, Any] = field(default_factory=dict)  # how the label-free threshold was fitted


@dataclass
class Decision:
    """The thresholds in use, where the image threshold comes from and its false-alarm rate."""

    image_threshold: float
    pixel_threshold: float
    source: str  # label-free | calibrated | command line
    text: str  # provenance, for the summary and the legend
    expected_rate: float = float("nan")  # expected share of defect-free images flagged (NaN: unknown)
    upper_bound: float = float("nan")

    def row(self) -> dict[str, Any]:
        return {"image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold,
                "threshold_source": self.source, "expected_false_alarm_rate": self.expected_rate,
                "false_alarm_upper_bound": self.upper_bound}  # fmt: skip


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def torch_scorer(ckpt_path: str, device: torch.device) -> Scorer:
    module = load_module(ckpt_path, map_location=device)

    def score(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # not inference_mode: the EBM needs input gradients
            images, maps = module.score(x.to(device))
        return images[module.DEFAULT_IMAGE_SCORE], maps[module.DEFAULT_PIXEL_MAP]

    info = device_info(device)
    hp = module.hparams
    return Scorer(score, module.MODEL_TYPE, hp.image_size, hp.in_channels, module.DEFAULT_IMAGE_SCORE,
                  float(module.image_threshold), float(module.pixel_threshold), f"checkpoint {ckpt_path}",
                  f"{info['type']} ({info['name']})", str(ckpt_path), dict(module.threshold_fit))  # fmt: skip


def onnx_scorer(onnx_path: str) -> Scorer:
    session = onnx_session(onnx_path)
    meta = session.get_modelmeta().custom_metadata_map
    _, channels, size, _ = session.get_inputs()[0].shape

    def score(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_map, image_score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.cpu().numpy()})
        return torch.from_numpy(image_score), torch.from_numpy(pixel_map)

    return Scorer(score, meta.get("ebmad_model_type", "?"), int(size), int(channels), meta.get("image_score", "?"),
                  float(meta.get("image_threshold", "nan")), float(meta.get("pixel_threshold", "nan")),
                  f"ONNX model {onnx_path}", "cpu (onnxruntime)", str(onnx_path),
                  json.loads(meta.get("threshold_fit") or "{}"))  # fmt: skip


def thresholds(scorer: Scorer, image: float | None, pixel: float | None) -> tuple[float, float]:
    """Command-line thresholds, else the stored ones; a clear error when either is missing."""
    image = scorer.image_threshold if image is None else float(image)
    pixel = scorer.pixel_threshold if pixel is None else float(pixel)
    return checked_thresholds(scorer, image, pixel)


def checked_thresholds(scorer: Scorer, image: float, pixel: float) -> tuple[float, float]:
    """The thresholds, or a clear error when either is missing (NaN) or the pixel one is not positive."""
    missing = [k for k, v in (("image_threshold", image), ("pixel_threshold", pixel)) if not math.isfinite(v)]
    if missing:
        raise ValueError(
            f"no {' / '.join(missing)}: the {scorer.source} stores none (NaN = not fitted). Use a checkpoint "
            "whose thresholds were fitted after training (for ONNX, export it again), or pass "
            f"{' '.join(k + '=<value>' for k in missing)} on the command line"
        )
    if pixel <= 0:
        raise ValueError(f"pixel_threshold must be > 0 (anomaly maps are non-negative), got {pixel}")
    return image, pixel


def thresholds_file(scorer: Scorer, cfg: DictConfig) -> tuple[Path, bool]:
    """The thresholds file (``thresholds_file=`` or beside the model) and whether it was named explicitly."""
    named = cfg.get("thresholds_file")
    return (Path(named), True) if named else (thresholds_file_for(scorer.model_path), False)


def decide(scorer: Scorer, cfg: DictConfig) -> Decision:
    """The image threshold: command line, else the calibrated thresholds file, else the label-free one stored
    with the model; with its source and expected false-alarm rate. The pixel threshold: command line or stored."""
    pixel = scorer.pixel_threshold if cfg.get("pixel_threshold") is None else float(cfg.pixel_threshold)
    fit = scorer.threshold_fit
    path, named = thresholds_file(scorer, cfg)
    if cfg.get("image_threshold") is not None:
        source, image, record = "command line", float(cfg.image_threshold), {}
    elif path.is_file():
        record = read_thresholds_file(path, scorer.model_path, scorer.image_score)
        source, image = "calibrated", float(record["image_threshold"])
    elif named:
        raise FileNotFoundError(f"thresholds_file={path} does not exist (write it with calibrate=<shots>)")
    else:
        source, image, record = "label-free", scorer.image_threshold, fit
    image, pixel = checked_thresholds(scorer, image, pixel)
    if source == "label-free":
        rate, bound = fit.get("expected_rate", fit.get("rate", math.nan)), fit.get("upper_bound", math.nan)
    else:
        estimate = estimate_for(fit, image)
        rate, bound = estimate.get("rate", math.nan), estimate.get("upper_bound", math.nan)
    text = describe(source, record)
    if math.isfinite(rate):
        text += f"; expected false alarms {100 * rate:.3g} % (<= {100 * bound:.3g} %)"
    return Decision(image, pixel, source, text, float(rate), float(bound))


def score_files(scorer: Scorer, paths: list[Path], batch_size: int, max_pixels: int) -> list[float]:
    """Image scores of ``paths`` (every file must load: an error names the one that does not)."""
    scores: list[float] = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            check_pixels(path, max_pixels)
            batch.append(load_image(path, scorer.image_size, scorer.in_channels)[0])
        scores += scorer.score(torch.stack(batch))[0].tolist()
    return scores


def calibrate(scorer: Scorer, cfg: DictConfig, out: Path, max_pixels: int) -> dict[str, Any]:
    """Score the labelled shots of ``cfg.calibrate``, choose the image threshold for ``cfg.calibrate_goal``,
    print their confusion matrix, write ``<out>/calibration.csv`` and the thresholds file; returns its record."""
    shots = labelled_shots(cfg.calibrate)
    paths, labels = [p for p, _ in shots], [y for _, y in shots]
    scores = score_files(scorer, paths, cfg.batch_size, max_pixels)
    record = calibration_record(scores, labels, cfg.calibrate_goal, str(cfg.calibrate), scorer.model_path,
                                scorer.model_type, scorer.image_score, scorer.threshold_fit)  # fmt: skip
    path, _ = thresholds_file(scorer, cfg)
    write_thresholds_file(path, record)
    thr = record["image_threshold"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "calibration.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "score", "decision"])
        for p, y, sc in zip(paths, labels, scores, strict=True):
            writer.writerow([p, "defective" if y else "good", sc, "defective" if sc >= thr else "good"])
    cm = record["confusion"]
    estimate = record.get("false_alarm_estimate")
    label_free = summary_of_fit(scorer.threshold_fit)
    print(f"CALIBRATE goal={record['goal']} image_threshold={thr:.6g} shots={record['n_good']} good + "
          f"{record['n_defective']} defective recall={record['recall']:.3f} "
          f"false_alarm_rate_on_shots={record['false_alarm_rate']:.3f} "
          + (f"expected_false_alarm={estimate['rate']:.4f}(<={estimate['upper_bound']:.4f}, on {estimate['n']} "
             "label-free defect-free images) " if estimate else "")
          + f"label_free_threshold={scorer.image_threshold:.6g} file={path}", flush=True)  # fmt: skip
    print(f"  confusion on the shots:      predicted defective   predicted good\n"
          f"  defective ({record['n_defective']:>3})          {cm['tp']:>10}   {cm['fn']:>14}\n"
          f"  good      ({record['n_good']:>3})          {cm['fp']:>10}   {cm['tn']:>14}", flush=True)  # fmt: skip
    if label_free and not label_free.get("enough", True):
        print(f"  note on the label-free threshold: {label_free['note']}", flush=True)
    return record


def write_outputs(path: Path, out: Path, name: Path, score: float, amap: torch.Tensor, size: tuple[int, int],
                  decision: Decision, alpha: float) -> dict[str, Any]:  # fmt: skip
    """Overlay and mask of one scored image at its original size; returns its CSV row."""
    width, height = size
    image_thr, pixel_thr = decision.image_threshold, decision.pixel_threshold
    row: dict[str, Any] = {"path": str(path), "score": score, **decision.row(), "width": width, "height": height,
                           "error": ""}  # fmt: skip
    if not math.isfinite(score):
        return {**row, "error": "non-finite score"}
    try:
        rgb = display_rgb(open_image(path))
    except Exception as exc:  # changed since it was scored
        return {**row, "error": error_text(exc)}
    up = upsample(amap, width, height)
    mask = up >= pixel_thr
    area = int(mask.sum())
    shown = legend(overlay(rgb, up, pixel_thr, alpha), score, image_thr, area, pixel_thr, decision.text)
    for sub, image in (("overlays", shown), ("masks", Image.fromarray(mask.astype(np.uint8) * 255))):
        target = out / sub / name.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    return {**row, "decision": "defective" if score >= image_thr else "good", "defect_area_px": area}


# ---------------------------------------------------------------------------- predict
def score_chunk(scorer: Scorer, files: list[tuple[Path, Path]], out: Path, decision: Decision, alpha: float,
                max_pixels: int) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """CSV rows, in input order, of one batch of (file, output name); an unreadable file gets its error.

    Also returns the seconds spent in the scorer itself.
    """
    rows: list[dict[str, Any]] = [{} for _ in files]
    decoded: list[tuple[int, torch.Tensor, tuple[int, int]]] = []
    for i, (path, _) in enumerate(files):
        try:  # the training/evaluation loader: same conversion and resize
            check_pixels(path, max_pixels)
            x, size = load_image(path, scorer.image_size, scorer.in_channels)
            decoded.append((i, x, size))
        except Exception as exc:  # one bad file never stops the run
            rows[i] = {"path": str(path), "error": error_text(exc)}
    if not decoded:
        return rows, 0.0
    t0 = time.perf_counter()
    scores, maps = scorer.score(torch.stack([x for _, x, _ in decoded]))
    seconds = time.perf_counter() - t0
    for (i, _, size), score, amap in zip(decoded, scores.tolist(), maps, strict=True):
        path, name = files[i]
        rows[i] = write_outputs(path, out, name, score, amap, size, decision, alpha)
    return rows, seconds


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Score every image of ``cfg.input``; writes outputs under ``cfg.output``; returns the summary."""
    t_start = time.perf_counter()
    if cfg.backend == "torch":
        scorer = torch_scorer(cfg.ckpt_path, resolve_device(cfg.device))
    elif cfg.backend == "onnx":
        scorer = onnx_scorer(cfg.onnx_path)
    else:
        raise ValueError(f"backend must be 'torch' or 'onnx', got {cfg.backend!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not 0 <= cfg.overlay_alpha <= 1:
        raise ValueError(f"overlay_alpha must be in [0, 1], got {cfg.overlay_alpha}")
    max_pixels = int(cfg.get("max_image_pixels") or 50_000_000)
    if max_pixels < 1:
        raise ValueError(f"max_image_pixels must be >= 1, got {max_pixels}")
    out = Path(cfg.output)
    record = calibrate(scorer, cfg, out, max_pixels) if cfg.get("calibrate") else None
    if record is not None and not cfg.get("input"):
        return {"calibration": record, "failed": 0, "out": str(out)}
    decision = decide(scorer, cfg)
    files = find_images(str(cfg.input) if cfg.get("input") else "")
    jobs = list(zip(files, output_names(files), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    score_s = 0.0
    with open(out / "predictions.csv", "w", newline="") as fh, tqdm(
        total=len(jobs), unit="img", disable=not cfg.progress_bar, desc="predict"
    ) as bar:  # fmt: skip
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for start in range(0, len(jobs), cfg.batch_size):
            chunk, seconds = score_chunk(scorer, jobs[start : start + cfg.batch_size], out, decision,
                                         cfg.overlay_alpha, max_pixels)  # fmt: skip
            writer.writerows(chunk)
            fh.flush()
            bar.update(len(chunk))
            rows += chunk
            score_s += seconds
    elapsed = time.perf_counter() - t0
    failed = [r for r in rows if r["error"]]
    for r in failed:
        print(f"FAILED {r['path']}: {r['error']}", flush=True)
    summary = {
        "scored": len(rows) - len(failed),
        "defective": sum(r.get("decision") == "defective" for r in rows),
        "failed": len(failed),
        "failures": [r["path"] for r in failed],
        "time_s": elapsed,
        "load_s": t0 - t_start,
        "score_s": score_s,
        "device": scorer.device,
        "backend": cfg.backend,
        **decision.row(),
        "threshold_provenance": decision.text,
        "out": str(out),
    }
    if record is not None:
        summary["calibration"] = record
    print(f"image threshold: {decision.text}", flush=True)
    print(f"PREDICT model={scorer.model_type} score={scorer.image_score} scored={summary['scored']} "
          f"defective={summary['defective']} failed={len(failed)} time_s={elapsed:.2f} "
          f"images_per_s={len(rows) / max(elapsed, 1e-9):.1f} device={scorer.device} backend={cfg.backend} "
          f"image_threshold={decision.image_threshold:.6g} threshold_source={decision.source.replace(' ', '_')} "
          f"expected_false_alarm={decision.expected_rate:.4f} false_alarm_bound={decision.upper_bound:.4f} "
          f"out={out}", flush=True)  # fmt: skip
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra main; exits with status 1 when any image failed; ebmad's own errors are one line."""
    torch.set_float32_matmul_precision("high")
    try:
        failed = predict(cfg)["failed"]
    except USER_ERRORS as exc:
        if full_traceback():
            raise
        report_error(exc, cfg.get("output"))
        raise SystemExit(1) from None
    if failed:
        raise SystemExit(1)


def main() -> None:
    """``python -m ebmad.predict`` / ``ebmad-predict``: settings checked first (did you mean ...), then Hydra."""
    front_door(sys.argv[1:], CONF_DIR, "predict")
    hydra_main()


if __name__ == "__main__":
    main()
