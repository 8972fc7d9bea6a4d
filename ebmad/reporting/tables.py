"""The report's tables: per metric a row per category and a column per model, the published number
beside it, the EBM's score variants, its untrained reference, the settings and the jobs not completed;
rendered as Markdown (``report.md``) and CSV (``report.csv``). The entry point is :mod:`ebmad.report`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebmad.models import MODEL_CLASSES, model_class
from ebmad.reporting.sweeps import (
    PUBLISHED,
    CategoryMean,
    Job,
    Stat,
    Sweep,
    category_mean,
    models_of,
    stat,
)
from ebmad.synthesis import favoured

FORMATS = ("md", "csv", "html")
# (metric key, title); a table is written when any completed job recorded the metric
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
EBM_VARIANTS = {"image_auroc": ("energy", "A_std_l1", "A_std_l2"), "pixel_auroc": ("a_std_l1", "a_std_l2")}
UNTRAINED_COLUMNS = (("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro"))
STD_NOTE = ("Seeds are replicates: each value is the mean ± sample standard deviation (ddof=1) over the "
            "completed seeds, n their number; a mean over categories is the mean of the per-category means, "
            "its ± the standard deviation over seeds of the per-seed means (seeds that completed every "
            "category), n those seeds.")  # fmt: skip
PUBLISHED_NOTE = ("Published numbers: EBM per-category pixel AUROC from Genc et al. Table 2 (image AUROC only as "
                  "a 15-category mean); DRAEM from Zavrtanik et al. Table 2; SSAE journal means; PatchCore (authors' "
                  "results, WideResNet-50) and PaDiM (WideResNet-50): another backbone is not comparable. Sources in "
                  "`ebmad/reference/published.csv`. Δ = ours - published, printed only where the runs match the paper's "
                  "protocol in data, resolution and training length (at least 90 %; the protocol columns of "
                  "published.csv); elsewhere the published value is context, marked not comparable. A mean is "
                  "compared with the published mean over the same categories only.")  # fmt: skip


@dataclass
class Table:
    """A report table, rendered as Markdown and HTML from the same cells."""

    title: str
    head: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metric: str = ""  # the metric a figure of the HTML report draws beside it


def table_md(t: Table) -> list[str]:
    lines = [f"**{t.title}**", "", "| " + " | ".join(t.head) + " |", "|" + "---|" * len(t.head)]
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    if t.notes:
        lines += ["", *(f"- {n}" for n in dict.fromkeys(t.notes))]
    return lines


# ----------------------------------------------------------------------------------------- cells
def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _delta(ours: float | None, paper: float | None) -> str:
    return "n/a" if ours is None or paper is None or math.isnan(ours) else f"{ours - paper:+.3f}"


def fmt_stat(s: Stat, show_n: bool) -> str:
    """``0.881 ± 0.012 (n=2)``; one value without ±; ``—`` for none."""
    if not s.n:
        return "—"
    text = _fmt(s.mean) + (f" ± {s.std:.3f}" if s.std is not None else "")
    return text + (f" (n={s.n})" if show_n else "")


def fmt_mean(cm: CategoryMean, show_n: bool) -> str:
    if cm.mean is None:
        return f"— (0/{cm.n_all})"
    spread = f" ± {cm.std:.3f}" if cm.std is not None else ""
    return f"{_fmt(cm.mean)}{spread} ({len(cm.categories)}/{cm.n_all}" + (
        f", n={cm.n_seeds})" if show_n else ")"
    )


def _status(jobs: list[Job], show_model: bool | None = None, show_seed: bool = False) -> str:
    """``completed``, or what is not, per model (with the seed and how many seeds completed)."""
    if show_model is None:
        show_model = len({j.model for j in jobs}) > 1
    if all(j.done for j in jobs):
        return "completed" if jobs else ""
    parts = []
    for m in models_of(jobs):
        sel = [j for j in jobs if j.model == m]
        bad = [j for j in sel if not j.done]
        if not bad:
            continue
        texts = [(f"seed={j.seed} " if show_seed and j.seed else "") + j.status + (f": {j.error[:80]}" if j.error
                 else "") for j in bad]  # fmt: skip
        done = len(sel) - len(bad)
        text = "; ".join(texts) + (f" ({done} of {len(sel)} seeds completed)" if show_seed and done else "")
        parts.append((f"{m} " if show_model else "") + text)
    return "; ".join(parts)


def _categories(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(j.category for j in jobs))


def _multi_seed(jobs: list[Job]) -> bool:
    return len({j.seed for j in jobs if j.seed}) > 1


def _score_name(jobs: list[Job], model: str, metric: str) -> str:
    kind = "image_auroc" if metric == "image_auroc" else "pixel_auroc"
    names = list(dict.fromkeys(j.scores.get(kind, "") for j in jobs if j.model == model and j.done))
    return f"{model} ({'/'.join(n for n in names if n)})" if any(names) else model


def _headline_of(metric: str) -> Callable[[Job], float | None]:
    return lambda j: j.headline.get(metric)


def _metric_of(key: str) -> Callable[[Job], float | None]:
    return lambda j: j.metrics.get(key)


# ----------------------------------------------------------------------------------------- tables
def metric_table(jobs: list[Job], metric: str, title: str, show_n: bool | None = None) -> Table:
    """Rows: categories; per model its headline (mean ± std over seeds), the published value and Δ."""
    show_n = _multi_seed(jobs) if show_n is None else show_n
    models = models_of(jobs)
    has_paper = {m: PUBLISHED.has(m, metric) for m in models}
    why_not = {m: PUBLISHED.not_comparable(m, metric, jobs) if has_paper[m] else "" for m in models}
    head = ["category"]
    for m in models:
        head += [_score_name(jobs, m, metric)] + ([f"paper {m}", "Δ"] if has_paper[m] else [])
    t = Table(title, [*head, "status"], metric=metric)
    get = _headline_of(metric)
    for cat in _categories(jobs):
        row = [j for j in jobs if j.category == cat]
        cells = [cat]
        for m in models:
            s = stat([j for j in row if j.model == m], get)
            cells.append(fmt_stat(s, show_n))
            if has_paper[m]:
                paper = PUBLISHED.get(m, cat, metric)
                cells += [_fmt(paper), _paper_delta(s.mean, paper, why_not[m])]
        t.rows.append([*cells, _status(row, len(models) > 1, show_n)])
    cells = ["**mean** (completed/all categories)"]
    for m in models:
        cm = category_mean([j for j in jobs if j.model == m], get)
        cells.append(fmt_mean(cm, show_n))
        if has_paper[m]:
            paper, why = PUBLISHED.mean_over(m, metric, cm.categories)
            cells += [_fmt(paper), _paper_delta(cm.mean, paper, why_not[m])]
            t.notes += [why] if why else []
    t.rows.append([*cells, ""])
    t.notes += [comparability_note(m, why_not[m]) for m in models if why_not[m]]
    t.notes.append(n_caption(jobs))
    return t


def _paper_delta(ours: float | None, paper: float | None, why_not: str) -> str:
    """Δ to a published value, or "not comparable: <why>" (no Δ) when the run does not match its protocol."""
    if why_not and paper is not None:
        return f"not comparable: {why_not}"
    return _delta(ours, paper)


def comparability_note(model: str, why_not: str) -> str:
    return (f"{model}: the published values are context only, not comparable ({why_not}): no Δ is printed; "
            "a Δ needs the paper's data, resolution and training length (ebmad/reference/published.csv)")  # fmt: skip


def n_caption(jobs: list[Job]) -> str:
    """How many runs each value summarizes: "single run (n = 1)" or "mean ± standard deviation over n = k seeds"."""
    counts = [sum(j.done for j in jobs if (j.model, j.category) == key)
              for key in dict.fromkeys((j.model, j.category) for j in jobs)]  # fmt: skip
    counts = [c for c in counts if c] or [0]
    lo, hi = min(counts), max(counts)
    if hi <= 1:
        return "single run (n = 1) per model and category: no standard deviation"
    if lo == hi:
        return f"mean ± sample standard deviation over n = {hi} seeds per model and category"
    return f"mean ± sample standard deviation over n = {lo} to {hi} seeds per model and category (n in each cell)"


def variant_table(jobs: list[Job], kind: str, columns: tuple[str, ...], title: str,
                  show_n: bool | None = None) -> Table:  # fmt: skip
    """The EBM's score variants side by side (one column per score), the published EBM value beside them."""
    show_n = _multi_seed(jobs) if show_n is None else show_n
    t = Table(title, ["category", *(f"ours {c}" for c in columns), "paper EBM", "status"])
    for cat in _categories(jobs):
        row = [j for j in jobs if j.category == cat]
        cells = [fmt_stat(stat(row, _metric_of(f"{kind}/{c}")), show_n) for c in columns]
        t.rows.append([cat, *cells, _fmt(PUBLISHED.get("ebm", cat, kind)), _status(row, False, show_n)])
    means = [category_mean(jobs, _metric_of(f"{kind}/{c}")) for c in columns]
    done = means[-1].categories if means else []
    paper, why = PUBLISHED.mean_over("ebm", kind, done)
    t.notes += [why] if why else []
    why_not = PUBLISHED.not_comparable("ebm", kind, jobs) if PUBLISHED.has("ebm", kind) else ""
    t.notes += [comparability_note("ebm", why_not)] if why_not else []
    label = f"**mean** ({len(done)} of {len(_categories(jobs))} categories completed)"
    t.rows.append([label, *(fmt_mean(cm, show_n) for cm in means), _fmt(paper), ""])
    return t


def _untrained_key(job: Job, metric: str) -> str:
    """The untrained reference's value of the job's headline: the same score or map."""
    name = job.scores.get(metric)
    return f"{metric}/{name}" if name else metric


def untrained_table(jobs: list[Job], show_n: bool | None = None) -> Table:
    """What training adds: the trained EBM beside the same network at its initial weights."""
    show_n = _multi_seed(jobs) if show_n is None else show_n
    head = ["category"]
    for name, _ in UNTRAINED_COLUMNS:
        head += [f"{name} trained", "untrained", "Δ"]
    t = Table("EBM: trained vs untrained reference (same network at its initial weights)", head)
    done = [j for j in jobs if j.done and j.untrained]
    for cat in _categories(done):
        row = [j for j in done if j.category == cat]
        cells = [cat]
        for _, key in UNTRAINED_COLUMNS:
            ours = stat(row, _headline_of(key))
            ref = stat(row, lambda j, key=key: j.untrained.get(_untrained_key(j, key)))
            cells += [fmt_stat(ours, show_n), fmt_stat(ref, show_n), _delta(ours.mean, ref.mean)]
        t.rows.append(cells)
    cells = [f"**mean** ({len(_categories(done))})"]
    for _, key in UNTRAINED_COLUMNS:
        ours = category_mean(done, _headline_of(key))
        ref = category_mean(done, lambda j, key=key: j.untrained.get(_untrained_key(j, key)))
        cells += [fmt_mean(ours, show_n), fmt_mean(ref, show_n), _delta(ours.mean, ref.mean)]
    t.rows.append(cells)
    return t


def _compact(value: str) -> str:
    """A sampled float with 4 significant digits (``7.909386398330882e-05`` -> ``7.909e-05``)."""
    try:
        return value if float(value).is_integer() else f"{float(value):.4g}"
    except ValueError:
        return value


def trials_table(sweep: Sweep) -> Table:
    """A hyperparameter search: every trial ranked by its objective, its parameters and test headlines."""
    keys = sorted({k for j in sweep.jobs for k in j.params})
    head = ["rank", "trial", f"objective ({sweep.objective or 'n/a'}, {sweep.direction})", *keys, "category",
            "image AUROC (test)", "pixel AUROC (test)", "status"]  # fmt: skip
    t = Table("Trials ranked by the objective", head)
    rank = 0
    for j in sweep.ranked_trials():
        has = j.objective is not None and not math.isnan(j.objective)
        rank += has
        objective = "n/a" if not has else f"{j.objective:.4f}"
        t.rows.append([str(rank) if has else "—", "" if j.trial is None else str(j.trial), objective,
                       *(_compact(j.params.get(k, "")) for k in keys), j.category, _fmt(j.headline.get("image_auroc")),
                       _fmt(j.headline.get("pixel_auroc")), _status([j], False)])  # fmt: skip
    if not sweep.objective:
        t.notes.append("no optimized_metric in the trials' resolved config: nothing to rank by")
    return t


def not_completed_table(jobs: list[Job]) -> Table:
    t = Table("Jobs not completed", ["setting", "model", "category", "seed", "status", "error", "folder"])
    for j in jobs:
        if not j.done:
            t.rows.append([j.setting, j.model, j.category, j.seed, j.status, j.error[:200].replace("|", "/"),
                           str(j.folder or "(never started)")])  # fmt: skip
    return t


def fit_only(model: str) -> bool:
    """Whether ``model`` is fitted without training steps (PatchCore, PaDiM); False for an unknown name."""
    return model in MODEL_CLASSES and model_class(model).FIT_ONLY


def setting_lines(jobs: list[Job]) -> list[str]:
    """Per model what was run: recipe, image size, training length, evaluation resolution, seeds."""
    out = []
    for m in models_of(jobs):
        sel = [j for j in jobs if j.model == m]
        cfg = next((j.config for j in sel if j.config), {})
        data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
        steps = trainer.get("max_steps")
        length = ("no training steps (fitted in one pass)" if fit_only(m) else
                  f"{steps} steps (trainer.max_steps)" if isinstance(steps, int) and steps >= 0 else
                  f"{trainer.get('max_epochs', '?')} epochs (trainer.max_epochs)")  # fmt: skip
        res = (cfg.get("eval") or {}).get("resolution", "?")
        seeds = ", ".join(dict.fromkeys(j.seed for j in sel if j.seed)) or "?"
        recipe = f"`{sel[0].recipe}`, " if sel[0].recipe else ""
        what = (f"image size {data.get('image_size', '?')}, {length}, eval resolution {res}" if cfg
                else "no completed job (settings unknown)")  # fmt: skip
        out.append(f"- {m}: {recipe}{what}; seeds {seeds}{validation_note(m, data, sel)}")
    return out


def validation_note(model: str, data: dict[str, Any], jobs: list[Job]) -> str:
    """The label-free validation kinds a model's jobs used, and a mark where it trains on one of them."""
    if not any(j.validation for j in jobs):
        return ""
    kinds = list(data.get("val_kinds") or ["spots_scratches"])
    note = f"; label-free validation on {', '.join(kinds)}"
    # what the runs recorded decides (an EBM with oe_weight > 0 trains on perlin_texture); older runs: the family
    recorded = [j.trains_on for j in jobs if j.trains_on is not None]
    trained = sorted({k for t in recorded for k in t}) if recorded else favoured(kinds, [model])[model]
    if trained:
        note += f" (**{model} trains on {', '.join(trained)}: its validation score is favoured**)"
    return note


def setting_tables(jobs: list[Job]) -> list[Table]:
    """Every table of one setting's block."""
    show_n = _multi_seed(jobs)
    tables = [metric_table(jobs, metric, title, show_n) for metric, title in METRICS
              if metric in ("image_auroc", "pixel_auroc") or any(metric in j.headline for j in jobs)]  # fmt: skip
    ebm = [j for j in jobs if j.model == "ebm"]
    if ebm:
        for kind, title in (
            ("image_auroc", "EBM image-score variants"),
            ("pixel_auroc", "EBM pixel-map variants"),
        ):
            extra = tuple(c for c in EBM_EXTRA[kind] if any(f"{kind}/{c}" in j.metrics for j in ebm))
            tables.append(variant_table(ebm, kind, EBM_VARIANTS[kind] + extra, title, show_n))
        if any(j.untrained for j in ebm):
            tables.append(untrained_table(ebm, show_n))
    return tables


def report_settings(sweep: Sweep) -> list[str]:
    """The settings whose blocks the report shows: all of them, or a search's best trial only."""
    if sweep.search:
        best = next((j for j in sweep.ranked_trials() if j.objective is not None), None)
        return [best.setting] if best else []
    return sweep.settings


def _counts(jobs: list[Job]) -> str:
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"


def _commit(git: dict[str, Any]) -> str:
    return (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")


def header_lines(sweep: Sweep) -> list[str]:
    """Jobs, command, commit, device and seeds of the sweep (one Markdown line each)."""
    what = "Trials" if sweep.search else "Jobs"
    asked = f" (n_trials={sweep.n_trials})" if sweep.search and sweep.n_trials is not None else ""
    lines = [f"{what}: {_counts(sweep.jobs)}{asked}"]
    if len(sweep.invocations) > 1:
        lines += [f"Command {i} of {len(sweep.invocations)} ({n} job{'s' * (n != 1)}): `{cmd}`"
                  for i, (cmd, n) in enumerate(sweep.invocations, start=1)]  # fmt: skip
    elif sweep.invocations or sweep.command:
        lines.append(f"Command: `{sweep.invocations[0][0] if sweep.invocations else sweep.command}`")
    commits = dict.fromkeys(_commit(j.git) for j in sweep.jobs if j.git)
    if commits:
        lines.append("Commit: " + ", ".join(commits))
    devices = dict.fromkeys(f"{j.device.get('type', '?')} ({j.device.get('name', '?')})" for j in sweep.jobs
                            if j.device)  # fmt: skip
    if devices:
        lines.append("Device: " + ", ".join(devices))
    if sweep.seeds and len(sweep.seeds) > 1:
        lines.append(f"Seeds: {', '.join(sweep.seeds)}. {STD_NOTE}")
    if sweep.search:
        lines.append(f"Hyperparameter search: objective `{sweep.objective}` ({sweep.direction}); the tables below "
                     "show the best trial, every trial is in the ranking and in report.csv.")  # fmt: skip
    return lines


def render_markdown(sweep: Sweep | list[Job], sweep_dir: Path | None = None) -> str:
    if not isinstance(sweep, Sweep):  # a list of jobs (older callers)
        sweep = Sweep(Path(sweep_dir or "."), list(sweep))
    out = [f"# ebmad sweep report: `{sweep.folder}`", ""]
    out += [line for h in header_lines(sweep) for line in (h, "")]
    if sweep.search:
        out += table_md(trials_table(sweep)) + [""]
    for setting in report_settings(sweep):
        sel = [j for j in sweep.jobs if j.setting == setting]
        out += [f"## Setting: `{setting}`", "", *setting_lines(sel), ""]
        for t in setting_tables(sel):
            out += table_md(t) + [""]
    bad = not_completed_table(sweep.jobs)
    if bad.rows:
        out += table_md(bad) + [""]
    out.append(PUBLISHED_NOTE)
    return "\n".join(out) + "\n"


# Kept for callers of the Markdown lines of one table.
def _metric_table(jobs: list[Job], metric: str, title: str) -> list[str]:
    return table_md(metric_table(jobs, metric, title))


def _variant_table(jobs: list[Job], kind: str, columns: tuple[str, ...], title: str) -> list[str]:
    return table_md(variant_table(jobs, kind, columns, title))


def _untrained_table(jobs: list[Job]) -> list[str]:
    return table_md(untrained_table(jobs))


# ----------------------------------------------------------------------------------------- CSV
HEADLINES = tuple(m for m, _ in METRICS)


def csv_columns(jobs: Sequence[Job]) -> tuple[list[str], list[str]]:
    """(all columns, the metric keys among them); every column name is unique."""
    keys = sorted({k for j in jobs for k, v in j.metrics.items() if isinstance(v, int | float)})
    cols = ["setting", "model", "category", "seed", "row", "status", "n", *(f"headline_{m}" for m in HEADLINES),
            "image_score", "pixel_map", *keys, *(f"paper_{m}" for m in HEADLINES), "paper_comparable", "objective",
            "trial",
            "folder", "error"]  # fmt: skip
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise ValueError(f"report.csv would repeat the columns {dup}")
    return cols, keys


def paper_comparable(model: str, jobs: list[Job]) -> str:
    """The CSV's ``paper_comparable``: "yes", "no: <why>" or "" (no published value of the model)."""
    whys = [PUBLISHED.not_comparable(model, m, jobs) for m in HEADLINES if PUBLISHED.has(model, m)]
    if not whys:
        return ""
    why = "; ".join(dict.fromkeys(w for w in whys if w))
    return f"no: {why}" if why else "yes"


def _num(v: float | None) -> str | float:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def write_csv(jobs: list[Job] | Sweep, path: Path) -> None:
    """Every job (row=run), then per (setting, model, category) and per (setting, model) over categories
    the aggregate rows: row=mean and, with several seeds, row=std (sample std), n = completed seeds."""
    sweep = jobs if isinstance(jobs, Sweep) else None
    jobs = sweep.jobs if sweep else jobs
    cols, keys = csv_columns(jobs)
    multi = _multi_seed(jobs)
    rows: list[dict[str, Any]] = []
    for j in jobs:
        rows.append({"setting": j.setting, "model": j.model, "category": j.category, "seed": j.seed, "row": "run",
                     "status": j.status, "n": int(j.done), **{f"headline_{m}": _num(j.headline.get(m)) for m in HEADLINES},
                     "image_score": j.scores.get("image_auroc", ""), "pixel_map": j.scores.get("pixel_auroc", ""),
                     **{k: _num(j.metrics.get(k)) for k in keys},
                     **{f"paper_{m}": _num(PUBLISHED.get(j.model, j.category, m)) for m in HEADLINES},
                     "paper_comparable": paper_comparable(j.model, [j]) if j.done else "", "objective": _num(j.objective), "trial": "" if j.trial is None else j.trial,
                     "folder": j.folder or "", "error": j.error})  # fmt: skip
    kinds = ("mean", "std") if multi else ("mean",)
    for setting in sorted({j.setting for j in jobs}):
        for model in models_of(j for j in jobs if j.setting == setting):
            sel = [j for j in jobs if j.setting == setting and j.model == model]
            base = {"setting": setting, "model": model, "seed": ""}
            for cat in _categories(sel):
                group = [j for j in sel if j.category == cat]
                stats = {m: stat(group, _headline_of(m)) for m in HEADLINES} | {
                    k: stat(group, _metric_of(k)) for k in keys
                }
                n = next(iter(stats.values())).n if stats else 0
                n = max((s.n for s in stats.values()), default=0)
                for kind in kinds:
                    rows.append({**base, "category": cat, "row": kind, "n": n, "status": _status(group, False, True),
                                 **{(f"headline_{k}" if k in HEADLINES else k): _num(getattr(s, kind)) for k, s in stats.items()},
                                 **{f"paper_{m}": _num(PUBLISHED.get(model, cat, m)) for m in HEADLINES},
                                 "paper_comparable": paper_comparable(model, group)})  # fmt: skip
            means = {m: category_mean(sel, _headline_of(m)) for m in HEADLINES} | {
                k: category_mean(sel, _metric_of(k)) for k in keys
            }
            papers = {m: PUBLISHED.mean_over(model, m, means[m].categories)[0] for m in HEADLINES}
            cm = means["image_auroc"]
            for kind in kinds:
                rows.append({**base, "category": "mean", "row": kind, "n": cm.n_seeds,
                             "status": f"{len(cm.categories)}/{cm.n_all} categories",
                             **{(f"headline_{k}" if k in HEADLINES else k): _num(getattr(c, kind)) for k, c in means.items()},
                             **{f"paper_{m}": _num(papers[m]) for m in HEADLINES},
                             "paper_comparable": paper_comparable(model, sel)})  # fmt: skip
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
