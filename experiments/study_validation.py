"""Validation study: does the label-free validation AUROC rank runs the way the test AUROC does?

    python experiments/study_validation.py [--recipes paper_k10 persistent plus] [--models draem ssae]
        [--categories bottle pill] [--seeds 0 1 2 3 4] [--bench-seeds 0 1 2] [--size 32] [--steps 100]
        [--bench-steps 150] [--root ../shared/data/mvtec_ad] [--texture-dir ../shared/data/dtd/images]
        [--runs-from 'logs/study_fidelity/*-s*' ...] [--no-train] [--threads 1]
    python experiments/study_validation.py --summary

Runs: every (recipe, category, seed) is one ``python -m ebmad.train`` run with ``data.val_fraction=0.1``
(a seeded tenth of ``train/good`` held out), one at a time, into ``logs/study_validation/<name>``: the EBM
recipes of ``study_fidelity.RECIPES`` (with its multi-scale map and patch energy) at ``--steps``, and the
"model benchmark": DRAEM (``recipe=draem_cpu``) and SSAE (``recipe=ssae_cpu``) at ``--bench-steps``, both
at ``--size`` and tested at the model's resolution (``eval.resolution=model``) so that every run of a
(size, category) is tested the same way. A run whose folder has a completed ``results.json`` is not run
again. ``--runs-from`` adds other finished run folders (``results.json`` + ``checkpoints/last.ckpt``).

Scoring (in this process, no test label read): each run's ``last.ckpt`` is loaded (weights only, with its
fitted statistics), its held-out validation images are rebuilt from its data config exactly as the run did
(``AnomalyDataModule.load_train``) and planted with every validation kind (``ebmad.synthesis``): the old
protocol ``spots_scratches`` at strength 1.0 and the new kinds ``perlin_texture`` (texture folder
``--texture-dir``, else procedural), ``perlin_patch``, ``warp``, ``color`` at 0.2/0.4/0.8. Per kind, the good
held-out images against that kind's images only give every image score's AUROC and every pixel map's
AUROC (``per_kind_aurocs``: ebmad's ``per_kind_scores`` records only the headline score's mean). Also
``new_pooled``: the good images against the four new kinds' images in one set (what a run with
``data.val_kinds=[perlin_texture,perlin_patch,warp,color]`` scores). Derived kinds: ``new_mean`` (mean AUROC
of the four new kinds) and ``neutral_mean`` (mean over the new kinds none
of the group's model types trains on, ``ebmad.synthesis.neutral_kinds``). Scores are cached in
``logs/study_validation/scores/``. Test AUROCs come from each run's ``results.json``.

Correlations (``correlations``): Spearman's rho between validation and test AUROC, per group = (image size,
category, model set: ``ebm`` = the EBM runs, ``all`` = every run), and ``pooled`` over the categories of a
size (validation and test AUROC each replaced by its percentile rank within its category first, so that
a category's level does not count). ``runs``: each run's headline image score / pixel map (what ranks
recipes and models); ``runs x scores``: every image score / pixel map of every run (what chooses a recipe
and a score). Rows (n, test spread = max - min test AUROC, for ``pooled`` the mean of the categories'
spreads, rho, p) go to ``experiments/results/validation_study.csv``; ``--summary`` prints the latest ones.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from scipy.stats import rankdata, spearmanr

from ebmad.data import AnomalyDataModule
from ebmad.evaluation.metrics import PixelAUROC, image_auroc
from ebmad.models import model_class
from ebmad.reliability.checkpointing import load_module_checkpoint, validate_checkpoint
from ebmad.run.metadata import append_csv_rows
from ebmad.synthesis import neutral_kinds, validation_anomalies

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_fidelity import RECIPES, SCORING, _run, device_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = ROOT / "experiments" / "results" / "validation_study.csv"
LOG_DIR = ROOT / "logs" / "study_validation"
SCORE_DIR = LOG_DIR / "scores"
OLD = "spots_scratches"  # the old protocol: this kind at strength 1.0
OLD_STRENGTHS = (1.0,)
NEW_KINDS = ("perlin_texture", "perlin_patch", "warp", "color")
NEW_STRENGTHS = (0.2, 0.4, 0.8)
POOLED = "new_pooled"  # the four new kinds as one validation set (what data.val_kinds=[...4 kinds] scores)
DERIVED = ("new_mean", "neutral_mean")
ALL_KINDS = (OLD, *NEW_KINDS, POOLED, *DERIVED)
SCORE_VERSION = 2  # cached scores of another version are computed again
DEFAULT_RECIPES = ("paper_k10", "persistent", "plus")  # study_fidelity's three (it may define more)
EBM_RECIPES = [k for k, v in RECIPES.items() if not (v and v[0].startswith("model="))]
BENCH: dict[str, list[str]] = {  # the model benchmark: ebmad's CPU recipes at the study's size
    "draem": ["recipe=draem_cpu", "eval.resolution=model"],
    "ssae": ["recipe=ssae_cpu", "eval.resolution=model"],
}
FIELDS = ["date", "commit", "device", "group", "size", "category", "models", "what", "kind", "n", "n_runs",
          "test_spread", "rho", "p", "runs", "command"]  # fmt: skip
WHATS = [("image", "runs"), ("pixel", "runs"), ("image", "runs x scores"), ("pixel", "runs x scores")]


# ----------------------------------------------------------------------------------------- runs
def run_name(model: str, category: str, seed: int, size: int, steps: int) -> str:
    return f"{model}-{size}px-{steps}st-{category}-s{seed}"


def completed(run_dir: Path) -> bool:
    res = run_dir / "results.json"
    try:
        return (
            json.loads(res.read_text()).get("status") == "completed"
            and (run_dir / "checkpoints" / "last.ckpt").is_file()
        )
    except (OSError, ValueError):
        return False


def train_args(model: str, category: str, seed: int, a: argparse.Namespace, out: Path) -> list[str]:
    common = ["data=mvtec", f"data.root={a.root}", f"data.category={category}", f"seed={seed}",
              f"data.image_size={a.size}", "data.val_fraction=0.1", "logger=csv", "eval.figures=false",
              "eval.untrained_reference=false", "trainer.enable_progress_bar=false"]  # fmt: skip
    if model in BENCH:
        settings = [*BENCH[model], f"trainer.max_steps={a.bench_steps}"]
    else:
        settings = [
            "model=ebm",
            "data.batch_size=16",
            *RECIPES[model],
            *SCORING,
            f"trainer.max_steps={a.steps}",
        ]
    return ["-m", "ebmad.train", *common, *settings, f"hydra.run.dir={out}"]


def run_jobs(a: argparse.Namespace) -> list[Path]:
    """Train the study's runs that are not done yet (one at a time); returns every run folder of the set."""
    jobs = [(m, c, s) for s in sorted(set(a.seeds) | set(a.bench_seeds)) for c in a.categories
            for m in [*(a.recipes if s in a.seeds else []), *(a.models if s in a.bench_seeds else [])]]  # fmt: skip
    dirs = []
    for i, (m, c, s) in enumerate(jobs, 1):
        out = LOG_DIR / run_name(m, c, s, a.size, a.bench_steps if m in BENCH else a.steps)
        dirs.append(out)
        if completed(out) or a.no_train:
            continue
        if out.exists():  # an unfinished run: started again from scratch
            shutil.rmtree(out)
        t0 = time.perf_counter()
        rc, _ = _run(train_args(m, c, s, a, out), a.threads, LOG_DIR / f"{out.name}.log")
        ok = completed(out)
        print(f"[{i}/{len(jobs)}] {out.name}: {'done' if ok else f'FAILED (exit {rc})'} in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    return dirs


# -------------------------------------------------------------------------------------- scoring
def all_scores(model: Any, images: torch.Tensor, batch_size: int) -> tuple[dict[str, torch.Tensor],
                                                                           dict[str, torch.Tensor]]:  # fmt: skip
    """Every image score (N,) and pixel map (N, H, W) of ``model`` on ``images``, each image scored once."""
    scores: dict[str, list[torch.Tensor]] = {}
    maps: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    for i in range(0, len(images), batch_size):
        s, m = model.score(images[i : i + batch_size].to(model.device))
        for k, v in s.items():
            scores.setdefault(k, []).append(v.detach().float().cpu())
        for k, v in m.items():
            maps.setdefault(k, []).append(v.detach().float().cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in scores.items()}, {k: torch.cat(v) for k, v in maps.items()}


def aurocs(scores: dict[str, torch.Tensor], maps: dict[str, torch.Tensor], label: torch.Tensor,
           mask: torch.Tensor, sel: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """``image_auroc/<score>`` and ``pixel_auroc/<map>`` of the images ``sel`` (NaN where a score is not finite)."""
    out = {}
    for k, v in scores.items():
        v = v[sel]
        out[f"image_auroc/{k}"] = image_auroc(v, label[sel]) if torch.isfinite(v).all() else math.nan
    for k, v in maps.items():
        v = v[sel]
        if not torch.isfinite(v).all():
            out[f"pixel_auroc/{k}"] = math.nan
            continue
        pix = PixelAUROC(sync_on_compute=False)
        pix.update(v, mask[sel])
        out[f"pixel_auroc/{k}"] = float(pix.compute())
    return out


def per_kind_aurocs(model: Any, good: torch.Tensor, kinds: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    batch_size: int, unions: dict[str, Sequence[str]] | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per kind: every score's and map's AUROC, the ``good`` images against that kind's (images, masks) only;
    per union (name: kinds), the good images against all those kinds' images in one set.

    (``ebmad.run.selection.per_kind_scores`` gives only the headline score's mean of image and pixel AUROC.)
    """
    names = list(kinds)
    images = torch.cat([good, *(kinds[k][0] for k in names)])
    mask = torch.cat([torch.zeros(len(good), *good.shape[-2:], dtype=torch.bool),
                      *(kinds[k][1].bool() for k in names)])  # fmt: skip
    kind = torch.cat([torch.full((len(good),), -1), *(torch.full((len(kinds[k][0]),), i)
                                                     for i, k in enumerate(names))])  # fmt: skip
    label = (kind >= 0).long()
    scores, maps = all_scores(model, images, batch_size)
    out = {k: aurocs(scores, maps, label, mask, (kind == -1) | (kind == i)) for i, k in enumerate(names)}
    for u, members in (unions or {}).items():
        sel = (kind == -1) | torch.isin(kind, torch.tensor([names.index(k) for k in members]))
        out[u] = aurocs(scores, maps, label, mask, sel)
    return out


def headline(res: dict[str, Any]) -> tuple[str, str]:
    return str(res["image_score"]), str(res["pixel_map"])


def score_run(run_dir: Path, texture_dir: str | None) -> dict[str, Any]:
    """One run's record: test AUROCs (results.json) and per-kind validation AUROCs of its ``last.ckpt``."""
    res = json.loads((run_dir / "results.json").read_text())
    data = {k: v for k, v in res["config"]["data"].items() if k not in ("_target_", "synthetic")}
    if not data.get("val_fraction"):
        raise ValueError(f"{run_dir}: data.val_fraction is {data.get('val_fraction')}; no held-out images")
    if data.get("root") and not Path(data["root"]).is_absolute():
        data["root"] = str((ROOT / data["root"]).resolve())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    kind = str(validate_checkpoint(ckpt).get("ebmad_model_type", "ebm"))
    model = load_module_checkpoint(model_class(kind), ckpt)
    # the run's held-out images exactly (seeded split of train/good), with the old protocol's planted defects
    dm = AnomalyDataModule(**{**data, "val_kinds": [OLD], "val_strengths": list(OLD_STRENGTHS)})
    dm.load_train()
    val = dm.val_data
    good = val["image"][val["kind"] == -1].cpu()
    sets = {OLD: (val["image"][val["kind"] == 0].cpu(), val["mask"][val["kind"] == 0].cpu())}
    tex = texture_dir if texture_dir and Path(texture_dir).is_dir() else None
    imgs, masks, kidx = validation_anomalies(
        good, NEW_KINDS, seed=dm.seed, texture_dir=tex, strengths=NEW_STRENGTHS
    )
    sets.update({k: (imgs[kidx == i], masks[kidx == i]) for i, k in enumerate(NEW_KINDS)})
    val_aurocs = per_kind_aurocs(model, good, sets, dm.test_batch_size, unions={POOLED: NEW_KINDS})
    recorded = res.get("validation") or {}
    vs = res.get("validation_set") or {}
    check = None  # the old protocol scored here vs. as the run scored it (same images, same checkpoint)
    if vs.get("kinds") == [OLD] and [float(s) for s in vs.get("strengths", [])] == list(OLD_STRENGTHS):
        diffs = [abs(v - recorded[f"validation/{k}"]) for k, v in val_aurocs[OLD].items()
                 if f"validation/{k}" in recorded and math.isfinite(v)]  # fmt: skip
        check = max(diffs) if diffs else None
    test = {k: float(v) for k, v in res["metrics"].items() if k.startswith(("image_auroc/", "pixel_auroc/"))}
    image_score, pixel_map = headline(res)
    return {"run": str(run_dir.resolve().relative_to(ROOT) if run_dir.resolve().is_relative_to(ROOT) else run_dir),
            "model": res.get("model", kind), "category": res["category"], "size": int(data["image_size"]),
            "image_score": image_score, "pixel_map": pixel_map,
            "test": {**test, "image_auroc": float(res["image_auroc"]), "pixel_auroc": float(res["pixel_auroc"])},
            "val": val_aurocs, "old_protocol_max_diff": check, "device": device_line(res["device"]),
            "n_val_good": len(good), "texture_dir": tex, "ckpt_mtime": ckpt.stat().st_mtime,
            "trains_on": list(model.training_anomaly_kinds()),  # the run's options decide (EBM oe_weight)
            "version": SCORE_VERSION}  # fmt: skip


def cached_score(run_dir: Path, texture_dir: str | None) -> dict[str, Any] | None:
    """:func:`score_run`, cached in ``logs/study_validation/scores/`` (rescored when the checkpoint changes)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    rel = run_dir.resolve().relative_to(ROOT) if run_dir.resolve().is_relative_to(ROOT) else run_dir.resolve()
    cache = SCORE_DIR / (str(rel).strip("/").replace("/", "__") + ".json")
    if cache.is_file():
        rec = json.loads(cache.read_text())
        if (
            rec.get("version") == SCORE_VERSION
            and rec.get("ckpt_mtime") == ckpt.stat().st_mtime
            and rec.get("texture_dir")
            == (texture_dir if texture_dir and Path(texture_dir).is_dir() else None)
        ):
            return rec
    t0 = time.perf_counter()
    try:
        rec = score_run(run_dir, texture_dir)
    except Exception as exc:  # one bad folder is reported, the others are scored
        print(f"NOT SCORED {run_dir}: {type(exc).__name__}: {exc}", flush=True)
        return None
    SCORE_DIR.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rec, indent=1))
    diff = rec["old_protocol_max_diff"]
    print(f"scored {rec['run']} in {time.perf_counter() - t0:.0f} s (old protocol vs. the run's own validation: "
          f"max |diff| {'n/a' if diff is None else f'{diff:.2g}'})", flush=True)  # fmt: skip
    return rec


# --------------------------------------------------------------------------------- correlations
def val_value(rec: dict[str, Any], kind: str, metric: str, neutral: Sequence[str]) -> float:
    """Validation AUROC of ``metric`` on ``kind``; the derived kinds average the per-kind AUROCs."""
    if kind in DERIVED:
        ks = NEW_KINDS if kind == "new_mean" else neutral
        vals = [rec["val"][k].get(metric, math.nan) for k in ks]
        return statistics.fmean(vals) if vals else math.nan
    return rec["val"].get(kind, {}).get(metric, math.nan)


def pairs(recs: Sequence[dict[str, Any]], what: str, mode: str) -> list[tuple[dict[str, Any], str]]:
    """(run record, metric key) pairs: the headline score/map per run, or every score/map of every run."""
    out = []
    for r in recs:
        if mode == "runs":
            out.append((r, f"{what}_auroc/{r['image_score'] if what == 'image' else r['pixel_map']}"))
        else:
            out.extend((r, k) for k in r["test"] if k.startswith(f"{what}_auroc/"))
    return out


def pct_rank(values: Sequence[float]) -> list[float]:
    """Percentile ranks (average rank - 0.5) / n, ties averaged."""
    return [(r - 0.5) / len(values) for r in rankdata(values)]


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    rho, p = spearmanr(x, y)
    return float(rho), float(p)


def correlations(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows per (size, category or pooled, model set, what, kind): n, test spread, Spearman rho and p."""
    rows = []
    for size in sorted({r["size"] for r in recs}):
        at_size = [r for r in recs if r["size"] == size]
        for models in ("ebm", "all"):
            chosen = [r for r in at_size if models == "all" or r["model"] == "ebm"]
            if models == "all" and {r["model"] for r in chosen} == {"ebm"}:
                continue  # the same as the ebm rows
            cats = sorted({r["category"] for r in chosen})
            types = sorted({r["model"] for r in chosen})
            trained = {k for r in chosen for k in r.get("trains_on", [])}  # e.g. an EBM with oe_weight > 0
            neutral = [k for k in neutral_kinds(types) if k in NEW_KINDS and k not in trained]
            for what, mode in WHATS:
                for kind in ALL_KINDS:
                    per_cat: dict[str, tuple[list[float], list[float]]] = {}
                    n_runs: dict[str, int] = {}
                    for c in cats:
                        xs, ys, runs = [], [], set()
                        for r, k in pairs([r for r in chosen if r["category"] == c], what, mode):
                            x, y = val_value(r, kind, k, neutral), r["test"].get(k, math.nan)
                            if math.isfinite(x) and math.isfinite(y):
                                xs.append(x)
                                ys.append(y)
                                runs.add(r["run"])
                        per_cat[c], n_runs[c] = (xs, ys), len(runs)
                    groups = [(c, *per_cat[c], n_runs[c], max(per_cat[c][1]) - min(per_cat[c][1])
                               if per_cat[c][1] else math.nan) for c in cats]  # fmt: skip
                    if len(cats) > 1:
                        px = [v for c in cats for v in pct_rank(per_cat[c][0]) if per_cat[c][0]]
                        py = [v for c in cats for v in pct_rank(per_cat[c][1]) if per_cat[c][1]]
                        spreads = [g[4] for g in groups if math.isfinite(g[4])]
                        groups.append(("pooled", px, py, sum(n_runs.values()),
                                       statistics.fmean(spreads) if spreads else math.nan))  # fmt: skip
                    for c, xs, ys, nr, spread in groups:
                        rho, p = spearman(xs, ys)
                        label = f"neutral_mean({'+'.join(neutral)})" if kind == "neutral_mean" else kind
                        rows.append({"group": f"{size}px/{c}/{models}", "size": size, "category": c,
                                     "models": "+".join(types), "what": f"{what}, {mode}", "kind": label,
                                     "n": len(xs), "n_runs": nr, "test_spread": spread, "rho": rho, "p": p})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------- main
def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=list(DEFAULT_RECIPES), choices=EBM_RECIPES,
                    help="EBM recipes of study_fidelity.RECIPES")  # fmt: skip
    ap.add_argument(
        "--models", nargs="*", default=list(BENCH), choices=list(BENCH), help="the model benchmark"
    )
    ap.add_argument("--categories", nargs="+", default=["bottle", "pill"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4], help="seeds of the EBM recipes")
    ap.add_argument("--bench-seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of --models")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100, help="EBM training steps")
    ap.add_argument("--bench-steps", type=int, default=150, help="DRAEM / SSAE training steps")
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"))
    ap.add_argument("--texture-dir", default=str(ROOT.parent / "shared" / "data" / "dtd" / "images"),
                    help="perlin_texture fills (procedural when the folder is missing)")  # fmt: skip
    ap.add_argument("--runs-from", nargs="*", default=[], metavar="GLOB",
                    help="other finished run folders to score too (results.json + checkpoints/last.ckpt)")  # fmt: skip
    ap.add_argument("--no-train", action="store_true", help="train nothing; score the runs that exist")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs and of the scoring")
    ap.add_argument("--summary", action="store_true", help="only print the latest rows of the CSV as tables")
    ap.add_argument("--csv", type=Path, default=CSV_PATH, help="where the rows go")
    return ap.parse_args(argv)


def git_line() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def fmt(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if not math.isfinite(f) else f"{f:.{digits}f}"


def summary(rows: Sequence[dict[str, Any]]) -> None:
    """Markdown: per group, kind x (image/pixel, runs / runs x scores) rho; then the goal check."""
    if not rows:
        print("no rows")
        return
    print(f"\nDevice (runs): {'; '.join(sorted({r['device'] for r in rows}))}. Commit {rows[0]['commit']}; "
          f"command: `{rows[0]['command']}`.\nSpearman rho of validation vs. test AUROC (p in brackets); "
          "pooled: within-category percentile ranks, test spread = mean of the categories'.\n")  # fmt: skip
    whats = list(dict.fromkeys(r["what"] for r in rows))
    for g in dict.fromkeys(r["group"] for r in rows):
        gr = [r for r in rows if r["group"] == g]
        print(f"**{g}** ({gr[0]['models']})\n")
        print("| kind | " + " | ".join(whats) + " |")
        print("| --- |" + " --- |" * len(whats))
        for kind in dict.fromkeys(r["kind"] for r in gr):
            cells = []
            for w in whats:
                r = next((r for r in gr if r["kind"] == kind and r["what"] == w), None)
                cells.append("" if r is None else f"{fmt(r['rho'], 2)} ({fmt(r['p'], 3)})")
            print(f"| {kind} | " + " | ".join(cells) + " |")
        cells = []
        for w in whats:
            r = next((r for r in gr if r["what"] == w and r["kind"] == OLD), None)
            cells.append(
                "" if r is None else f"n {r['n']} ({r['n_runs']} runs), spread {fmt(r['test_spread'])}"
            )
        print("| n, test spread | " + " | ".join(cells) + " |\n")
    print("Goal: rho >= 0.6 where the test AUROCs spread by > 0.03. Best kind per group:\n")
    print("| group | what | spread | best kind | rho | old protocol rho | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for g in dict.fromkeys(r["group"] for r in rows):
        for w in whats:
            rs = [r for r in rows if r["group"] == g and r["what"] == w and math.isfinite(float(r["rho"]))]
            if not rs:
                continue
            best = max(rs, key=lambda r: float(r["rho"]))
            old = next((r for r in rs if r["kind"] == OLD), None)
            spread = float(best["test_spread"])
            goal = (
                "spread <= 0.03"
                if spread <= 0.03
                else ("reached" if float(best["rho"]) >= 0.6 else "not reached")
            )
            print(f"| {g} | {w} | {fmt(spread)} | {best['kind']} | {fmt(best['rho'], 2)} | "
                  f"{fmt(old['rho'], 2) if old else 'n/a'} | {goal} |")  # fmt: skip


def latest_rows(path: Path = CSV_PATH) -> list[dict[str, str]]:
    """The rows of the CSV's latest invocation (one date per invocation)."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    last = max((r["date"] for r in rows), default=None)
    return [r for r in rows if r["date"] == last]


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    if a.summary:
        summary(latest_rows(a.csv))
        return 0
    torch.set_num_threads(a.threads)
    a.root = str(Path(a.root).resolve())
    command = "OMP_NUM_THREADS=1 python " + shlex.join(["experiments/study_validation.py", *sys.argv[1:]])
    missing = [c for c in a.categories if not (Path(a.root) / c / "train" / "good").is_dir()]
    if missing and (a.seeds or a.bench_seeds) and (a.recipes or a.models):
        print(f"MVTec AD categories not found under {a.root}: {missing}; pass --root", file=sys.stderr)
        return 2
    dirs = run_jobs(a)
    extra = [Path(d) for pattern in a.runs_from for d in sorted(glob.glob(pattern)) if Path(d).is_dir()]
    extra = [d for d in extra if completed(d)]
    print(
        f"scoring {len([d for d in dirs if completed(d)])} study runs and {len(extra)} from --runs-from",
        flush=True,
    )
    recs = [
        r
        for d in dict.fromkeys(d.resolve() for d in [*dirs, *extra])
        if completed(d) and (r := cached_score(d, a.texture_dir))
    ]
    if not recs:
        print("no run to score", file=sys.stderr)
        return 1
    rows = correlations(recs)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    base = {"date": date, "commit": git_line(), "command": command}
    for r in rows:
        at = [x for x in recs if x["size"] == r["size"] and (r["category"] == "pooled" or x["category"] == r["category"])
              and x["model"] in r["models"].split("+")]  # fmt: skip
        r.update(base, device="; ".join(sorted({x["device"] for x in at})),
                 runs=" ".join(sorted({Path(x["run"]).name for x in at})))  # fmt: skip
        for k in ("test_spread", "rho", "p"):
            r[k] = "" if not math.isfinite(r[k]) else round(r[k], 4 if k != "p" else 6)
    append_csv_rows(a.csv, FIELDS, rows)
    summary([{**r, "rho": r["rho"] if r["rho"] != "" else "nan", "p": r["p"] if r["p"] != "" else "nan",
              "test_spread": r["test_spread"] if r["test_spread"] != "" else "nan"} for r in rows])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
