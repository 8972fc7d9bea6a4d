"""Benchmark: predict's speed (images/s) on the CPU, torch and ONNX backends, on the synthetic test set.

    python experiments/bench_predict.py [--ckpt PATH] [--repeats 3] [--batch-size 32] [train overrides ...]

Without ``--ckpt`` it first trains a short EBM on the default synthetic category (``python -m ebmad.train
trainer.max_steps=20 ...`` plus the given overrides, e.g. ``data.image_size=128``); speed depends on the
architecture, not on how well it is trained. Then it exports the checkpoint to ONNX and runs
``ebmad.predict`` over ``<data.root>/<category>/test`` with each backend (``device=cpu``), best of
``--repeats`` runs. Prints the device and both rates: end to end (decode, score, write overlay + mask
PNGs and the CSV; model loading excluded) and scoring only. Appends rows to
experiments/results/bench_predict.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ebmad.export import export
from ebmad.predict import predict
from ebmad.reliability.checkpointing import load_checkpoint_file
from ebmad.run.metadata import device_info, git_commit
from ebmad.train import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(name: str, **kw: object):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[f"{k}={v}" for k, v in kw.items()])


def train(out: Path, overrides: list[str]) -> Path:
    cmd = [sys.executable, "-m", "ebmad.train", "trainer.max_steps=20", "model.sgld_steps=10", "logger=none",
           f"hydra.run.dir={out}", *overrides]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out / "checkpoints" / "last.ckpt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="an existing checkpoint (default: train a short synthetic run first)")
    ap.add_argument("--input", help="images to score (default: the checkpoint run's test folder)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("overrides", nargs="*", help="training overrides when no --ckpt is given")
    a = ap.parse_args()
    work = ROOT / "logs" / "bench_predict" / datetime.now().strftime("%Y%m%d-%H%M%S")
    ckpt = Path(a.ckpt) if a.ckpt else train(work / "fit", a.overrides)
    if a.input:
        images = a.input
    else:  # the test set of the run that wrote the checkpoint
        data = json.loads((ckpt.parent.parent / "results.json").read_text())["config"]["data"]
        images = f"'{Path(data['root']) / data['category'] / 'test'}/*/*'"
    onnx_path = export(compose_cfg("export", ckpt_path=ckpt, output=work / "model.onnx"))
    dev = device_info("cpu")
    print(f"device: cpu {dev['name']} threads={dev['threads']} torch={dev['torch']} "
          f"onnxruntime={onnxruntime.__version__}")  # fmt: skip
    rows = []
    for backend in ("torch", "onnx"):
        runs = []
        for r in range(a.repeats):
            cfg = compose_cfg("predict", backend=backend, ckpt_path=ckpt, onnx_path=onnx_path, input=images,
                              output=work / f"{backend}_{r}", device="cpu", batch_size=a.batch_size,
                              image_threshold=0, pixel_threshold=1, progress_bar="false")  # fmt: skip
            runs.append(predict(cfg))
        n = runs[0]["scored"] + runs[0]["failed"]
        best = min(s["time_s"] for s in runs)
        best_score = min(s["score_s"] for s in runs)
        hp = load_checkpoint_file(ckpt, mmap=True)["hyper_parameters"]
        row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "backend": backend,
               "device": f"cpu:{dev['name']}", "threads": dev["threads"], "image_size": hp["image_size"],
               "in_channels": hp["in_channels"], "n_images": n, "batch_size": a.batch_size, "repeats": a.repeats,
               "images_per_s": round(n / best, 1), "score_images_per_s": round(n / best_score, 1),
               "commit": (git_commit().get("commit") or "")[:10]}  # fmt: skip
        rows.append(row)
        print(f"{backend:6s} {n} images {hp['in_channels']}x{hp['image_size']}x{hp['image_size']}: "
              f"{row['images_per_s']} images/s end to end, {row['score_images_per_s']} images/s scoring only "
              f"(best of {a.repeats}, batch {a.batch_size})")  # fmt: skip
    path = ROOT / "experiments" / "results" / "bench_predict.csv"
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
