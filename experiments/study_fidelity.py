"""Fidelity study: EBM recipes x categories x seeds, a recipe chosen by the label-free validation score.

    python experiments/study_fidelity.py [--recipes paper_k10 persistent plus] [--categories bottle pill]
        [--seeds 0 1 2] [--size 64] [--steps 100] [--root ../shared/data/mvtec_ad] [--threads 1] [--jobs 2]
        [--quick]

Every (recipe, category, seed) is one ``python -m ebmad.train`` run (``model=ebm data=mvtec``) with
``data.val_fraction=0.1``: a tenth of the training images is held out and scored as is and with planted
synthetic defects (``ebmad/data/corruption.py``), which gives validation image and pixel AUROCs for every
score without any test label. The same checkpoint is then scored on test sets whose defect-free images are
darkened / brightened (``data.test_good_gain`` 0.92 and 1.08, the illumination check). One CSV row per run
goes to ``experiments/results/fidelity_study.csv`` with the command and the device.

Selection (label-free): for each recipe, and each (image score, pixel map) it computes, the validation
score = mean over runs of (validation image AUROC + validation pixel AUROC) / 2. The recipe and scores with
the highest validation score are chosen; the summary prints their test numbers beside it, beside the
untrained reference (the same network at its initial weights, scored the same way) and the paper.

Recipes (``RECIPES``): the paper's non-persistent chains from uniform noise at K steps (``paper_k10``; the
paper uses K=100), persistent chains (a replay buffer of 256, 5% restarted from uniform noise) with the spike
recovery policy restore + lower_lr + reset_buffer (``persistent``), and ``plus`` (= ``experiment=ebm_plus``):
``persistent`` with chains restarted from the data plus noise, L2 energy regularization (alpha 0.1),
per-image input normalization, brightness/flip augmentation of the positives and an EMA of the weights.
All compute the multi-scale map (``model.map_sigmas``) and the patch energy as extra scores, and log
spikes (``spikes.csv``; detection starts after 50 steps).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ebmad.utils import append_csv_rows, cpu_name

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = ROOT / "experiments" / "results" / "fidelity_study.csv"
LOG_DIR = ROOT / "logs" / "study_fidelity"
PAPER_CSV = ROOT / "ebmad" / "reference" / "genc2021_pixel_auroc.csv"
GAINS = (0.92, 1.08)
SCORING = ["model.map_sigmas=[0,1,2,4]", "model.patch_energy=true", "callbacks.spikes.warmup=50"]
RECOVER = ["callbacks.spikes.policy=[restore,lower_lr,reset_buffer]"]
PERSISTENT = ["model.persistent=true", "model.buffer_size=256", "model.reinit_prob=0.05"]
RECIPES: dict[str, list[str]] = {  # the spike detector logs in every recipe; recovery only where listed
    "paper_k10": ["model.sgld_steps=10"],
    "persistent": ["model.sgld_steps=10", *PERSISTENT, *RECOVER],
    "plus": ["model.sgld_steps=10", *PERSISTENT, *RECOVER, "model.chain_init=data", "model.chain_init_noise=0.3",
             "model.alpha=0.1", "model.input_norm=instance", "model.aug_brightness=0.1", "model.aug_hflip=0.5",
             "model.ema_decay=0.99"],
}  # fmt: skip
# rescored recipes: a base recipe's checkpoints scored with other scoring options (statistics refitted)
RESCORED: dict[str, tuple[str, list[str]]] = {
    "plus_sg": ("plus", ["model.stats_gains=[0.9,1.0,1.1]", "refit_stats=true"]),
}
FIELDS = ["date", "commit", "device", "torch", "recipe", "category", "seed", "size", "steps", "settings",
          "val_image_auroc", "val_pixel_auroc", "image_auroc", "pixel_auroc", "aupro", "untrained_image_auroc",
          "untrained_pixel_auroc", "paper_pixel_auroc", "image_auroc_gain0.92", "image_auroc_gain1.08",
          "spikes", "train_s", "scores_json", "command"]  # fmt: skip


def paper_pixel() -> dict[str, float]:
    with PAPER_CSV.open() as fh:
        return {r["category"]: float(r["pixel_std"]) for r in csv.DictReader(fh)}


def device_line(dev: dict[str, Any]) -> str:
    if dev.get("type") == "cuda":
        return f"cuda: {dev.get('name')} x{dev.get('count', 1)}"
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores, {dev.get('threads')} threads"


def _run(args: list[str], threads: int, log: Path) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    command = f"OMP_NUM_THREADS={threads} python {shlex.join(args)}"
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return proc.returncode, command


def run_one(recipe: str, category: str, seed: int, a: argparse.Namespace) -> dict[str, Any] | None:
    """Train, validate and test one run, then score its checkpoint on the illumination-shifted test sets.

    A ``RESCORED`` recipe trains nothing: it scores the checkpoint of its base recipe's run (same category and
    seed) with other scoring options (refitting the statistics), validation and untrained reference included.
    """
    base, rescore = RESCORED.get(recipe, (recipe, []))
    run_dir = LOG_DIR / ("quick" if a.quick else "") / f"{base}-{category}-s{seed}"
    out = LOG_DIR / ("quick" if a.quick else "") / f"{recipe}-{category}-s{seed}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if rescore and not ckpt.is_file():
        print(f"FAILED {out.name}: no checkpoint {ckpt} of recipe {base} to rescore", flush=True)
        return None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    common = ["model=ebm", "data=mvtec", f"data.root={a.root}", f"data.category={category}", f"seed={seed}",
              f"data.image_size={a.size}", "data.batch_size=16", "data.val_fraction=0.1", "logger=csv",
              "eval.figures=false"]  # fmt: skip
    settings = [*RECIPES[base], *SCORING, *a.extra, f"trainer.max_steps={a.steps}", *rescore]
    evaluate = ["train=false", f"ckpt_path={ckpt}"]
    args = ["-m", "ebmad.train", *common, *settings, *(evaluate if rescore else []), f"hydra.run.dir={out}"]
    t0 = time.perf_counter()
    rc, command = _run(args, a.threads, out.parent / f"{out.name}.log")
    res_file = out / "results.json"
    res = json.loads(res_file.read_text()) if res_file.is_file() else {}
    if rc != 0 or res.get("status") != "completed":
        print(f"FAILED {out.name} (exit {rc}, status {res.get('status')}); log: {out.parent / (out.name + '.log')}",
              flush=True)  # fmt: skip
        return None
    if rescore:  # the training run's record: time and spikes
        trained = json.loads((run_dir / "results.json").read_text())
        res["timings_s"]["fit"] = trained["timings_s"].get("fit", float("nan"))
    shifted: dict[float, float] = {}
    shifted_metrics: dict[float, dict[str, float]] = {}
    for gain in GAINS:
        sub = out / f"gain{gain}"
        sargs = ["-m", "ebmad.train", *common, *settings, *evaluate, f"data.test_good_gain={gain}",
                 "eval.untrained_reference=false", f"hydra.run.dir={sub}"]  # fmt: skip
        _run(sargs, a.threads, out / f"gain{gain}.log")
        sres = sub / "results.json"
        sr = json.loads(sres.read_text()) if sres.is_file() else {}
        shifted[gain] = sr.get("image_auroc", float("nan"))
        shifted_metrics[gain] = sr.get("metrics", {})
    wall = time.perf_counter() - t0
    m, val = res["metrics"], res.get("validation") or {}
    ref = (res.get("reference") or {}).get("untrained") or {}
    spikes_csv = run_dir / "spikes.csv"
    n_spikes = max(0, len(spikes_csv.read_text().splitlines()) - 1) if spikes_csv.is_file() else 0
    scores = {  # every score: validation and test AUROC and the untrained reference's test AUROC
        k: {
            "val": val.get(f"validation/{k}"),
            "test": m.get(k),
            "untrained": ref.get(k),
            **{f"gain{g}": shifted_metrics[g].get(k) for g in GAINS},
        }  # fmt: skip
        for k in m
        if k.startswith(("image_auroc/", "pixel_auroc/"))
    }
    dev = res["device"]
    git = res.get("git") or {}
    r4 = lambda v: "" if v is None else round(float(v), 4)  # noqa: E731
    row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "commit": (git.get("commit") or "")[:10] + ("+dirty" if git.get("dirty") else ""),
           "device": device_line(dev), "torch": dev["torch"], "recipe": recipe, "category": category, "seed": seed,
           "size": a.size, "steps": a.steps, "settings": " ".join(settings),
           "val_image_auroc": r4(val.get(f"validation/image_auroc/{res['image_score']}")),
           "val_pixel_auroc": r4(val.get(f"validation/pixel_auroc/{res['pixel_map']}")),
           "image_auroc": r4(res["image_auroc"]), "pixel_auroc": r4(res["pixel_auroc"]), "aupro": r4(res["aupro"]),
           "untrained_image_auroc": r4(ref.get(f"image_auroc/{res['image_score']}")),
           "untrained_pixel_auroc": r4(ref.get(f"pixel_auroc/{res['pixel_map']}")),
           "paper_pixel_auroc": paper_pixel().get(category, ""),
           "image_auroc_gain0.92": r4(shifted[0.92]), "image_auroc_gain1.08": r4(shifted[1.08]),
           "spikes": n_spikes, "train_s": round(res["timings_s"].get("fit", float("nan")), 1),
           "scores_json": json.dumps(scores, separators=(",", ":")), "command": command}  # fmt: skip
    print(f"RESULT {out.name}: val image/pixel {row['val_image_auroc']}/{row['val_pixel_auroc']} | test image "
          f"{row['image_auroc']} pixel {row['pixel_auroc']} (untrained {row['untrained_image_auroc']}/"
          f"{row['untrained_pixel_auroc']}) | gain 0.92/1.08 image {row['image_auroc_gain0.92']}/"
          f"{row['image_auroc_gain1.08']} | spikes {n_spikes} | {wall:.0f} s | {row['device']}", flush=True)  # fmt: skip
    return row


def select(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (recipe, image score, pixel map): validation score and mean test numbers; best first."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        runs = [json.loads(r["scores_json"]) for r in rows if r["recipe"] == recipe]
        names = runs[0].keys()
        images = [k for k in names if k.startswith("image_auroc/")]
        pixels = [k for k in names if k.startswith("pixel_auroc/")]
        mean = lambda k, part, runs=runs: statistics.fmean(float(s[k][part]) for s in runs)  # noqa: E731
        for i in images:
            for p in pixels:
                out.append({"recipe": recipe, "image_score": i.split("/")[1], "pixel_map": p.split("/")[1],
                            "validation": (mean(i, "val") + mean(p, "val")) / 2,
                            "test_image": mean(i, "test"), "test_pixel": mean(p, "test"),
                            "untrained_image": mean(i, "untrained"), "untrained_pixel": mean(p, "untrained")})  # fmt: skip
    return sorted(out, key=lambda d: -d["validation"])


def summary(rows: list[dict[str, Any]]) -> None:
    """Markdown tables: the validation-chosen scores per recipe, then recipe x category (mean ± std over seeds)."""
    table = select(rows)
    if not table:
        return
    best: dict[str, dict[str, Any]] = {}
    for d in table:
        best.setdefault(d["recipe"], d)
    dev = sorted({r["device"] for r in rows})
    print(f"\nDevice: {'; '.join(dev)}. Validation score: mean of validation image and pixel AUROC (held-out good "
          "images and planted defects; no test label). Test numbers: means over categories and seeds.\n")  # fmt: skip
    print(
        "| recipe | image score | pixel map | validation | test image AUROC | untrained | test pixel AUROC | untrained |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in best.values():
        print(f"| {d['recipe']} | {d['image_score']} | {d['pixel_map']} | {d['validation']:.3f} | {d['test_image']:.3f} | "
              f"{d['untrained_image']:.3f} | {d['test_pixel']:.3f} | {d['untrained_pixel']:.3f} |")  # fmt: skip
    b = table[0]
    print(
        f"\nChosen by validation: recipe **{b['recipe']}**, image score {b['image_score']}, pixel map {b['pixel_map']}.\n"
    )
    print("| recipe | category | seeds | image AUROC | untrained | pixel AUROC | untrained | paper pixel | A_std_l2 / a_std_l2 "
          "| image AUROC (chosen score), good images x0.92 / x1.08 | spikes |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for recipe, d in best.items():
        for cat in dict.fromkeys(r["category"] for r in rows):
            runs = [r for r in rows if r["recipe"] == recipe and r["category"] == cat]
            if not runs:
                continue
            sc = [json.loads(r["scores_json"]) for r in runs]

            def col(key: str, part: str = "test", sc: list = sc) -> list[float]:
                return [float(x[key][part]) for x in sc if x[key].get(part) is not None]

            ms = lambda v: f"{statistics.fmean(v):.3f} ± {statistics.pstdev(v):.3f}" if v else "n/a"  # noqa: E731
            mean = lambda v: f"{statistics.fmean(v):.3f}" if v else "n/a"  # noqa: E731
            i, p = f"image_auroc/{d['image_score']}", f"pixel_auroc/{d['pixel_map']}"
            print(f"| {recipe} | {cat} | {len(runs)} | {ms(col(i))} | {mean(col(i, 'untrained'))} | {ms(col(p))} | "
                  f"{mean(col(p, 'untrained'))} | {runs[0]['paper_pixel_auroc']} | {mean(col('image_auroc/A_std_l2'))} / "
                  f"{mean(col('pixel_auroc/a_std_l2'))} | {mean(col(i, 'gain0.92'))} / "
                  f"{mean(col(i, 'gain1.08'))} | {sum(int(r['spikes']) for r in runs)} |")  # fmt: skip


def backfill(path: Path = CSV_PATH) -> None:
    """Rows written before every score's shifted AUROC was recorded: add it from ``<run>/gain*/results.json``."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        out = LOG_DIR / f"{r['recipe']}-{r['category']}-s{r['seed']}"
        scores = json.loads(r["scores_json"])
        for g in GAINS:
            res = out / f"gain{g}" / "results.json"
            if int(r["size"]) == 64 and res.is_file():
                metrics = json.loads(res.read_text())["metrics"]
                for k in scores:
                    scores[k].setdefault(f"gain{g}", metrics.get(k))
        r["scores_json"] = json.dumps(scores, separators=(",", ":"))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=[*RECIPES, *RESCORED])
    ap.add_argument("--categories", nargs="+", default=["bottle", "pill"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"))
    ap.add_argument(
        "--extra", nargs="*", default=[], help="more overrides for every run (recorded in settings)"
    )
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    ap.add_argument("--quick", action="store_true", help="3 steps, 16x16... a smoke test; nothing recorded")
    ap.add_argument("--summary", action="store_true", help="only print the selection from the recorded CSV")
    ap.add_argument("--backfill", action="store_true",
                    help="add every score's shifted-test AUROC to recorded rows from their run folders")  # fmt: skip
    a = ap.parse_args()
    if a.backfill:
        backfill()
    if a.summary:
        with CSV_PATH.open() as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["size"]) == a.size and int(r["steps"]) == a.steps]
        summary(rows)
        return 0
    a.root = str(Path(a.root).resolve())
    missing = [c for c in a.categories if not (Path(a.root) / c / "train" / "good").is_dir()]
    if missing:
        print(f"MVTec AD categories not found under {a.root}: {missing}; pass --root", file=sys.stderr)
        return 2
    if a.quick:
        a.size, a.steps = 16, 3
    jobs = [(r, c, s) for s in a.seeds for c in a.categories for r in a.recipes]
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for fut in as_completed([pool.submit(run_one, *j, a) for j in jobs]):
            row = fut.result()
            if row is not None:
                rows.append(row)
                if not a.quick:
                    append_csv_rows(CSV_PATH, FIELDS, [row])
    summary(rows)
    return 0 if len(rows) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
