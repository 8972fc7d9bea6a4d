"""SSAE identity-anchored noise study: does ``model.identity_noise_std`` help, chosen without test labels?

    python experiments/study_ssae.py [--categories bottle pill] [--seeds 0 1 2] [--stds 0 0.03 0.1]
        [--steps 150] [--plan staged|full] [--root ../shared/data/mvtec_ad] [--threads 1]
    python experiments/study_ssae.py --summary

Runs: ``recipe=ssae_cpu`` (64x64, widths 16-32-64, 2 SDC blocks, lr 1e-3) shortened to ``--steps``
(the recipe's 1000 steps do not fit the study's CPU budget), with ``data.val_fraction=0.1`` and
``data.val_kinds=[perlin_patch,color]`` (label-free validation on kinds SSAE does not train on; it trains on
``warp``-like elastic fills), tested at native resolution; one ``python -m ebmad.train`` at a time, into
``logs/study_ssae/<name>``. A run already in the CSV (same name and steps) is not run again.

Plans: ``full`` runs every (category, seed, std). ``staged`` (the default, for a small CPU budget) runs the
first seed at every std, then the other seeds at std 0 and at the nonzero std with the best mean validation
score over the categories. Selection (printed, never by test AUROC): the std with the best mean
``validation/score`` over categories and seeds; it becomes the recipe default only if it is nonzero.

Rows (one per run) go to ``experiments/results/ssae_study.csv``; ``--summary`` prints mean +- sd over seeds
per category and the bottle+pill mean of the per-category means, beside the selection.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ebmad.run.metadata import append_csv_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_fidelity import _run, device_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = ROOT / "experiments" / "results" / "ssae_study.csv"
LOG_DIR = ROOT / "logs" / "study_ssae"
VAL_KINDS = ("perlin_patch", "color")
SETTINGS = ["recipe=ssae_cpu", "data=mvtec", "data.val_fraction=0.1", f"data.val_kinds=[{','.join(VAL_KINDS)}]",
            "eval.resolution=native", "eval.figures=false", "logger=csv", "resume=false"]  # fmt: skip
METRICS = ("validation_score", *(f"validation_{k}" for k in VAL_KINDS), "image_auroc", "pixel_auroc", "aupro")
FIELDS = ["date", "commit", "device", "torch", "run", "category", "seed", "std", "steps", "settings",
          *METRICS, "train_s", "command"]  # fmt: skip


def run_name(category: str, seed: int, std: float, steps: int) -> str:
    return f"{category}-std{std:g}-s{seed}-{steps}st"


def read_rows(path: Path = CSV_PATH) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run_one(category: str, seed: int, std: float, a: argparse.Namespace) -> dict[str, Any] | None:
    """Train, validate and test one run; its CSV row, or None when it failed."""
    name = run_name(category, seed, std, a.steps)
    out = LOG_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    args = ["-m", "ebmad.train", *SETTINGS, f"data.root={a.root}", f"data.category={category}", f"seed={seed}",
            f"model.identity_noise_std={std:g}", f"trainer.max_steps={a.steps}", f"hydra.run.dir={out}"]  # fmt: skip
    print(f"=== {name}", flush=True)
    rc, command = _run(args, a.threads, out / "stdout.log")
    results = out / "results.json"
    res = json.loads(results.read_text()) if results.is_file() else {}
    if rc != 0 or res.get("status") != "completed":
        print(f"FAILED {name} (exit {rc}, status {res.get('status')}): see {out / 'stdout.log'}", flush=True)
        return None
    val = res.get("validation") or {}
    git = res.get("git") or {}
    fmt = lambda v: "" if v is None else round(float(v), 4)  # noqa: E731
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": (git.get("commit") or "")[:10] + ("+dirty" if git.get("dirty") else ""),
            "device": device_line(res["device"]), "torch": res["device"]["torch"], "run": name,
            "category": category, "seed": seed, "std": f"{std:g}", "steps": a.steps,
            "settings": f"ssae_cpu shortened to {a.steps} steps (recipe: 1000) for the CPU budget; 64 px; "
                        f"val_fraction 0.1, val_kinds {'+'.join(VAL_KINDS)}; native-resolution test",
            "validation_score": fmt(val.get("validation/score")),
            **{f"validation_{k}": fmt(val.get(f"validation/{k}/score")) for k in VAL_KINDS},
            "image_auroc": fmt(res["image_auroc"]), "pixel_auroc": fmt(res["pixel_auroc"]),
            "aupro": fmt(res["aupro"]), "train_s": round(res["timings_s"].get("fit", float("nan")), 1),
            "command": command}  # fmt: skip


def ensure(category: str, seed: int, std: float, a: argparse.Namespace) -> None:
    """Run (category, seed, std) unless the CSV already has it; append its row."""
    done = {r["run"] for r in read_rows()}
    if run_name(category, seed, std, a.steps) in done:
        return
    row = run_one(category, seed, std, a)
    if row is not None:
        append_csv_rows(CSV_PATH, FIELDS, [row])
        print(f"RESULT {row['run']}: validation {row['validation_score']} image {row['image_auroc']} "
              f"pixel {row['pixel_auroc']} aupro {row['aupro']} train_s {row['train_s']}", flush=True)  # fmt: skip


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def grouped(
    rows: list[dict[str, str]], steps: int | None = None
) -> dict[tuple[str, str], list[dict[str, str]]]:
    """Rows by (std, category), at ``steps`` (default: the most frequent step count)."""
    if steps is None and rows:
        steps = int(statistics.mode(int(r["steps"]) for r in rows))
    out: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if int(r["steps"]) == steps:
            out[(r["std"], r["category"])].append(r)
    return out


def validation_means(
    groups: dict[tuple[str, str], list[dict[str, str]]], seeds: set[str] | None = None
) -> dict[str, float]:
    """Per std: the mean over categories of the mean validation score over seeds (only ``seeds`` if given)."""
    per_std: dict[str, list[float]] = defaultdict(list)
    for (std, _), rs in groups.items():
        vals = [float(r["validation_score"]) for r in rs if seeds is None or r["seed"] in seeds]
        if vals:
            per_std[std].append(statistics.mean(vals))
    return {std: statistics.mean(v) for std, v in per_std.items()}


def summary(steps: int | None = None) -> int:
    """Print mean ± sd over seeds per (std, category) and the bottle+pill mean; the validation's choice."""
    groups = grouped(read_rows(), steps)
    if not groups:
        print(f"no rows in {CSV_PATH}")
        return 1
    cols = ("validation_score", "image_auroc", "pixel_auroc", "aupro")
    print(f"| std | category | seeds | {' | '.join(cols)} | train_s |")
    print("| --- | --- | --- |" + " --- |" * (len(cols) + 1))
    stds = sorted({s for s, _ in groups}, key=float)
    cats = sorted({c for _, c in groups})
    for std in stds:
        for cat in cats:
            rs = groups.get((std, cat), [])
            cells = [mean_sd([float(r[c]) for r in rs]) for c in cols]
            seeds = ",".join(sorted(r["seed"] for r in rs))
            train_s = statistics.mean(float(r["train_s"]) for r in rs) if rs else float("nan")
            print(f"| {std} | {cat} | {seeds} | {' | '.join(cells)} | {train_s:.0f} |")
        means = [statistics.mean(float(r[c]) for r in groups[(std, cat)]) if groups.get((std, cat)) else None
                 for c in cols for cat in cats]  # fmt: skip
        per_col = [means[i * len(cats) : (i + 1) * len(cats)] for i in range(len(cols))]
        cells = [f"{statistics.mean(v):.3f}" if None not in v else "-" for v in per_col]
        print(f"| {std} | **mean of {'+'.join(cats)}** | | {' | '.join(cells)} | |")
    val = validation_means(groups)
    best = max(val, key=val.get)
    print("\nselection by mean validation score (categories, then seeds): "
          + ", ".join(f"std {s}: {v:.4f}" for s, v in sorted(val.items(), key=lambda kv: float(kv[0])))
          + f" -> std {best}")  # fmt: skip
    rows = read_rows()
    if rows:
        print(f"device: {rows[-1]['device']}, torch {rows[-1]['torch']}; rows in {CSV_PATH}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=["bottle", "pill"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--stds", nargs="+", type=float, default=[0.0, 0.03, 0.1])
    ap.add_argument(
        "--steps", type=int, default=150, help="trainer.max_steps (recipe: 1000; default %(default)s)"
    )
    ap.add_argument("--plan", choices=("staged", "full"), default="staged")
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"))
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (default: 1)")
    ap.add_argument("--summary", action="store_true", help="print the table from the CSV and exit")
    a = ap.parse_args()
    if a.summary:
        return summary()
    torch.set_num_threads(a.threads)
    a.root = str(Path(a.root).resolve())
    missing = [c for c in a.categories if not (Path(a.root) / c / "train" / "good").is_dir()]
    if missing:
        print(f"MVTec AD categories not found under {a.root}: {missing}; pass --root", file=sys.stderr)
        return 2
    first, rest = a.seeds[0], a.seeds[1:]
    stds = list(a.stds)
    for category in a.categories:
        for std in stds:
            ensure(category, first, std, a)
    if a.plan == "staged":
        groups = grouped(read_rows(), a.steps)
        val = validation_means(groups, seeds={str(first)})
        nonzero = {s: v for s, v in val.items() if float(s) != 0 and float(s) in stds}
        stds = [0.0] + ([float(max(nonzero, key=nonzero.get))] if nonzero else [])
        print(f"staged: seed {first} validation {val}; other seeds at std {stds}", flush=True)
    for seed in rest:
        for category in a.categories:
            for std in stds:
                ensure(category, seed, std, a)
    return summary(a.steps)


if __name__ == "__main__":
    sys.exit(main())
