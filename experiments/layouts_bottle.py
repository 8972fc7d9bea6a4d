"""Real data in every layout: MVTec AD bottle rearranged as VisA (CSV), MVTec AD 2 and Folder, trained in each.

    python experiments/layouts_bottle.py [--root ../shared/data/mvtec_ad] [--work /tmp/ebmad_layouts_bottle]
                                         [--steps 20] [hydra overrides ...]

The rearranged trees are symbolic links (copies where links fail) under ``--work``, outside the
repository. Each layout runs the same short training (``experiment=sanity32`` shortened, same seed) and
its metrics, thresholds and per-image scores are compared with the MVTec-layout run:

- Folder: ``normal/`` (train/good), ``normal_test/`` (test/good), ``abnormal/<defect>/``, ``masks/<defect>/``.
- VisA: ``bottle/Data/Images/{Normal,Anomaly}``, ``bottle/Data/Masks/Anomaly``, rows in ``split_csv/1cls.csv``.
- MVTec AD 2: ``validation/good`` holds exactly the images the MVTec run holds out with ``data.val_fraction``
  (same seed), named so that both runs see the same images in the same order; ``test_public/bad`` holds every
  defect as ``<defect>_<name>``.

VisA's mask rule (non-zero, binarized at 0.5 after resizing) differs from MVTec's (> 127, nearest
neighbour) on resized masks, so its pixel metrics at the model's resolution may differ; per-defect
metrics differ by name (VisA has no defect types, MVTec AD 2 only ``bad``). Everything else must be
equal. Appends one row per layout to experiments/results/layouts_bottle.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebmad.data.io import list_images  # noqa: E402

CATEGORY = "bottle"


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def mvtec_parts(cdir: Path) -> tuple[list[Path], list[Path], dict[str, list[tuple[Path, Path]]]]:
    train = list_images(cdir / "train" / "good")
    good = list_images(cdir / "test" / "good")
    defects = {}
    for ddir in sorted(p for p in (cdir / "test").iterdir() if p.is_dir() and p.name != "good"):
        defects[ddir.name] = [(img, cdir / "ground_truth" / ddir.name / f"{img.stem}_mask.png")
                              for img in list_images(ddir)]  # fmt: skip
    return train, good, defects


def as_folder(cdir: Path, out: Path) -> list[str]:
    train, good, defects = mvtec_parts(cdir)
    base = out / "folder" / CATEGORY
    for p in train:
        link(p, base / "normal" / p.name)
    for p in good:
        link(p, base / "normal_test" / p.name)
    for defect, pairs in defects.items():
        for img, mask in pairs:
            link(img, base / "abnormal" / defect / img.name)
            link(mask, base / "masks" / defect / mask.name)
    return ["data=folder", f"data.category={CATEGORY}", f"data.normal_dir={base / 'normal'}",
            f"data.normal_test_dir={base / 'normal_test'}", f"data.abnormal_dir={base / 'abnormal'}",
            f"data.mask_dir={base / 'masks'}"]  # fmt: skip


def as_visa(cdir: Path, out: Path) -> list[str]:
    train, good, defects = mvtec_parts(cdir)
    root = out / "visa"
    data = root / CATEGORY / "Data"
    rows = []
    for i, p in enumerate(train):
        link(p, data / "Images" / "Normal" / f"{i:04d}.png")
        rows.append([CATEGORY, "train", "normal", f"{CATEGORY}/Data/Images/Normal/{i:04d}.png", ""])
    tests = [("good", p, None) for p in good] + [
        (d, img, m) for d, pairs in defects.items() for img, m in pairs
    ]
    for k, (_defect, img, mask) in enumerate(sorted(tests, key=lambda t: t[0])):  # MVTec AD's order (stable)
        if mask is None:
            name = f"{len(train) + k:04d}.png"
            link(img, data / "Images" / "Normal" / name)
            rows.append([CATEGORY, "test", "normal", f"{CATEGORY}/Data/Images/Normal/{name}", ""])
        else:
            link(img, data / "Images" / "Anomaly" / f"{k:03d}.png")
            link(mask, data / "Masks" / "Anomaly" / f"{k:03d}.png")
            rows.append([CATEGORY, "test", "anomaly", f"{CATEGORY}/Data/Images/Anomaly/{k:03d}.png",
                         f"{CATEGORY}/Data/Masks/Anomaly/{k:03d}.png"])  # fmt: skip
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["object", "split", "label", "image", "mask"], *rows])
    return ["data=visa", f"data.root={root}", f"data.category={CATEGORY}"]


def as_mvtec_ad2(cdir: Path, out: Path, val_fraction: float, seed: int) -> list[str]:
    """validation/good = the datamodule's seeded val_fraction share of train/good, in the datamodule's order."""
    train, good, defects = mvtec_parts(cdir)
    base = out / "mvtec_ad2" / CATEGORY
    n_val = int(round(val_fraction * len(train)))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    for j, i in enumerate(order[n_val:]):
        link(train[i], base / "train" / "good" / f"{j:03d}.png")
    for j, i in enumerate(order[:n_val]):
        link(train[i], base / "validation" / "good" / f"{j:03d}.png")
    for p in good:
        link(p, base / "test_public" / "good" / p.name)
    for defect, pairs in defects.items():
        for img, mask in pairs:
            link(img, base / "test_public" / "bad" / f"{defect}_{img.name}")
            link(mask, base / "test_public" / "ground_truth" / "bad" / f"{defect}_{img.stem}_mask.png")
    return [
        "data=mvtec_ad2",
        f"data.root={out / 'mvtec_ad2'}",
        f"data.category={CATEGORY}",
        "data.val_fraction=0",
    ]


def train(data: list[str], out: Path, common: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "ebmad.train", *common, *data, f"hydra.run.dir={out}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text()), time.perf_counter() - t0


def scores_by_file(out: Path) -> dict[str, tuple[str, ...]]:
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    keys = [k for k in rows[0] if k not in ("index", "path", "defect")]
    return {str(Path(r["path"]).resolve()): tuple(r[k] for k in keys) for r in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"))
    ap.add_argument(
        "--work", default="/tmp/ebmad_layouts_bottle", help="where the rearranged trees and runs go"
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cdir = Path(a.root) / CATEGORY
    if not cdir.is_dir():
        print(f"{CATEGORY} not found under {a.root}; pass --root", file=sys.stderr)
        return 2
    work = Path(a.work).resolve()
    if ROOT in work.parents or work == ROOT:
        print(f"--work {work} is inside the repository; choose a folder outside it", file=sys.stderr)
        return 2
    shutil.rmtree(work, ignore_errors=True)
    common = ["experiment=sanity32", f"trainer.max_steps={a.steps}", "model.sgld_steps=10", "logger=none",
              "eval.figures=false", "eval.untrained_reference=false", f"seed={a.seed}", *a.overrides]  # fmt: skip
    vf = f"data.val_fraction={a.val_fraction}"
    layouts = {
        "mvtec": ["data=mvtec", f"data.root={a.root}", f"data.category={CATEGORY}", vf],
        "folder": [*as_folder(cdir, work), vf],
        "visa": [*as_visa(cdir, work), vf],
        "mvtec_ad2": as_mvtec_ad2(cdir, work, a.val_fraction, a.seed),
    }
    results = {}
    for name, data in layouts.items():
        res, wall = train(data, work / f"run_{name}", common)
        results[name] = (res, wall, scores_by_file(work / f"run_{name}"))
        print(f"{name:10s} image_auroc={res['image_auroc']:.4f} pixel_auroc={res['pixel_auroc']:.4f} "
              f"aupro={res['aupro']:.4f} thresholds={res['thresholds']} wall={wall:.0f}s", flush=True)  # fmt: skip
    ref, _, ref_scores = results["mvtec"]
    path = ROOT / "experiments" / "results" / "layouts_bottle.csv"
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["date", "layout", "steps", "val_fraction", "image_auroc", "pixel_auroc", "aupro",
                        "scores_identical", "thresholds_identical", "metrics_differing", "wall_s"])  # fmt: skip
        ok = True
        for name, (res, wall, scores) in results.items():
            differ = sorted(k for k in set(ref["metrics"]) | set(res["metrics"])
                            if ref["metrics"].get(k) != res["metrics"].get(k))  # fmt: skip
            same_scores = scores == ref_scores
            same_thr = res["thresholds"] == ref["thresholds"]
            allowed = [k for k in differ if k.startswith("per_defect/")
                       or (name == "visa" and "pixel" in k or name == "visa" and k.endswith("aupro"))]  # fmt: skip
            ok &= same_scores and same_thr and len(allowed) == len(differ)
            print(f"{name:10s} scores identical to mvtec: {same_scores}; thresholds identical: {same_thr}; "
                  f"metrics differing: {differ or 'none'}")  # fmt: skip
            w.writerow([datetime.now(timezone.utc).isoformat(timespec="seconds"), name, a.steps, a.val_fraction,
                        round(res["image_auroc"], 6), round(res["pixel_auroc"], 6), round(res["aupro"], 6),
                        same_scores, same_thr, " ".join(differ), round(wall, 1)])  # fmt: skip
    print(
        "all layouts agree with the MVTec layout"
        if ok
        else "LAYOUTS DISAGREE beyond the documented differences"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
