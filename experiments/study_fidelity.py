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

Energy against synthetic anomalies (issue 19, ``experiment=ebm_oe``): the ``oe_*`` recipes are ``plus_sg``
(= ``experiment=ebm_plus``) with Liu et al.'s energy margins on DRAEM-style anomalies (``model.oe_weight``;
textures from ``--textures``, DTD by default when present), validated on kinds their training does not draw
(``data.val_kinds=[warp,color]``, strengths 0.2/0.4/0.8); ``plus_val`` is ``plus_sg`` validated the same way
and ``plus_lr5e-4`` its learning-rate control. ``draem`` is DRAEM at the same budget (size, steps, batch 16;
widths 32/16, DTD). ``--summary --recipes oe_patch oe_both ...`` selects among the given recipes only.
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

from ebmad.run.metadata import append_csv_rows, cpu_name

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
# energy trained against synthetic anomalies beside CD (issue 19): candidates of experiment=ebm_oe, all validated on
# kinds the training does not draw (VALIDATION_OE); the chosen one is the recipe of conf/experiment/ebm_oe.yaml
PLUS_SG = [*RECIPES["plus"], "model.stats_gains=[0.9,1.0,1.1]"]
VALIDATION_OE = ["data.val_kinds=[warp,color]", "data.val_strengths=[0.2,0.4,0.8]"]
OE = ["model.oe_weight=1.0", "model.combo_map=true"]
MARGINS = ["model.oe_margin_in=-0.25", "model.oe_margin_out=0.25"]
RECIPES.update({
    "plus_val": [*PLUS_SG, *VALIDATION_OE],  # = experiment=ebm_plus, validated as the candidates are
    "plus_lr5e-4": [*PLUS_SG, *VALIDATION_OE, "model.lr=5e-4"],  # control: the candidates' learning rate alone
    "oe_patch": [*PLUS_SG, *VALIDATION_OE, *OE, "model.lr=5e-4", *MARGINS, "model.oe_level=patch"],
    "oe_both": [*PLUS_SG, *VALIDATION_OE, *OE, "model.lr=5e-4", *MARGINS, "model.oe_level=both"],
    "oe_images": [*PLUS_SG, *VALIDATION_OE, *OE, "model.lr=5e-4", *MARGINS, "model.oe_source=images"],
    "oe_w5": [*PLUS_SG, *VALIDATION_OE, *OE, "model.lr=5e-4", *MARGINS, "model.oe_weight=5.0"],
    "oe_lr1e-3": [*PLUS_SG, *VALIDATION_OE, *OE, "model.lr=1e-3", *MARGINS],
    "oe_lr1e-4": [*PLUS_SG, *VALIDATION_OE, *OE, *MARGINS],  # ebm_plus's learning rate
})  # fmt: skip
# other models at the same budget (size, steps, batch): the first override names the model
RECIPES["draem"] = [
    "model=draem",
    "model.recon_base_width=32",
    "model.disc_base_width=16",
    "model.schedule=code",
]
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
    budget = "" if a.steps == 100 or a.quick else f"-{a.steps}st"  # other budgets: their own folders
    run_dir = LOG_DIR / ("quick" if a.quick else "") / f"{base}-{category}-s{seed}{budget}"
    out = LOG_DIR / ("quick" if a.quick else "") / f"{recipe}-{category}-s{seed}{budget}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if rescore and not ckpt.is_file():
        print(f"FAILED {out.name}: no checkpoint {ckpt} of recipe {base} to rescore", flush=True)
        return None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    recipe_args = RECIPES[base]
    model = recipe_args[0] if recipe_args and recipe_args[0].startswith("model=") else "model=ebm"
    recipe_args = [o for o in recipe_args if o != model]
    common = [model, "data=mvtec", f"data.root={a.root}", f"data.category={category}", f"seed={seed}",
              f"data.image_size={a.size}", "data.batch_size=16", "data.val_fraction=0.1", "logger=csv",
              "eval.figures=false"]  # fmt: skip
    if any(o.startswith("model.oe_") for o in recipe_args) and a.textures:
        recipe_args = [*recipe_args, f"model.oe_source_dir={a.textures}"]
    if model == "model=draem" and a.textures:  # DRAEM's paper setting: DTD, as the oe_* recipes
        recipe_args = [*recipe_args, f"model.anomaly_source_dir={a.textures}"]
    scoring = SCORING if model == "model=ebm" else []
    settings = [*recipe_args, *scoring, *a.extra, f"trainer.max_steps={a.steps}", *rescore]
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
        mean = lambda k, part, runs=runs: statistics.fmean(  # noqa: E731
            float("nan") if s[k].get(part) is None else float(s[k][part]) for s in runs)  # fmt: skip
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
          "images and the synthetic anomalies of each run's data.val_kinds; no test label). Test numbers: means over "
          "categories and seeds.\n")  # fmt: skip
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
                return [float(x[key][part]) for x in sc if (x.get(key) or {}).get(part) is not None]

            ms = lambda v: f"{statistics.fmean(v):.3f} ± {statistics.pstdev(v):.3f}" if v else "n/a"  # noqa: E731
            mean = lambda v: f"{statistics.fmean(v):.3f}" if v else "n/a"  # noqa: E731
            i, p = f"image_auroc/{d['image_score']}", f"pixel_auroc/{d['pixel_map']}"
            print(f"| {recipe} | {cat} | {len(runs)} | {ms(col(i))} | {mean(col(i, 'untrained'))} | {ms(col(p))} | "
                  f"{mean(col(p, 'untrained'))} | {runs[0]['paper_pixel_auroc']} | {mean(col('image_auroc/A_std_l2'))} / "
                  f"{mean(col('pixel_auroc/a_std_l2'))} | {mean(col(i, 'gain0.92'))} / "
                  f"{mean(col(i, 'gain1.08'))} | {sum(int(r['spikes']) for r in runs)} |")  # fmt: skip


REFERENCE_SCORES = {"draem": ("max_pool21", "mask_prob"), "plus_val": ("A_ms_max", "a_ms")}  # their headlines


def oe_summary(rows: list[dict[str, Any]], candidates: list[str], plus: str = "plus_sg",
               others: tuple[str, ...] = ("plus_val", "draem")) -> None:  # fmt: skip
    """Issue 19's table: the oe_* candidate chosen by validation (with its score and map), per category beside
    the untrained reference (same network at its initial weights, same score and map), ebm_plus, DRAEM at the
    same budget and the paper; mean ± std over seeds."""
    # selection on the selection stage's runs (seed 0 of every candidate: the same footing), then all seeds
    table = select([r for r in rows if r["recipe"] in candidates and r["seed"] == "0"])
    if not table:
        print("no oe_* rows")
        return
    best: dict[str, dict[str, Any]] = {}
    for d in table:
        best.setdefault(d["recipe"], d)
    print(
        "\n| candidate | image score | pixel map | validation (warp, color) | runs | test image | test pixel |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d in best.values():
        n = sum(r["recipe"] == d["recipe"] and r["seed"] == "0" for r in rows)
        print(f"| {d['recipe']} | {d['image_score']} | {d['pixel_map']} | {d['validation']:.3f} | {n} | "
              f"{d['test_image']:.3f} | {d['test_pixel']:.3f} |")  # fmt: skip
    b = table[0]
    print(f"\nChosen without test labels: **{b['recipe']}** ({b['image_score']} / {b['pixel_map']}).\n")

    def stats(
        recipe: str, cat: str, image: str | None, pixel: str | None, part: str = "test"
    ) -> tuple[str, str, int]:
        runs = [json.loads(r["scores_json"]) for r in rows if r["recipe"] == recipe and r["category"] == cat]
        out = []
        for key in (f"image_auroc/{image}" if image else None, f"pixel_auroc/{pixel}" if pixel else None):
            v = [float(x[key][part]) for x in runs if key and (x.get(key) or {}).get(part) is not None]
            out.append(f"{statistics.fmean(v):.3f} ± {statistics.pstdev(v):.3f}" if v else "n/a")
        return out[0], out[1], len(runs)

    paper = paper_pixel()
    print("| category | recipe | seeds | image AUROC | pixel AUROC | scores |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cat in dict.fromkeys(r["category"] for r in rows):
        i, p, n = stats(b["recipe"], cat, b["image_score"], b["pixel_map"])
        print(f"| {cat} | **{b['recipe']}** | {n} | {i} | {p} | {b['image_score']} / {b['pixel_map']} |")
        i, p, n = stats(b["recipe"], cat, b["image_score"], b["pixel_map"], "untrained")
        print(f"| {cat} | untrained reference | {n} | {i} | {p} | {b['image_score']} / {b['pixel_map']} |")
        for ref, (img, pix) in [(plus, ("A_ms_max", "a_ms")), *((o, REFERENCE_SCORES.get(o, ("A_ms_max", "a_ms")))
                                                              for o in others)]:  # fmt: skip
            i, p, n = stats(ref, cat, img, pix)
            if n:
                print(f"| {cat} | {ref} | {n} | {i} | {p} | {img} / {pix} |")
        print(f"| {cat} | paper (Genc et al., 128x128) | | | {paper.get(cat, '')} | |")


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
    ap.add_argument("--textures", default=str(ROOT.parent / "shared" / "data" / "dtd" / "images"),
                    help="texture folder of the oe_* recipes' synthetic anomalies (DTD); '' for procedural ones")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    ap.add_argument("--quick", action="store_true", help="3 steps, 16x16... a smoke test; nothing recorded")
    ap.add_argument("--summary", action="store_true", help="only print the selection from the recorded CSV")
    ap.add_argument("--oe-summary", nargs="+", metavar="RECIPE",
                    help="only print issue 19's table: the given oe_* candidates, the chosen one beside references")  # fmt: skip
    ap.add_argument("--backfill", action="store_true",
                    help="add every score's shifted-test AUROC to recorded rows from their run folders")  # fmt: skip
    a = ap.parse_args()
    a.recipes_given = "--recipes" in sys.argv  # --summary: select among these recipes only
    if a.backfill:
        backfill()
    if a.oe_summary:
        with CSV_PATH.open() as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["size"]) == a.size and int(r["steps"]) == a.steps]
        oe_summary(rows, a.oe_summary)
        return 0
    if a.summary:
        with CSV_PATH.open() as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["size"]) == a.size and int(r["steps"]) == a.steps
                    and (r["recipe"] in a.recipes or not a.recipes_given)]  # fmt: skip
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
