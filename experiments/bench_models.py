"""Benchmark: EBM, DRAEM and SSAE on real MVTec AD categories on the CPU; prints and records their metrics.

    python experiments/bench_models.py [--models ebm draem ssae] [--categories bottle pill]
                                       [--root ../shared/data/mvtec_ad] [--threads 2] [--quick]

Each (model, category) is one subprocess ``python -m ebmad.train model=<m> data=mvtec ... logger=csv
hydra.run.dir=logs/bench_models/<model>-<category>`` (the folder is emptied first, so every run trains
from scratch; its maps/, figures/, csv/ and results.json stay there). One line per run is printed (image
AUROC, pixel AUROC, AUPRO, pixel AP, train time, the EBM's untrained-reference pixel AUROC, device,
command) and a row is appended to experiments/results/bench_models.csv.

Settings (``SETTINGS`` below), for 2 CPU cores (OMP_NUM_THREADS=2, OMP_WAIT_POLICY=PASSIVE); measured
per-step times on an idle 2-core AMD EPYC: DRAEM 0.73 s, SSAE 0.34 s; EBM ~1 s. About 45 minutes in all.

- EBM (32x32, its own size): the sanity reference ``experiment=sanity32``: K=40 SGLD steps (step 1,
  noise 0.01), data noise 0.03, Adam 1e-4, batch 32, 400 steps (~7 min). 64x64 costs ~4x per step.
- DRAEM (64x64): recon/disc widths 32/16 (official 128/64), batch 8, Adam 1e-4 with the official schedule
  (x0.2 at 80% and 90% of the steps), 800 steps (~10 min). At 400 steps (constant lr) bottle reached only
  pixel AUROC 0.80: the discriminator's anomaly probability is still capped near 0.5 this early (it
  codes "anomalous" as "all last-layer features off", so the cap is sigmoid of the last conv's bias
  difference, which Adam at 1e-4 moves slowly); lr 5e-4 did not help (image AUROC 0.36 at 400 steps).
- SSAE (64x64): widths [16, 32, 64], 2 SDC blocks with dilations [1, 2, 4, 8], Adam 1e-3, anomaly map
  smoothed with sigma 1 (the paper's 4 at 256x256), batch 16, 1000 steps (~6 min); bottle pilots: pixel
  AUROC 0.72 at 150 steps, 0.84 at 400.

All runs use ``eval.resolution=native``: every anomaly map is upsampled to the masks' stored size
(256x256 here) before the pixel metrics, so models trained at different sizes (EBM 32, DRAEM/SSAE 64)
are compared on the same pixels. ``pixel_auroc_model_res`` is the pixel AUROC at the model's own size,
the resolution of the EBM's untrained reference (``untrained_pixel_auroc``), which is the same
architecture at its initial weights: a trained EBM should beat it.
``--quick``: a few steps per model (a smoke test of the script, not a benchmark; nothing is appended to the CSV).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ebmad.run.metadata import append_csv_rows, cpu_name

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = ROOT / "experiments" / "results" / "bench_models.csv"
LOG_DIR = ROOT / "logs" / "bench_models"
MODELS = ("ebm", "draem", "ssae")
CATEGORIES = ("bottle", "pill")
COMMON = ["data=mvtec", "eval.resolution=native"]
SIZE = 64  # data.image_size of DRAEM and SSAE
SETTINGS: dict[str, list[str]] = {
    "ebm": ["experiment=sanity32"],
    "draem": [f"data.image_size={SIZE}", "data.batch_size=8", "model.recon_base_width=32",
              "model.disc_base_width=16", "model.lr=1e-4", "model.schedule=code", "trainer.max_steps=800"],
    "ssae": [f"data.image_size={SIZE}", "data.batch_size=16", "model.widths=[16,32,64]", "model.sdc_blocks=2",
             "model.dilations=[1,2,4,8]", "model.smooth_sigma=1.0", "model.lr=1e-3", "trainer.max_steps=1000"],
}  # fmt: skip
QUICK: dict[str, list[str]] = {  # appended to SETTINGS by --quick
    "ebm": ["trainer.max_steps=5", "model.sgld_steps=5"],
    "draem": ["trainer.max_steps=5"],
    "ssae": ["trainer.max_steps=5"],
}
FIELDS = ["date", "commit", "device", "torch", "model", "category", "settings", "image_auroc", "pixel_auroc",
          "aupro", "pixel_ap", "untrained_pixel_auroc", "train_s", "command", "pixel_auroc_model_res"]  # fmt: skip


def device_line(dev: dict[str, Any]) -> str:
    if dev.get("type") == "cuda":
        return f"cuda: {dev.get('name')} x{dev.get('count', 1)}"
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores, {dev.get('threads')} threads"


def overrides(model: str, category: str, root: str, quick: bool) -> list[str]:
    extra = QUICK[model] if quick else []
    return [
        f"model={model}",
        *COMMON,
        f"data.root={root}",
        f"data.category={category}",
        *SETTINGS[model],
        *extra,
    ]


def run_one(model: str, category: str, root: str, quick: bool, threads: int) -> dict[str, Any] | None:
    """Train and test one (model, category) in a fresh folder; the CSV row, or None when the run failed."""
    out = LOG_DIR / ("quick" if quick else "") / f"{model}-{category}"
    if out.exists():
        shutil.rmtree(out)
    args = [
        "-m",
        "ebmad.train",
        *overrides(model, category, root, quick),
        "logger=csv",
        f"hydra.run.dir={out}",
    ]
    # PASSIVE: idle OpenMP threads sleep instead of spinning; with spinning, 2 threads on 2 cores shared
    # with any other busy process ran ~8x slower than 1 thread (measured here)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    command = f"OMP_NUM_THREADS={threads} OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} python {shlex.join(args)}"
    print(f"\n=== {model} / {category}: {command}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    results_file = out / "results.json"
    res = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if proc.returncode != 0 or res.get("status") != "completed":
        print(f"FAILED {model} {category} (exit {proc.returncode}, status {res.get('status')}): "
              f"{res.get('error', 'see the log above')}", flush=True)  # fmt: skip
        return None
    m = res["metrics"]
    model_res = m.get(f"pixel_auroc/{res['pixel_map']}")
    ref = (res.get("reference") or {}).get("untrained") or {}
    untrained = ref.get(f"pixel_auroc/{res['pixel_map']}", ref.get("pixel_auroc"))
    dev = res["device"]
    git = res.get("git") or {}
    commit = (git.get("commit") or "")[:10] + ("+dirty" if git.get("dirty") else "")
    fit = res["timings_s"].get("fit", float("nan"))
    fmt = lambda v: "" if v is None else round(float(v), 4)  # noqa: E731
    print(f"RESULT model={model} category={category} image_auroc={res['image_auroc']:.4f} "
          f"pixel_auroc={res['pixel_auroc']:.4f} aupro={res['aupro']:.4f} pixel_ap={res['pixel_ap']:.4f} "
          f"pixel_auroc_model_res={model_res:.4f} untrained_pixel_auroc={fmt(untrained)} train_s={fit:.0f} "
          f"wall_s={wall:.0f} device='{device_line(dev)}' torch={dev['torch']}", flush=True)  # fmt: skip
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "device": device_line(dev), "torch": dev["torch"], "model": model, "category": category,
            "settings": " ".join(SETTINGS[model] + (QUICK[model] if quick else [])),
            "image_auroc": fmt(res["image_auroc"]), "pixel_auroc": fmt(res["pixel_auroc"]), "aupro": fmt(res["aupro"]),
            "pixel_ap": fmt(res["pixel_ap"]), "untrained_pixel_auroc": fmt(untrained), "train_s": round(fit, 1),
            "command": command, "pixel_auroc_model_res": fmt(model_res)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"),
                    help="MVTec AD root holding one folder per category (default: %(default)s)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (default: 2)")
    ap.add_argument(
        "--quick", action="store_true", help="a few steps per model: a smoke test, not a benchmark"
    )
    a = ap.parse_args()
    root = Path(a.root).resolve()
    missing = [c for c in a.categories if not (root / c / "train" / "good").is_dir()]
    if missing:
        print(f"MVTec AD data not found: {', '.join(str(root / c / 'train' / 'good') for c in missing)} "
              "missing; pass --root <folder holding the category folders>", file=sys.stderr)  # fmt: skip
        return 2
    rows = []
    for category in a.categories:
        for model in a.models:
            row = run_one(model, category, str(root), a.quick, a.threads)
            if row is not None:
                rows.append(row)
                if not a.quick:  # smoke-test numbers stay out of the results table
                    append_csv_rows(CSV_PATH, FIELDS, [row])
    print(f"\n{'model':6s} {'category':9s} {'image':>6s} {'pixel':>6s} {'AUPRO':>6s} {'pixAP':>6s} "
          f"{'pix@m':>6s} {'untr.':>6s} {'train_s':>7s}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:6s} {r['category']:9s} {r['image_auroc']:6.3f} {r['pixel_auroc']:6.3f} {r['aupro']:6.3f} "
              f"{r['pixel_ap']:6.3f} {r['pixel_auroc_model_res']:6.3f} {str(r['untrained_pixel_auroc'])[:6]:>6s} "
              f"{r['train_s']:7.0f}")  # fmt: skip
    if rows:
        where = "not recorded (--quick)" if a.quick else f"rows appended to {CSV_PATH}"
        print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}; {where}")
    return 0 if len(rows) == len(a.models) * len(a.categories) else 1


if __name__ == "__main__":
    sys.exit(main())
