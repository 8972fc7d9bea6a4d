"""Turn a finished sweep folder into comparison tables (Markdown and CSV).

    python -m ebmad.report logs/compare/sweeps/default [--out DIR] [--categories bottle cable ...]

Per metric (image AUROC, pixel AUROC, pixel AP, AUPRO when recorded) one table with a row per category
and a column per model, the published number of each model beside it where one exists (carried in
``ebmad/reference/published.csv``), and the mean over completed categories. The EBM's score variants
(energy, L1/L2 of standardized gradients) get a table of their own. One block per hyperparameter setting
found in the sweep. Jobs that failed, were interrupted, never finished or never started are listed with
that status, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebmad.data.mvtec import MVTEC_CATEGORIES

log = logging.getLogger(__name__)

PUBLISHED_CSV = Path(__file__).resolve().parent / "reference" / "published.csv"
# (metric key prefix, title); a table is written when any completed job recorded the metric
METRICS = (
    ("image_auroc", "Table 1: image-level AUROC"),
    ("pixel_auroc", "Table 2: pixel-level AUROC"),
    ("pixel_ap", "Table 3: pixel-level average precision"),
    ("aupro", "Table 4: AUPRO (FPR <= 0.3)"),
)
EBM_EXTRA = {
    "image_auroc": ("A_ms_max", "E_patch_max"),
    "pixel_auroc": ("a_ms", "e_patch"),
}  # options, when run
EBM_VARIANTS = {
    "image_auroc": ("energy", "A_std_l1", "A_std_l2"),
    "pixel_auroc": ("a_std_l1", "a_std_l2"),
}
CATEGORY_KEY = "data.category"
MODEL_KEY = "model"
MODEL_KEYS = (MODEL_KEY, "recipe")  # what picks the method: a column of the tables, not a setting


def load_published(path: Path = PUBLISHED_CSV) -> dict[tuple[str, str, str], float]:
    """Published numbers: {(model, category or "mean", metric): value}."""
    with path.open() as fh:
        return {(r["model"], r["category"], r["metric"]): float(r["value"]) for r in csv.DictReader(fh)}


PUBLISHED = load_published()


@dataclass
class Job:
    folder: Path | None
    category: str
    setting: str
    status: str  # completed | failed | interrupted | incomplete | missing | diverged
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    model: str = "ebm"
    headline: dict[str, float] = field(default_factory=dict)  # {metric: the model's headline value}
    untrained: dict[str, float] = field(default_factory=dict)  # the untrained reference's metrics (EBM)
    scores: dict[str, str] = field(
        default_factory=dict
    )  # {"image_auroc": headline score, "pixel_auroc": map}


def _split(override: str) -> tuple[str, str]:
    """``"+key=value"`` -> ``("key", "value")``."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _job_overrides(folder: Path) -> list[str]:
    overrides = _read_yaml(folder / ".hydra" / "overrides.yaml")
    if isinstance(overrides, list):
        return [str(o) for o in overrides]
    return folder.name.split(",") if "=" in folder.name else []


def _setting(overrides: list[str], sweep_keys: set[str] | None) -> str:
    items = [o for o in overrides if _split(o)[0] not in (CATEGORY_KEY, *MODEL_KEYS)]
    if sweep_keys is not None:
        items = [o for o in items if _split(o)[0] in sweep_keys]
    return ",".join(sorted(items)) or "default"


def _sweep_overrides(sweep_dir: Path) -> list[str]:
    """The sweep's command-line overrides and sweeper params, as ``key=value`` strings."""
    cfg = _read_yaml(sweep_dir / "multirun.yaml") or {}
    hydra = cfg.get("hydra") or {}
    items = [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return items + [f"{k}={v}" for k, v in params.items()]


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys that vary across the sweep's jobs (None when the sweep left no multirun.yaml)."""
    if not (sweep_dir / "multirun.yaml").is_file():
        return None
    keys = set()
    for key, value in map(_split, _sweep_overrides(sweep_dir)):
        if "," in value or value.split("(")[0] in ("choice", "range", "interval", "tag", "glob"):
            keys.add(key)
    return keys


def expected_categories(sweep_dir: Path) -> list[str]:
    """Categories the sweep was launched with (from multirun.yaml), if recorded."""
    for key, value in map(_split, _sweep_overrides(sweep_dir)):
        if key == CATEGORY_KEY and "(" not in value:
            return [v.strip() for v in value.split(",") if v.strip()]
    return []


def _model_name(override_value: str) -> str:
    """``draem_tiny`` -> ``draem``: config variants of a method report as the method."""
    return override_value.split("_")[0] if override_value else "ebm"


def _headline(res: dict[str, Any]) -> dict[str, float]:
    """The model's headline value of each metric (results.json top-level keys, else the EBM defaults)."""
    m = res.get("metrics", {})
    out = {
        "image_auroc": res.get("image_auroc", m.get("image_auroc/A_std_l2")),
        "pixel_auroc": res.get("pixel_auroc", m.get("pixel_auroc/a_std_l2")),
    }
    for key in ("pixel_ap", "aupro"):
        out[key] = res.get(key, m.get(key))
    return {k: v for k, v in out.items() if v is not None}


def collect_jobs(sweep_dir: str | Path, categories: list[str] | None = None) -> list[Job]:
    """Every job of a sweep folder with its status; categories without a job are added as missing."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist")
    swept = _swept_keys(sweep_dir)
    sweep_keys = None if swept is None else swept - {CATEGORY_KEY, *MODEL_KEYS}
    jobs: list[Job] = []
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        markers = (folder / "results.json", folder / "job.json", folder / ".hydra")
        if not any(m.exists() for m in markers):
            continue
        overrides = _job_overrides(folder)
        res = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else {}
        values = dict(map(_split, overrides))
        category = res.get("category") or values.get(CATEGORY_KEY, "?")
        model = res.get("model") or _model_name(values.get(MODEL_KEY) or values.get("recipe", ""))
        jobs.append(Job(folder, category, _setting(overrides, sweep_keys), res.get("status", "incomplete"),
                        res.get("metrics", {}), res.get("error", ""), model, _headline(res),
                        (res.get("reference") or {}).get("untrained", {}),
                        {"image_auroc": res.get("image_score", "A_std_l2"),
                         "pixel_auroc": res.get("pixel_map", "a_std_l2")}))  # fmt: skip
    wanted = categories or expected_categories(sweep_dir)
    if not wanted and any(j.category in MVTEC_CATEGORIES for j in jobs):
        wanted = list(MVTEC_CATEGORIES)
    settings = sorted({j.setting for j in jobs}) or ["default"]
    for setting in settings:
        for model in sorted({j.model for j in jobs if j.setting == setting}) or ["ebm"]:
            have = {j.category for j in jobs if j.setting == setting and j.model == model}
            jobs += [Job(None, c, setting, "missing", model=model) for c in wanted if c not in have]
    order = {c: i for i, c in enumerate(wanted)}
    jobs.sort(key=lambda j: (j.setting, order.get(j.category, len(order)), j.category, j.model))
    return jobs


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _models(jobs: list[Job]) -> list[str]:
    order = ("ebm", "draem", "ssae")
    found = {j.model for j in jobs}
    return [m for m in order if m in found] + sorted(found - set(order))


def _status(jobs: list[Job]) -> str:
    parts = []
    for j in jobs:
        text = j.status if not j.error else f"{j.status}: {j.error[:80]}"
        parts.append(text if len(jobs) == 1 else f"{j.model} {text}")
    return "; ".join(parts)


def _categories(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(j.category for j in jobs))


def _delta(ours: float | None, paper: float | None) -> str:
    return "n/a" if ours is None or paper is None or math.isnan(ours) else f"{ours - paper:+.3f}"


def _metric_table(jobs: list[Job], metric: str, title: str) -> list[str]:
    """Rows: categories; per model its headline value, the published value and the difference."""
    models = _models(jobs)
    has_paper = {m: any(k[0] == m and k[2] == metric for k in PUBLISHED) for m in models}
    head = ["category"]
    for m in models:
        head += [m] + ([f"paper {m}", "Δ"] if has_paper[m] else [])
    head.append("status")
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat in _categories(jobs):
        cells = [cat]
        row = [j for j in jobs if j.category == cat]
        for m in models:
            job = next((j for j in row if j.model == m), None)
            ours = job.headline.get(metric) if job and job.status == "completed" else None
            cells.append(_fmt(ours) if job and job.status == "completed" else "—")
            if has_paper[m]:
                paper = PUBLISHED.get((m, cat, metric))
                cells += [_fmt(paper), _delta(ours, paper)]
        lines.append("| " + " | ".join([*cells, _status(row)]) + " |")
    cells = []
    for m in models:
        sel = [j for j in jobs if j.model == m]
        done = [j for j in sel if j.status == "completed"]
        mean = _mean([j.headline.get(metric) for j in done])
        cells.append(f"{_fmt(mean)} ({len(done)}/{len(sel)})")
        if has_paper[m]:
            paper = PUBLISHED.get((m, "mean", metric))
            cells += [_fmt(paper), _delta(mean, paper)]
    lines.append("| " + " | ".join(["**mean** (completed/all)", *cells, ""]) + " |")
    return lines


def _variant_table(jobs: list[Job], kind: str, columns: tuple[str, ...], title: str) -> list[str]:
    """The EBM's score variants side by side (one column per score)."""
    head = ["category", *(f"ours {c}" for c in columns), "paper EBM", "status"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    done = [j for j in jobs if j.status == "completed"]
    for j in jobs:
        cells = [_fmt(j.metrics.get(f"{kind}/{c}")) if j.status == "completed" else "—" for c in columns]
        lines.append("| " + " | ".join([j.category, *cells, _fmt(PUBLISHED.get(("ebm", j.category, kind))),
                                        _status([j])]) + " |")  # fmt: skip
    means = [_fmt(_mean([j.metrics.get(f"{kind}/{c}") for j in done])) for c in columns]
    lines.append("| " + " | ".join([f"**mean** ({len(done)} of {len(jobs)} completed)", *means,
                                    _fmt(PUBLISHED.get(("ebm", "mean", kind))), ""]) + " |")  # fmt: skip
    return lines


UNTRAINED_COLUMNS = (("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro"))


def _untrained_key(job: Job, metric: str) -> str:
    """The untrained reference's value of the job's headline: the same score or map."""
    name = job.scores.get(metric)
    return f"{metric}/{name}" if name else metric


def _untrained_table(jobs: list[Job]) -> list[str]:
    """What training adds: the trained EBM beside the same network at its initial weights."""
    head = ["category"]
    for name, _ in UNTRAINED_COLUMNS:
        head += [f"{name} trained", "untrained", "Δ"]
    lines = ["**EBM: trained vs untrained reference (same network at its initial weights)**", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    done = [j for j in jobs if j.status == "completed" and j.untrained]
    for j in done:
        cells = [j.category]
        for _, key in UNTRAINED_COLUMNS:
            ours, ref = j.headline.get(key), j.untrained.get(_untrained_key(j, key))
            cells += [_fmt(ours), _fmt(ref), _delta(ours, ref)]
        lines.append("| " + " | ".join(cells) + " |")
    cells = [f"**mean** ({len(done)})"]
    for _, key in UNTRAINED_COLUMNS:
        ours, ref = (
            _mean([j.headline.get(key) for j in done]),
            _mean([j.untrained.get(_untrained_key(j, key)) for j in done]),
        )
        cells += [_fmt(ours), _fmt(ref), _delta(ours, ref)]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(jobs: list[Job], sweep_dir: Path) -> str:
    out = [f"# ebmad sweep report: `{sweep_dir}`", ""]
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    out += ["Jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), ""]
    for setting in sorted({j.setting for j in jobs}):
        sel = [j for j in jobs if j.setting == setting]
        out += [f"## Setting: `{setting}`", ""]
        for metric, title in METRICS:
            if metric in ("image_auroc", "pixel_auroc") or any(metric in j.headline for j in sel):
                out += _metric_table(sel, metric, title) + [""]
        ebm = [j for j in sel if j.model == "ebm"]
        if ebm:
            for kind, title in (
                ("image_auroc", "EBM image-score variants"),
                ("pixel_auroc", "EBM pixel-map variants"),
            ):
                extra = tuple(c for c in EBM_EXTRA[kind] if any(f"{kind}/{c}" in j.metrics for j in ebm))
                out += _variant_table(ebm, kind, EBM_VARIANTS[kind] + extra, title) + [""]
            if any(j.untrained for j in ebm):
                out += _untrained_table(ebm) + [""]
    out.append("Published numbers: EBM per-category pixel AUROC from Genc et al. Table 2 (image AUROC only as a "
               "15-category mean); DRAEM from Zavrtanik et al. Table 2; SSAE journal means. Sources in "
               "`ebmad/reference/published.csv`. Δ = ours - published.")  # fmt: skip
    return "\n".join(out) + "\n"


def write_csv(jobs: list[Job], path: Path) -> None:
    keys = sorted({k for j in jobs for k in j.metrics if isinstance(j.metrics[k], int | float)})
    heads = [m for m, _ in METRICS]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["setting", "model", "category", "status", *heads, *keys, *(f"paper_{m}" for m in heads),
                    "folder", "error"])  # fmt: skip
        for j in jobs:
            w.writerow([j.setting, j.model, j.category, j.status, *(j.headline.get(m, "") for m in heads),
                        *(j.metrics.get(k, "") for k in keys), *(PUBLISHED.get((j.model, j.category, m), "")
                        for m in heads), j.folder or "", j.error])  # fmt: skip
        for setting in sorted({j.setting for j in jobs}):
            for model in _models([j for j in jobs if j.setting == setting]):
                done = [
                    j for j in jobs if j.setting == setting and j.model == model and j.status == "completed"
                ]
                w.writerow([setting, model, "mean", f"{len(done)} completed",
                            *(_fmt(_mean([j.headline.get(m) for j in done])) for m in heads),
                            *(_fmt(_mean([j.metrics.get(k) for j in done])) for k in keys),
                            *(PUBLISHED.get((model, "mean", m), "") for m in heads), "", ""])  # fmt: skip


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None,
                 categories: list[str] | None = None) -> tuple[Path, Path, list[Job]]:  # fmt: skip
    """Write report.md and report.csv; returns their paths and the jobs."""
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = collect_jobs(sweep_dir, categories)
    md, cs = out / "report.md", out / "report.csv"
    md.write_text(render_markdown(jobs, sweep_dir))
    write_csv(jobs, cs)
    return md, cs, jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", help="a multirun folder, e.g. logs/paper/sweeps/default")
    ap.add_argument("--out", help="where to write report.md / report.csv (default: the sweep folder)")
    ap.add_argument(
        "--categories", nargs="+", help="categories expected (default: from the sweep's multirun.yaml)"
    )
    a = ap.parse_args(argv)
    md, cs, _ = write_report(a.sweep_dir, a.out, a.categories)
    print(md.read_text())
    print(f"wrote {md} and {cs}")
    return 0


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write report.md/report.csv into the sweep folder and print it."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        md, _, jobs = write_report(sweep_dir)
        bad = [j for j in jobs if j.status != "completed"]
        print(md.read_text(), flush=True)
        if bad:
            log.warning("%d of %d jobs not completed: %s", len(bad), len(jobs),
                        ", ".join(f"{j.category}[{j.setting}]={j.status}" for j in bad))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
