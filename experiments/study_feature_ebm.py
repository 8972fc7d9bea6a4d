"""Study: the feature-space EBM on real MVTec AD categories, beside its prior alone; ablation and seeds.

    python experiments/study_feature_ebm.py --plan ablation   # pill, seed 0: prior x negatives
    python experiments/study_feature_ebm.py --plan seeds --prior knn --negatives noise  # bottle+pill, seeds 0-2
    python experiments/study_feature_ebm.py --summary          # tables from the CSV

Each run is ``python -m ebmad.train recipe=feature_ebm_cpu data=mvtec ...`` with the label-free validation
(``data.val_fraction=0.1``, kinds ``warp`` + ``color``: none of them is what the feature EBM trains on) and the
untrained reference (the prior alone, e_theta = 0). A configuration is chosen by its validation score (mean
over the runs), never by test AUROC. Rows go to experiments/results/feature_ebm_study.csv with device and
command; the test metrics of the energy map (headline), the gradient map (a_std_l2, when computed) and the
prior alone stand side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ebmad.run.metadata import append_csv_rows, cpu_name, git_commit

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = ROOT / "experiments" / "results" / "feature_ebm_study.csv"
LOG_DIR = ROOT / "logs" / "study_feature_ebm"
DATA_ROOT = ROOT.parent / "shared" / "data" / "mvtec_ad"
FIELDS = ["date", "commit", "device", "torch", "category", "seed", "prior", "negatives", "steps", "settings",
          "validation_score", "image_auroc", "pixel_auroc", "aupro", "prior_image_auroc", "prior_pixel_auroc",
          "prior_aupro", "grad_image_auroc", "grad_pixel_auroc", "prior_grad_pixel_auroc", "fit_s", "total_s",
          "load", "command"]  # fmt: skip


def run_one(
    category: str, seed: int, prior: str, negatives: str, extra: list[str], threads: int
) -> dict[str, Any]:
    """Train + test one configuration in a subprocess; its CSV row."""
    name = f"{prior}-{negatives}-{category}-s{seed}" + (
        "-" + "-".join(e.split("=")[0] for e in extra) if extra else ""
    )
    out = LOG_DIR / name
    shutil.rmtree(out, ignore_errors=True)
    args = ["recipe=feature_ebm_cpu", "data=mvtec", f"data.root={DATA_ROOT}", f"data.category={category}",
            f"seed={seed}", f"model.prior={prior}", f"model.negatives={negatives}", "data.val_fraction=0.1",
            "data.val_kinds=[warp,color]", "logger=csv", "eval.figures=false", *extra,
            f"hydra.run.dir={out}"]  # fmt: skip
    cmd = [sys.executable, "-m", "ebmad.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    res = json.loads((out / "results.json").read_text())
    m, ref = res["metrics"], res.get("reference", {}).get("untrained", {})
    git = git_commit()
    import torch

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": (git.get("commit") or "")[:10] + ("+dirty" if git.get("dirty") else ""),
        "device": f"cpu: {cpu_name()}, {os.cpu_count()} cores, {threads} threads", "torch": torch.__version__,
        "category": category, "seed": seed, "prior": prior, "negatives": negatives,
        "steps": res.get("global_step"), "settings": " ".join(extra),
        "validation_score": res.get("validation", {}).get("validation/score"),
        "image_auroc": m.get("image_auroc/E_max"), "pixel_auroc": m.get("pixel_auroc/e_map"), "aupro": m.get("aupro"),
        "prior_image_auroc": ref.get("image_auroc/E_max"), "prior_pixel_auroc": ref.get("pixel_auroc/e_map"),
        "prior_aupro": ref.get("aupro"), "grad_image_auroc": m.get("image_auroc/A_std_l2"),
        "grad_pixel_auroc": m.get("pixel_auroc/a_std_l2"), "prior_grad_pixel_auroc": ref.get("pixel_auroc/a_std_l2"),
        "fit_s": round(res.get("timings_s", {}).get("fit", float("nan")), 1), "total_s": round(total, 1),
        "load": os.getloadavg()[0], "command": shlex.join(["OMP_NUM_THREADS=" + str(threads), "python", "-m", "ebmad.train", *args]),
    }  # fmt: skip


def summary(path: Path = CSV_PATH) -> None:
    """Mean ± sd over seeds per (prior, negatives, settings, category), trained vs the prior alone."""
    import csv

    rows = list(csv.DictReader(path.open()))
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["prior"], r["negatives"], r["settings"], r["category"]), []).append(r)

    def ms(vals: list[str]) -> str:
        v = [float(x) for x in vals if x not in ("", "None")]
        if not v:
            return "-"
        return f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else " (n=1)")

    print("| prior | negatives | settings | category | n | validation | image AUROC (prior alone) | "
          "pixel AUROC (prior alone) | AUPRO (prior alone) | gradient map pixel (prior alone) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")

    def col(rs: list[dict[str, str]], k: str, ref: str) -> str:
        return f"{ms([r[k] for r in rs])} ({ms([r[ref] for r in rs])})"

    for (prior, neg, settings, cat), rs in sorted(groups.items()):
        print(f"| {prior} | {neg} | {settings or '-'} | {cat} | {len(rs)} | {ms([r['validation_score'] for r in rs])} | "
              f"{col(rs, 'image_auroc', 'prior_image_auroc')} | {col(rs, 'pixel_auroc', 'prior_pixel_auroc')} | "
              f"{col(rs, 'aupro', 'prior_aupro')} | {col(rs, 'grad_pixel_auroc', 'prior_grad_pixel_auroc')} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=["ablation", "seeds", "one"], default="one")
    p.add_argument("--categories", nargs="+", default=["bottle", "pill"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--prior", default="knn")
    p.add_argument("--negatives", default="noise")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. model.gradient_maps=false")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--summary", action="store_true")
    a = p.parse_args()
    if a.summary:
        summary()
        return
    if a.plan == "ablation":
        jobs = [
            ("pill", 0, prior, neg)
            for prior in ("knn", "gaussian")
            for neg in ("noise", "stats", "synthetic")
        ]
    elif a.plan == "seeds":
        jobs = [(c, s, a.prior, a.negatives) for s in a.seeds for c in a.categories]
    else:
        jobs = [(c, a.seeds[0], a.prior, a.negatives) for c in a.categories]
    for cat, seed, prior, neg in jobs:
        row = run_one(cat, seed, prior, neg, a.extra, a.threads)
        append_csv_rows(CSV_PATH, FIELDS, [row])
        print({k: row[k] for k in FIELDS if k not in ("command", "date", "torch")}, flush=True)


if __name__ == "__main__":
    main()
