"""The sweep summary as a W&B table, logged under the sweep's group (offline unless the runs were online).

Only when the sweep's runs used the W&B logger (``logger.wandb`` in their resolved config); a failure to
log is a warning, never a failed report.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ebmad.reporting.sweeps import PUBLISHED, Sweep, category_mean, models_of, stat
from ebmad.reporting.tables import HEADLINES, _categories, _headline_of, report_settings

log = logging.getLogger(__name__)
COLUMNS = ["setting", "model", "category", "metric", "mean", "std", "n", "published", "delta", "status",
           "comparable"]  # fmt: skip


def summary_rows(sweep: Sweep) -> list[list[Any]]:
    """One row per (setting, model, category or "mean", headline metric): mean, sample std, n, published, Δ."""
    rows: list[list[Any]] = []
    for setting in report_settings(sweep) if sweep.search else sweep.settings:
        sel = [j for j in sweep.jobs if j.setting == setting]
        for model in models_of(sel):
            jobs = [j for j in sel if j.model == model]
            for metric in HEADLINES:
                if not any(metric in j.headline for j in jobs):
                    continue
                why = PUBLISHED.not_comparable(model, metric, jobs)  # "": comparable (or nothing published)
                note = f"no: {why}" if why else ("yes" if PUBLISHED.has(model, metric) else "")
                for cat in _categories(jobs):
                    group = [j for j in jobs if j.category == cat]
                    s = stat(group, _headline_of(metric))
                    paper = PUBLISHED.get(model, cat, metric)
                    done = sum(j.done for j in group)
                    rows.append([setting, model, cat, metric, s.mean, s.std, s.n, paper,
                                 None if s.mean is None or paper is None or why else s.mean - paper,
                                 f"{done}/{len(group)} completed", note])  # fmt: skip
                cm = category_mean(jobs, _headline_of(metric))
                paper = PUBLISHED.mean_over(model, metric, cm.categories)[0]
                rows.append([setting, model, "mean", metric, cm.mean, cm.std, cm.n_seeds, paper,
                             None if cm.mean is None or paper is None or why else cm.mean - paper,
                             f"{len(cm.categories)}/{cm.n_all} categories", note])  # fmt: skip
    return [[None if isinstance(v, float) and math.isnan(v) else v for v in r] for r in rows]


def wandb_settings(sweep: Sweep) -> dict[str, Any] | None:
    """The W&B logger settings of the sweep's runs (None when they did not use W&B)."""
    for j in sweep.jobs:
        wb = ((j.config.get("logger") or {}).get("wandb")) if j.config else None
        if wb:
            return wb
    return None


def log_summary(sweep: Sweep, settings: dict[str, Any] | None = None) -> Path | None:
    """Log the summary table to W&B under the sweep's group; returns the run folder (None: not logged)."""
    settings = settings or wandb_settings(sweep)
    if not settings:
        return None
    try:
        import wandb

        run = wandb.init(project=settings.get("project") or "ebmad", group=settings.get("group"),
                         job_type="report", name=f"{settings.get('group') or sweep.folder.name}-report",
                         dir=str(sweep.folder), mode="offline" if settings.get("offline", True) else "online",
                         config={"sweep_dir": str(sweep.folder), "command": sweep.command}, reinit="create_new")  # fmt: skip
        try:
            run.log({"report/summary": wandb.Table(columns=COLUMNS, data=summary_rows(sweep))})
            folder = Path(run.dir).parent
        finally:
            run.finish()
        return folder
    except Exception as exc:  # the report must not fail because W&B does
        log.warning("could not log the report to W&B: %s", exc)
        return None
