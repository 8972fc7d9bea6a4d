"""Score new images with a trained model: ``python -m ebmad.predict ckpt_path=... input=... output=...``.

Console script ``ebmad-predict``. ``input`` is a folder (its images), a glob or one file; any model type's
checkpoint works (``backend=torch``), or an ONNX model from :mod:`ebmad.export` (``backend=onnx``). For
every image it writes, at the image's original resolution, ``overlays/<name>.png`` (anomaly map over the
image, colours fixed to [0, 2 * pixel_threshold]) and ``masks/<name>.png`` (map >= pixel_threshold),
plus one ``predictions.csv`` row: path, score, decision (score >= image_threshold: defective), defect
area in pixels, error. Unreadable files are listed with their error and the run goes on; the exit
status is then 1.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from ebmad.data.io import IMAGE_SUFFIXES, DatasetError, list_images, load_image, open_image
from ebmad.export import INPUT_NAME, OUTPUT_NAMES, load_module, onnx_session
from ebmad.train import CONF_DIR
from ebmad.utils import device_info

WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit; Pillow's convert would clip at 255
CSV_FIELDS = ("path", "score", "decision", "defect_area_px", "width", "height", "error")
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


def display_rgb(img: Image.Image) -> np.ndarray:
    """The image as 8-bit RGB (H, W, 3) for the overlay; 16-bit and float images scaled, not clipped."""
    if img.mode in WIDE_GRAY_MODES:
        arr = np.asarray(img, dtype=np.float64) / 257.0
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64) * 255.0
    else:
        return np.asarray(img.convert("RGB"))
    gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


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


# ---------------------------------------------------------------------------- outputs
def heat_colors(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """RGB uint8 colours of map values on a fixed scale [0, 2 * pixel_threshold] (threshold = mid colour)."""
    t = np.clip(amap / (2.0 * pixel_threshold), 0.0, 1.0)
    return (matplotlib.colormaps["jet"](t)[..., :3] * 255).round().astype(np.uint8)


def overlay(rgb: np.ndarray, amap: np.ndarray, pixel_threshold: float, alpha: float) -> Image.Image:
    """The map's colours blended over the image (both at the image's resolution)."""
    heat = heat_colors(amap, pixel_threshold).astype(np.float32)
    mixed = (1 - alpha) * rgb.astype(np.float32) + alpha * heat
    return Image.fromarray(mixed.round().astype(np.uint8))


def upsample(amap: torch.Tensor, width: int, height: int) -> np.ndarray:
    """A (S, S) map resized bilinearly to (height, width)."""
    return F.interpolate(amap[None, None].float(), size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0].cpu().numpy()  # fmt: skip


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
                  f"{info['type']} ({info['name']})")  # fmt: skip


def onnx_scorer(onnx_path: str) -> Scorer:
    session = onnx_session(onnx_path)
    meta = session.get_modelmeta().custom_metadata_map
    _, channels, size, _ = session.get_inputs()[0].shape

    def score(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_map, image_score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.cpu().numpy()})
        return torch.from_numpy(image_score), torch.from_numpy(pixel_map)

    return Scorer(score, meta.get("ebmad_model_type", "?"), int(size), int(channels), meta.get("image_score", "?"),
                  float(meta.get("image_threshold", "nan")), float(meta.get("pixel_threshold", "nan")),
                  f"ONNX model {onnx_path}", "cpu (onnxruntime)")  # fmt: skip


def thresholds(scorer: Scorer, image: float | None, pixel: float | None) -> tuple[float, float]:
    """Command-line thresholds, else the stored ones; a clear error when either is missing."""
    image = scorer.image_threshold if image is None else float(image)
    pixel = scorer.pixel_threshold if pixel is None else float(pixel)
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


def write_outputs(path: Path, out: Path, name: Path, score: float, amap: torch.Tensor, size: tuple[int, int],
                  image_thr: float, pixel_thr: float, alpha: float) -> dict[str, Any]:  # fmt: skip
    """Overlay and mask of one scored image at its original size; returns its CSV row."""
    width, height = size
    row: dict[str, Any] = {"path": str(path), "score": score, "width": width, "height": height, "error": ""}
    if not math.isfinite(score):
        return {**row, "error": "non-finite score"}
    try:
        rgb = display_rgb(open_image(path))
    except Exception as exc:  # changed since it was scored
        return {**row, "error": error_text(exc)}
    up = upsample(amap, width, height)
    mask = up >= pixel_thr
    for sub, image in (("overlays", overlay(rgb, up, pixel_thr, alpha)),
                       ("masks", Image.fromarray(mask.astype(np.uint8) * 255))):  # fmt: skip
        target = out / sub / name.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    decision = "defective" if score >= image_thr else "good"
    return {**row, "decision": decision, "defect_area_px": int(mask.sum())}


# ---------------------------------------------------------------------------- predict
def score_chunk(scorer: Scorer, files: list[tuple[Path, Path]], out: Path, image_thr: float, pixel_thr: float,
                alpha: float) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """CSV rows, in input order, of one batch of (file, output name); an unreadable file gets its error.

    Also returns the seconds spent in the scorer itself.
    """
    rows: list[dict[str, Any]] = [{} for _ in files]
    decoded: list[tuple[int, torch.Tensor, tuple[int, int]]] = []
    for i, (path, _) in enumerate(files):
        try:  # the training/evaluation loader: same conversion and resize
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
        rows[i] = write_outputs(path, out, name, score, amap, size, image_thr, pixel_thr, alpha)
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
    image_thr, pixel_thr = thresholds(scorer, cfg.get("image_threshold"), cfg.get("pixel_threshold"))
    files = find_images(str(cfg.input) if cfg.get("input") else "")
    jobs = list(zip(files, output_names(files), strict=True))
    out = Path(cfg.output)
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
            chunk, seconds = score_chunk(scorer, jobs[start : start + cfg.batch_size], out, image_thr, pixel_thr,
                                         cfg.overlay_alpha)  # fmt: skip
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
        "image_threshold": image_thr,
        "pixel_threshold": pixel_thr,
        "out": str(out),
    }
    print(f"PREDICT model={scorer.model_type} score={scorer.image_score} scored={summary['scored']} "
          f"defective={summary['defective']} failed={len(failed)} time_s={elapsed:.2f} "
          f"images_per_s={len(rows) / max(elapsed, 1e-9):.1f} device={scorer.device} backend={cfg.backend} "
          f"out={out}", flush=True)  # fmt: skip
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Hydra main; exits with status 1 when any image failed."""
    torch.set_float32_matmul_precision("high")
    if predict(cfg)["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
