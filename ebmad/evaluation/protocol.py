"""The evaluation protocol of a run: every metric of the test set, at the model's or the native resolution.

``eval.resolution=model`` (default, the paper's protocol): maps and masks at ``data.image_size``.
``eval.resolution=native`` (the official MVTec AD evaluation): each map upsampled bilinearly to its
mask's original size, masks read again at that size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ebmad.data.io import load_mask
from ebmad.evaluation.metrics import evaluate_all, resize_maps_native

RESOLUTIONS = ("model", "native")


def native_masks(meta: Sequence[Any]) -> list[torch.Tensor]:
    """Each test image's mask at its original size (same rule as training: > half of full scale).

    ``meta``: :class:`ebmad.data.layout.TestItem` s (``image``, ``mask`` path or None, ``mask_rule``).
    """
    masks = []
    for item in meta:
        with Image.open(item.image) as img:  # header only
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation swaps the sides
                w, h = h, w
        if item.mask is None:
            masks.append(torch.zeros(h, w, dtype=torch.bool))
        else:
            masks.append(
                load_mask(item.mask, (w, h), (w, h), item.image, rule=getattr(item, "mask_rule", "half"))
            )
    return masks


def test_set_metrics(
    results: dict[str, Any],
    meta: Sequence[Any],
    image_score: str,
    resolution: str = "model",
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    aupro_bins: int | None = None,
) -> dict[str, float]:
    """AUROC, AP, AUPRO, F1-max, metrics at the thresholds and per defect type of one test set.

    ``results``: a model's ``test_results`` (scores, labels, index, and the default ``maps``/``masks``
    ordered by index); ``meta``: the test items by index.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"eval.resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    index = results["index"]
    items = [meta[i] for i in index]
    maps, masks = results["maps"], results["masks"]
    if resolution == "native":
        masks = native_masks(items)
        maps = resize_maps_native(maps, [tuple(m.shape) for m in masks])
    return evaluate_all(
        torch.tensor(results["scores"][image_score], dtype=torch.float64),
        torch.tensor(results["labels"]),
        maps,
        masks,
        [it.defect for it in items],
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        aupro_bins=aupro_bins,
    )


def _subsample(x: torch.Tensor, n: int = 200_000) -> torch.Tensor:
    """At most ``n`` values, evenly strided (histograms need no more)."""
    x = x.flatten()
    return x[:: max(1, len(x) // n)]


def run_figures(
    out_dir: Path, model: Any, results: dict[str, Any], title: str, n_panels: int = 4
) -> list[Path]:
    """ROC curves, Fig. 3 panels of the first examples and, for the EBM, Fig. 2b; PNGs in ``out_dir``.

    Map colours run from 0 to twice the stored pixel threshold (fixed, comparable across images).
    """
    from ebmad.evaluation import figures  # matplotlib: imported when figures are written

    out_dir.mkdir(parents=True, exist_ok=True)
    maps, masks = results["maps"], results["masks"]
    labels = torch.tensor(results["labels"])
    scores = torch.tensor(results["scores"][model.DEFAULT_IMAGE_SCORE], dtype=torch.float64)
    paths = [figures.roc_curves(scores, labels, maps, masks, out_dir / "roc.png", title=title)]
    good_pixels = _subsample(maps[labels == 0]) if (labels == 0).any() else _subsample(maps[~masks])
    defect_pixels = _subsample(maps[masks])
    thr = float(model.pixel_threshold)
    vmax = (
        2 * thr if math.isfinite(thr) and thr > 0 else float(torch.quantile(good_pixels.float(), 0.999)) * 2
    )
    lines = [thr] if math.isfinite(thr) else []
    ex = model.examples
    for i in range(min(n_panels, len(ex.get("image", ())))):
        paths.append(figures.anomaly_panel(
            ex["image"][i], ex["mask"][i], ex["map"][i], out_dir / f"fig3_test{int(ex['index'][i]):04d}.png",
            threshold=thr if lines else vmax / 2, good_values=good_pixels, defect_values=defect_pixels,
            lines=lines, vmax=vmax, title=f"{title}: test image {int(ex['index'][i])}",
        ))  # fmt: skip
    if model.MODEL_TYPE == "ebm" and ex:
        with torch.no_grad():
            _, m = model.score(ex["image"].to(model.device))
        inside = ex["mask"].bool()
        raw, std = m["a_raw_l2"].cpu(), m["a_std_l2"].cpu()
        paths.append(figures.raw_vs_standardized_histograms(
            {"defect-free pixels": raw[~inside], "defective pixels": raw[inside]},
            {"defect-free pixels": std[~inside], "defective pixels": std[inside]},
            out_dir / "fig2b_raw_vs_standardized.png", standardized_lines=lines, title=title,
        ))  # fmt: skip
    return paths
