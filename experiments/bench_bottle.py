"""Benchmark: the sanity-reference EBM on real MVTec AD bottle; prints measured AUROC, time and device.

    python experiments/bench_bottle.py [--root ../shared/data/mvtec_ad] [hydra overrides ...]

Runs ``python -m ebmad.train experiment=sanity32`` and prints one line per metric from its
results.json. Appends a row to experiments/results/bench_bottle.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"))
    ap.add_argument("--experiment", default="sanity32")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if not (Path(a.root) / "bottle").is_dir():
        print(f"bottle category not found under {a.root}; pass --root", file=sys.stderr)
        return 2
    out = ROOT / "logs" / "bench" / datetime.now().strftime("%Y%m%d-%H%M%S")
    cmd = [sys.executable, "-m", "ebmad.train", f"experiment={a.experiment}", f"data.root={a.root}",
           "logger=csv", f"hydra.run.dir={out}", *a.overrides]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    res = json.loads((out / "results.json").read_text())
    dev = res["device"]
    print(f"device: {dev['type']} {dev.get('name')} threads={dev.get('threads')} torch={dev['torch']}")
    print(f"command: {' '.join(cmd[1:])}")
    print(
        f"wall time: {wall:.1f} s (fit {res['timings_s'].get('fit', 0):.1f} s, test {res['timings_s']['test']:.1f} s)"
    )
    for k, v in res["metrics"].items():
        print(f"{k:24s} {v:.4f}")
    row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "experiment": a.experiment,
           "overrides": " ".join(a.overrides), "device": f"{dev['type']}:{dev.get('name')}", "wall_s": round(wall, 1),
           "commit": (res["git"].get("commit") or "")[:10], **{k: round(v, 4) for k, v in res["metrics"].items()}}  # fmt: skip
    path = ROOT / "experiments" / "results" / "bench_bottle.csv"
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
