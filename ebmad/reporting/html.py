"""``report.html``: the sweep report as one self-contained page (figures embedded as PNG data URIs).

The same tables as ``report.md``; per metric a bar chart by category (each model's mean ± its standard
deviation over seeds, the published value and the untrained reference marked, failed or missing jobs named);
ROC and PRO curves per category and model; per category a strip of the same test images with each model's
anomaly map side by side, its pixel-threshold contour drawn (green). Data per run: ``<run>/examples.npz``
(:mod:`ebmad.evaluation.examples`). Plots with matplotlib's Agg canvas; the page opens from disk.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ebmad.evaluation.examples import load_examples
from ebmad.reporting.sweeps import PUBLISHED, Job, Sweep, category_mean, models_of, stat
from ebmad.reporting.tables import (
    PUBLISHED_NOTE,
    Table,
    _categories,
    _headline_of,
    _status,
    _untrained_key,
    header_lines,
    n_caption,
    not_completed_table,
    report_settings,
    setting_lines,
    setting_tables,
    trials_table,
)

COLORS = (
    "tab:blue",
    "tab:red",
    "tab:green",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
)
PANEL_IN = 3.0  # inches per anomaly-map panel at 100 dpi: >= 256 px drawn
MAP_CMAP = "inferno"
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1500px;
     padding:0 1em;color:#222}
h1{font-size:1.6em} h2{margin-top:2em;border-bottom:2px solid #ccc} h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right} th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left} tr:last-child td{border-top:2px solid #999}
.status-bad{color:#b00} .meta{color:#444} .notes{font-size:.85em;color:#555}
code{background:#f4f4f4;padding:0 .2em;word-break:break-all}
figure{margin:1em 0} img{max-width:100%;height:auto;border:1px solid #ddd}
"""


def _color(models: list[str], m: str) -> str:
    return COLORS[models.index(m) % len(COLORS)]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def table_html(t: Table, table_id: str = "") -> str:
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_inline(h)}</th>" for h in t.head)
    rows = []
    for r in t.rows:
        cells = []
        for i, c in enumerate(r):
            bad = t.head[i] == "status" and c and c != "completed"
            cells.append(f"<td{' class=status-bad' if bad else ''}>{_inline(c)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{_inline(n)}</li>" for n in dict.fromkeys(t.notes))
    return (
        f"<h3>{_inline(t.title)}</h3>\n<table{ident} class=report><thead><tr>{head}</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + (f"<ul class=notes>{notes}</ul>" if notes else "")
        + "\n"
    )


def _img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>\n'


# ----------------------------------------------------------------------------------------- figures
def bar_chart(jobs: list[Job], metric: str, label: str) -> str:
    """Each model's mean ± std per category and over categories; published value and untrained marked."""
    models = models_of(jobs)
    cats = _categories(jobs)
    labels = [*cats, "mean"]
    fig = _figure(max(6.0, 0.55 * len(labels) * max(1, len(models)) ** 0.5 + 2.5), 4.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(models))
    x = np.arange(len(labels))
    get = _headline_of(metric)
    marked_paper = marked_ref = False
    context = any(PUBLISHED.has(m, metric) and PUBLISHED.not_comparable(m, metric, jobs) for m in models)
    for k, m in enumerate(models):
        sel = [j for j in jobs if j.model == m]
        pos = x + (k - (len(models) - 1) / 2) * width
        means, stds, papers, refs = [], [], [], []
        for cat in cats:
            row = [j for j in sel if j.category == cat]
            s = stat(row, get)
            means.append(np.nan if s.mean is None else s.mean)
            stds.append(np.nan if s.std is None else s.std)
            papers.append(PUBLISHED.get(m, cat, metric))
            r = stat(row, lambda j: j.untrained.get(_untrained_key(j, metric)))
            refs.append(r.mean)
            if s.mean is None and row:
                ax.text(pos[len(means) - 1], 0.02, _status(row, False).split(":")[0][:20], rotation=90,
                        ha="center", va="bottom", fontsize=7, color="tab:red")  # fmt: skip
        cm = category_mean(sel, get)
        means.append(np.nan if cm.mean is None else cm.mean)
        stds.append(np.nan if cm.std is None else cm.std)
        papers.append(PUBLISHED.mean_over(m, metric, cm.categories)[0])
        rm = category_mean(
            [j for j in sel if j.untrained], lambda j: j.untrained.get(_untrained_key(j, metric))
        )
        refs.append(rm.mean)
        color = _color(models, m)
        ax.bar(pos, means, width, yerr=stds, capsize=3, color=color, alpha=0.85, label=m,
               error_kw={"elinewidth": 1})  # fmt: skip
        pp = [(p, v) for p, v in zip(pos, papers, strict=True) if v is not None]
        if pp:
            ax.scatter(*zip(*pp, strict=True), marker="_", s=400, linewidths=2.5, color="black", zorder=3,
                       label=None if marked_paper else "published" + (" (context)" if context else ""))  # fmt: skip
            marked_paper = True
        rr = [(p, v) for p, v in zip(pos, refs, strict=True) if v is not None]
        if rr:
            ax.scatter(*zip(*rr, strict=True), marker="x", s=50, color="black", zorder=3,
                       label=None if marked_ref else "untrained reference")  # fmt: skip
            marked_ref = True
    ax.set_xticks(
        x, labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center"
    )
    ax.set_ylabel(label)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(label)
    return png_data_uri(fig)


class ExampleCache:
    """``examples.npz`` of each job, read once (no pickles)."""

    def __init__(self) -> None:
        self._data: dict[Path, dict[str, Any] | None] = {}

    def get(self, job: Job) -> dict[str, Any] | None:
        if job.examples is None or not job.done:
            return None
        if job.examples not in self._data:
            try:
                self._data[job.examples] = load_examples(job.examples)
            except ValueError:
                self._data[job.examples] = None
        return self._data[job.examples]


def curves_figure(jobs: list[Job], category: str, cache: ExampleCache) -> str | None:
    """Image ROC, pixel ROC and PRO (FPR <= 0.3) of every completed run of one category."""
    models = models_of(jobs)
    runs = [(j, cache.get(j)) for j in jobs if j.category == category]
    runs = [(j, d) for j, d in runs if d is not None and "pixel_roc" in d]
    if not runs:
        return None
    multi = len({j.seed for j in jobs if j.seed}) > 1
    fig = _figure(13, 4.3)
    axes = fig.subplots(1, 3)
    specs = (("image_roc", "image-level ROC", 1.0), ("pixel_roc", "pixel-level ROC", 1.0),
             ("pro", "PRO curve (FPR <= 0.3)", 0.3))  # fmt: skip
    for ax, (key, title, xmax) in zip(axes, specs, strict=True):
        for j, d in runs:
            pts = d.get(key)
            if pts is None or pts.size == 0:
                continue
            x, y = pts[0].astype(float), pts[1].astype(float)
            if key == "pro":
                keep = x <= xmax + 1e-9
                x, y = x[keep], y[keep]
            ax.plot(x, y, color=_color(models, j.model), alpha=0.85, linewidth=1.4,
                    label=f"{j.model}" + (f" seed {j.seed}" if multi else ""))  # fmt: skip
        if key != "pro":
            ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        ax.set_xlim(0, xmax)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("per-region overlap" if key == "pro" else "true positive rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{category}: ROC and PRO curves")
    return png_data_uri(fig)


def _display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    return (img[..., 0], "gray") if img.shape[-1] == 1 else (img, None)


def maps_figure(jobs: list[Job], category: str, cache: ExampleCache) -> str | None:
    """The same test images, one row each: image (ground truth outlined) | mask | each model's map."""
    models = models_of(jobs)
    chosen: dict[str, dict[str, Any]] = {}
    for m in models:
        for j in (j for j in jobs if j.model == m and j.category == category):
            d = cache.get(j)
            if d is not None:
                chosen[m] = d
                break
    if not chosen:
        return None
    ref = next(iter(chosen.values()))
    paths = [p for p in ref["paths"].tolist() if all(p in d["paths"].tolist() for d in chosen.values())]
    if not paths:
        return None
    cols = 2 + len(chosen)
    height = PANEL_IN * len(paths) + 0.9
    fig = Figure(figsize=(PANEL_IN * cols, height), dpi=100)  # no constrained layout: slow with many axes
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.9 / height, wspace=0.04, hspace=0.12)
    axes = np.asarray(fig.subplots(len(paths), cols, squeeze=False))
    for r, p in enumerate(paths):
        i = ref["paths"].tolist().index(p)
        img, cmap = _display(ref["images"][i])
        mask = ref["masks"][i]
        axes[r, 0].imshow(img, cmap=cmap, interpolation="nearest")
        if mask.any() and not mask.all():
            axes[r, 0].contour(mask, levels=[0.5], colors="cyan", linewidths=1)
        axes[r, 0].set_title(f"{ref['defects'][i]}: {p}", fontsize=8)
        axes[r, 1].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[r, 1].set_title("ground truth", fontsize=8)
        for c, (m, d) in enumerate(chosen.items(), start=2):
            k = d["paths"].tolist().index(p)
            amap = d["maps"][k].astype(np.float32)
            thr = d["pixel_threshold"]
            vmax = 2 * thr if math.isfinite(thr) and thr > 0 else float(np.quantile(d["maps"].astype(np.float32),
                                                                                     0.999)) or 1.0  # fmt: skip
            axes[r, c].imshow(amap, cmap=MAP_CMAP, vmin=0, vmax=vmax, interpolation="nearest")
            if math.isfinite(thr) and amap.min() < thr < amap.max():
                axes[r, c].contour(amap, levels=[thr], colors="lime", linewidths=1.2)
            axes[r, c].set_title(f"{m} {d['pixel_map']} (0..{vmax:.3g}, contour {thr:.3g})", fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"{category}: anomaly maps of the same test images (green: the model's pixel threshold; cyan: "
                 "ground truth)", y=1 - 0.2 / height)  # fmt: skip
    return png_data_uri(fig)


# ----------------------------------------------------------------------------------------- page
def render_html(sweep: Sweep) -> str:
    cache = ExampleCache()
    parts = [
        f"<h1>ebmad sweep report</h1>\n<p class=meta><code>{html.escape(str(sweep.folder))}</code></p>\n"
    ]
    parts += [f"<p class=meta>{_inline(h)}</p>\n" for h in header_lines(sweep)]
    if sweep.search:
        parts.append(table_html(trials_table(sweep), "trials"))
    n = 0
    for setting in report_settings(sweep):
        sel = [j for j in sweep.jobs if j.setting == setting]
        parts.append(f"<h2>Setting: <code>{html.escape(setting)}</code></h2>\n<ul>"
                     + "".join(f"<li>{_inline(s[2:])}</li>" for s in setting_lines(sel)) + "</ul>\n")  # fmt: skip
        for t in setting_tables(sel):
            n += 1
            parts.append(table_html(t, f"table-{n}"))
            if t.metric:
                label = t.title.split(": ", 1)[-1]
                parts.append(_img(bar_chart(sel, t.metric, label), f"{label} by category, {n_caption(sel)} "
                                  "(bars), published value (black line; context only where the notes say not "
                                  "comparable), untrained reference (x)"))  # fmt: skip
        parts.append("<h3>ROC and PRO curves</h3>\n")
        for cat in _categories(sel):
            uri = curves_figure(sel, cat, cache)
            parts.append(_img(uri, f"{cat}: ROC and PRO curves") if uri else
                         f"<p class=notes>{html.escape(cat)}: no completed run with examples.npz</p>\n")  # fmt: skip
        parts.append("<h3>Anomaly maps</h3>\n")
        for cat in _categories(sel):
            uri = maps_figure(sel, cat, cache)
            parts.append(_img(uri, f"{cat}: anomaly maps side by side") if uri else
                         f"<p class=notes>{html.escape(cat)}: no completed run with examples.npz</p>\n")  # fmt: skip
    bad = not_completed_table(sweep.jobs)
    if bad.rows:
        parts.append(table_html(bad, "not-completed"))
    parts.append(f"<p class=notes>{_inline(PUBLISHED_NOTE)}</p>\n")
    title = html.escape(f"ebmad sweep report: {sweep.folder.name}")
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{title}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n" + "".join(parts) + "</body></html>\n")  # fmt: skip


def write_html(sweep: Sweep, path: str | Path) -> Path:
    """Write ``report.html`` (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(sweep), encoding="utf-8")
    tmp.replace(path)
    return path
