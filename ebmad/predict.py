"""Score new images with a trained model: ``python -m ebmad.predict ckpt_path=... input=... output=...``.

Console script ``ebmad-predict``. ``input`` is a folder (its images), a glob or one file; any model type's
checkpoint works (``backend=torch``), or an ONNX model from :mod:`ebmad.export` (``backend=onnx``). For
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
"""

from __future__ import annotations

import csv
import glob
import math
import os
import sys
import time
import warnings
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
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ebmad.cli import USER_ERRORS, front_door, full_traceback, report_error
from ebmad.data.io import IMAGE_SUFFIXES, DatasetError, list_images, load_image, open_image
from ebmad.export import INPUT_NAME, OUTPUT_NAMES, load_module, onnx_session
from ebmad.train import CONF_DIR
from ebmad.utils import device_info

WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit; Pillow's convert would clip at 255
# decision: score >= image_threshold (the image-level rule); defect_area_px: pixels whose map value is >=
# pixel_threshold (the pixel-level rule). The two thresholds are fitted separately on defect-free images, so
# a "good" image can still have a few pixels above the pixel threshold: both rules are in every row.
CSV_FIELDS = ("path", "score", "image_threshold", "decision", "defect_area_px", "pixel_threshold", "width", "height",
              "error")  # fmt: skip
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


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def legend(image: Image.Image, score: float, image_thr: float, area: int, pixel_thr: float) -> Image.Image:
    """The overlay with a strip below it: the colour bar (0 .. 2 x pixel threshold, the threshold marked),
    the image score against its threshold with the decision, and the defect area against the pixel threshold."""
    width = max(image.width, 420)
    unit = max(1, round(width / 420))
    bar_h, pad, text = 14 * unit, 6 * unit, 13 * unit
    strip_h = bar_h + 4 * text + 6 * pad
    panel = Image.new("RGB", (width, image.height + strip_h), (255, 255, 255))
    panel.paste(image, (0, 0))
    draw = ImageDraw.Draw(panel)
    font = _font(text)
    x0, x1, y = pad, width - pad, image.height + pad
    ramp = np.linspace(0.0, 2.0 * pixel_thr, max(2, x1 - x0))[None, :].repeat(bar_h, axis=0)
    panel.paste(Image.fromarray(heat_colors(ramp, pixel_thr)), (x0, y))
    mid = (x0 + x1) // 2
    draw.line([(mid, y - 2), (mid, y + bar_h + 2)], fill=(0, 0, 0), width=max(1, unit))
    y += bar_h + 2
    draw.text((x0, y), "0", fill=(0, 0, 0), font=font)
    draw.text((mid, y), f"{pixel_thr:.4g} (pixel threshold)", fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((x1, y), f"{2 * pixel_thr:.4g}", fill=(0, 0, 0), font=font, anchor="ra")
    decision = "DEFECTIVE" if score >= image_thr else "good"
    colour = (200, 0, 0) if decision == "DEFECTIVE" else (0, 120, 0)
    y += text + pad
    draw.text((x0, y), f"image score {score:.4g} {'>=' if score >= image_thr else '<'} image threshold "
                       f"{image_thr:.4g}: {decision}", fill=colour, font=font)  # fmt: skip
    y += text + pad
    draw.text(
        (x0, y), f"defect area {area} px (map >= pixel threshold {pixel_thr:.4g})", fill=(0, 0, 0), font=font
    )
    return panel


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
    row: dict[str, Any] = {"path": str(path), "score": score, "image_threshold": image_thr,
                           "pixel_threshold": pixel_thr, "width": width, "height": height, "error": ""}  # fmt: skip
    if not math.isfinite(score):
        return {**row, "error": "non-finite score"}
    try:
        rgb = display_rgb(open_image(path))
    except Exception as exc:  # changed since it was scored
        return {**row, "error": error_text(exc)}
    up = upsample(amap, width, height)
    mask = up >= pixel_thr
    area = int(mask.sum())
    shown = legend(overlay(rgb, up, pixel_thr, alpha), score, image_thr, area, pixel_thr)
    for sub, image in (("overlays", shown), ("masks", Image.fromarray(mask.astype(np.uint8) * 255))):
        target = out / sub / name.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    decision = "defective" if score >= image_thr else "good"
    return {**row, "decision": decision, "defect_area_px": area}


# ---------------------------------------------------------------------------- predict
def score_chunk(scorer: Scorer, files: list[tuple[Path, Path]], out: Path, image_thr: float, pixel_thr: float,
                alpha: float, max_pixels: int) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
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
    max_pixels = int(cfg.get("max_image_pixels") or 50_000_000)
    if max_pixels < 1:
        raise ValueError(f"max_image_pixels must be >= 1, got {max_pixels}")
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
