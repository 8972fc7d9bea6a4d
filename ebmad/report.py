"""Turn a finished sweep folder into a comparison report: Markdown, CSV and a self-contained HTML page.

    python -m ebmad.report logs/compare/sweeps/default [--out DIR] [--format html|md|csv ...]

Per metric (image AUROC, pixel AUROC, pixel AP, AUPRO when recorded) one table with a row per category and
a column per model (named with its headline score), the published number of each model beside it where one
exists (``ebmad/reference/published.csv``) and the difference, and the mean over categories, compared with
the published mean over the same categories only. The difference is printed only where the runs match the
published protocol (data, resolution, training length); elsewhere the published value stands as context,
"not comparable: <why>". Every table says how many runs a value summarizes ("single run (n = 1)"). ``seed`` is a replicate: every cell is the mean ± sample
standard deviation (ddof=1) over the completed seeds, with n. The EBM's score variants and its untrained
reference get tables of their own. One block per hyperparameter setting; for a hyperparameter search
(Optuna) the trials ranked by their objective instead. Jobs that failed, were interrupted, never finished or
never started are listed with that status, never dropped. ``report.html`` adds bar charts, ROC/PRO curves
and anomaly maps side by side (:mod:`ebmad.reporting.html`); the tables are built in :mod:`ebmad.reporting.tables`; with the W&B logger the summary is also logged
as a W&B table (:mod:`ebmad.reporting.wandb_table`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ebmad.reporting.sweeps import (
    PUBLISHED,
    PUBLISHED_CSV,
    Job,
    collect_jobs,
    expected_categories,
    load_published,
    load_sweep,
    record_invocation,
)
from ebmad.reporting.tables import FORMATS, Table, render_markdown, write_csv
from ebmad.run import quiet

__all__ = ["PUBLISHED", "PUBLISHED_CSV", "Job", "SweepSummary", "Table", "collect_jobs", "expected_categories",
           "load_published", "load_sweep", "main", "render_markdown", "write_csv", "write_report"]  # fmt: skip

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- entry points
def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, categories: list[str] | None = None,
                 formats: Sequence[str] = FORMATS, wandb: bool = True) -> tuple[Path, Path, list[Job]]:  # fmt: skip
    """Write report.md, report.csv and report.html (``formats``); returns the .md/.csv paths and the jobs.

    With ``wandb`` the summary is also logged as a W&B table when the sweep's runs used the W&B logger."""
    paths = write_reports(sweep_dir, out_dir, categories, formats, wandb)
    sweep = paths.pop("sweep")
    out = Path(out_dir or sweep_dir)
    return paths.get("md", out / "report.md"), paths.get("csv", out / "report.csv"), sweep.jobs


def write_reports(sweep_dir: str | Path, out_dir: str | Path | None = None, categories: list[str] | None = None,
                  formats: Sequence[str] = FORMATS, wandb: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write the report in ``formats``; returns {format: path} and {"sweep": the Sweep}."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown report format(s) {bad}; choose from {list(FORMATS)}")
    sweep = load_sweep(sweep_dir, categories)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"sweep": sweep}
    if "md" in formats:
        paths["md"] = out / "report.md"
        paths["md"].write_text(render_markdown(sweep))
    if "csv" in formats:
        paths["csv"] = out / "report.csv"
        write_csv(sweep, paths["csv"])
    if "html" in formats:
        from ebmad.reporting.html import write_html  # matplotlib: only for the HTML report

        paths["html"] = write_html(sweep, out / "report.html")
    if wandb:
        from ebmad.reporting.wandb_table import log_summary

        log_summary(sweep)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", help="a multirun folder, e.g. logs/paper/sweeps/default")
    ap.add_argument("--out", help="where to write the report files (default: the sweep folder)")
    ap.add_argument(
        "--categories", nargs="+", help="categories expected (default: from the sweep's multirun.yaml)"
    )
    ap.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), dest="formats",
                    help="which files to write (default: all)")  # fmt: skip
    ap.add_argument("--no-wandb", action="store_true", help="do not log the summary to W&B")
    a = ap.parse_args(argv)
    quiet.install()  # library warnings that do not apply (ebmad.run.quiet)
    paths = write_reports(a.sweep_dir, a.out, a.categories, a.formats, wandb=not a.no_wandb)
    if "md" in paths:
        print(paths["md"].read_text())
    print("wrote " + ", ".join(str(paths[f]) for f in FORMATS if f in paths))
    return 0


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):
    """Hydra callback: records each multirun's command (``invocations.jsonl``); after a multirun, writes the
    report into the sweep folder and prints it."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        from ebmad.run.jobs import order_sweep_jobs

        order_sweep_jobs()  # here: Hydra has loaded its launcher plugin by now (it re-executes plugin modules)
        hydra = OmegaConf.to_container(config.hydra, resolve=False)
        record_invocation(Path(config.hydra.sweep.dir), hydra)  # type: ignore[arg-type]

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        try:
            paths = write_reports(sweep_dir)
        except Exception:  # the tables matter most: keep them when the figures or W&B fail
            log.exception(
                "could not write the HTML report of %s; writing report.md and report.csv only", sweep_dir
            )
            paths = write_reports(sweep_dir, formats=("md", "csv"), wandb=False)
        jobs = paths["sweep"].jobs
        print(paths["md"].read_text(), flush=True)
        if "html" in paths:
            print(f"HTML report: {paths['html']}", flush=True)
        bad = [j for j in jobs if not j.done]
        if bad:
            log.warning("%d of %d jobs not completed: %s", len(bad), len(jobs),
                        ", ".join(f"{j.category}[{j.setting}]={j.status}" for j in bad))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
