"""Report figures as PNG files (matplotlib's Agg canvas, no pyplot, no display).

Images arrive as tensors/arrays (C, H, W) in [-1, 1], maps as (H, W). Anomaly maps are drawn on a fixed
colour scale tied to the decision threshold (0 .. 2 x threshold by default), never per-image min-max, so
the same colour means the same score in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ebmad.evaluation.aupro import ArrayLike, Maps, to_numpy
from ebmad.evaluation.metrics import auroc, flatten, roc_curve

MAP_CMAP = "inferno"
_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def image_to_display(image: ArrayLike) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) in [0, 1] for ``imshow``."""
    x = to_numpy(image).astype(np.float32)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (C, H, W) with C in (1, 3), got shape {x.shape}")
    x = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def _hist(ax, groups: Mapping[str, np.ndarray], lines: Sequence[float], xlabel: str, bins: int = 80) -> None:
    nonempty = {k: v for k, v in groups.items() if v.size}
    if nonempty:
        edges = np.histogram_bin_edges(np.concatenate(list(nonempty.values())), bins=bins)
        for (name, v), color in zip(nonempty.items(), _COLORS, strict=False):
            ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.45, color=color, label=name)
        ax.set_yscale("log")
    for t in lines:
        ax.axvline(t, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=7)


def anomaly_panel(
    image: ArrayLike,
    mask: ArrayLike,
    amap: ArrayLike,
    path: str | Path,
    threshold: float,
    *,
    good_values: ArrayLike | None = None,
    defect_values: ArrayLike | None = None,
    lines: Sequence[float] | None = None,
    vmax: float | None = None,
    title: str | None = None,
) -> Path:
    """The paper's Fig. 3 row: image | ground truth | anomaly map | good-vs-defective pixel histograms.

    The histograms default to this map's pixels outside / inside the mask; pass ``good_values`` (e.g. the
    pixels of defect-free images) and ``defect_values`` to show others. ``lines`` default to
    ``[threshold]`` (e.g. the three-sigma cut); the map's colour scale is 0 .. ``vmax`` = 2 x threshold.
    """
    m, g = to_numpy(amap).astype(np.float64), to_numpy(mask) != 0
    if m.ndim != 2 or m.shape != g.shape:
        raise ValueError(f"anomaly_panel: map {m.shape} and mask {g.shape} must be equal (H, W)")
    vmax = 2.0 * threshold if vmax is None else vmax
    if not (math.isfinite(vmax) and vmax > 0):
        raise ValueError(f"anomaly_panel: need a positive threshold or vmax for the colour scale, got {vmax}")
    fig = _figure(14, 3.4)
    axes = fig.subplots(1, 4, width_ratios=[1, 1, 1.2, 1.6])
    img = image_to_display(image)
    axes[0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    axes[0].set_title("image")
    axes[1].imshow(g, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth")
    im = axes[2].imshow(m, cmap=MAP_CMAP, vmin=0.0, vmax=vmax)
    if g.any() and not g.all():
        axes[2].contour(g, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[2].set_title(f"anomaly map (0 .. {vmax:.3g})")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes[:3]:
        ax.set_axis_off()
    good = m[~g] if good_values is None else flatten(good_values)
    defect = m[g] if defect_values is None else flatten(defect_values)
    _hist(
        axes[3], {"defect-free pixels": good, "defective pixels": defect}, lines or [threshold], "map value"
    )
    axes[3].set_title("pixel values")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def raw_vs_standardized_histograms(
    raw: Mapping[str, ArrayLike],
    standardized: Mapping[str, ArrayLike],
    path: str | Path,
    *,
    raw_lines: Sequence[float] = (),
    standardized_lines: Sequence[float] = (),
    title: str | None = None,
) -> Path:
    """Fig. 2b: pixel-value histograms of the raw and the standardized map, one curve per group.

    ``raw``/``standardized``: {group name (e.g. "defect-free pixels"): values}.
    """
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 2)
    _hist(axes[0], {k: flatten(v) for k, v in raw.items()}, raw_lines, "raw value")
    axes[0].set_title("raw")
    _hist(axes[1], {k: flatten(v) for k, v in standardized.items()}, standardized_lines, "standardized value")
    axes[1].set_title("standardized")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _thin(x: np.ndarray, y: np.ndarray, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~n points of a curve (ends kept), enough to draw it."""
    if len(x) <= n:
        return x, y
    idx = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
    return x[idx], y[idx]


def roc_curves(
    image_scores: Maps, labels: Maps, maps: Maps, masks: Maps, path: str | Path, title: str | None = None
) -> Path:
    """Image-level and pixel-level ROC curves side by side, AUROC in the legends."""
    fig = _figure(9, 4.2)
    axes = fig.subplots(1, 2)
    for ax, name, s, y in ((axes[0], "image", image_scores, labels), (axes[1], "pixel", maps, masks)):
        fpr, tpr = _thin(*roc_curve(s, y))
        ax.plot(fpr, tpr, color="tab:blue", label=f"AUROC {auroc(s, y):.4f}")
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{name}-level ROC")
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def category_bars(
    values: Mapping[str, Mapping[str, float]], path: str | Path, metric: str = "image AUROC"
) -> Path:
    """Grouped bars of ``values`` {category: {model: value}} with a final "mean" group (NaN: no bar)."""
    if not values:
        raise ValueError("category_bars: no categories to plot")
    cats = list(values)
    models = sorted({m for v in values.values() for m in v})
    table = np.array([[values[c].get(m, np.nan) for m in models] for c in cats], dtype=np.float64)
    means = np.array([np.nanmean(col) if np.isfinite(col).any() else np.nan for col in table.T])
    table = np.vstack([table, means])
    labels = [*cats, "mean"]
    fig = _figure(max(6.0, 0.6 * len(labels) * max(1, len(models)) ** 0.5 + 2), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(models)
    x = np.arange(len(labels))
    for j, (model, color) in enumerate(
        zip(models, _COLORS * (1 + len(models) // len(_COLORS)), strict=False)
    ):
        ax.bar(x + (j - (len(models) - 1) / 2) * width, table[:, j], width, label=model, color=color)
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel(metric)
    finite = table[np.isfinite(table)]
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
