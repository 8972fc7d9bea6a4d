"""Benchmark: peak resident memory of loading one category (train + validation + test) at 256 px.

    python experiments/bench_data_memory.py [--layout mvtec --root ../shared/data/mvtec_ad --category bottle]
                                            [--image-size 256] [--device cuda]
    python experiments/bench_data_memory.py --synthetic-side 2048 --synthetic-n 24   # MVTec AD 2-sized images

Each measurement runs in a fresh process: the peak resident set (``VmHWM``) after importing
ebmad and torch (baseline) and after the datamodule has decoded everything, next to the bytes of the
resident tensors and of one decoded image at full size. The datamodule decodes, resizes and drops
one image at a time, so the growth should be about the tensors plus a few decoded images, not the
category at full size (also printed). ``--synthetic-side`` writes a synthetic MVTec AD 2 category of
that many pixels a side into a temporary folder first (no MVTec AD 2 download needed). Appends a row
to experiments/results/bench_data_memory.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_kb() -> int:
    """This process's peak resident set in KiB: VmHWM (reset by exec), else ru_maxrss (kept across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(args: argparse.Namespace) -> dict:
    """In this (fresh) process: load the category and report memory."""
    sys.path.insert(0, str(ROOT))
    import torch
    from PIL import Image

    from ebmad.data import AnomalyDataModule
    from ebmad.run.metadata import device_info

    base_kb = peak_rss_kb()
    dm = AnomalyDataModule(root=args.root, category=args.category, layout=args.layout, image_size=args.image_size,
                           val_fraction=args.val_fraction if args.layout != "mvtec_ad2" else 0.0)  # fmt: skip
    device = torch.device(args.device)
    t0 = time.perf_counter()
    train, test = dm.load_train(), dm.load_test()
    tensors = [train["image"], test["image"], test["mask"], *(dm.val_data or {}).values()]
    moved = [t.to(device) for t in tensors]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_kb = peak_rss_kb()
    files = [*dm.index.train, *dm.index.validation, *(it.image for it in dm.index.test)]
    full = 0
    largest = 0
    for f in files:
        with Image.open(f) as img:
            n = img.size[0] * img.size[1] * len(img.getbands())
        full += n
        largest = max(largest, n)
    return {
        "layout": args.layout, "category": args.category, "image_size": args.image_size, "n_images": len(files),
        "baseline_rss_mb": base_kb / 1024, "peak_rss_mb": peak_kb / 1024, "growth_mb": (peak_kb - base_kb) / 1024,
        "tensors_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        "largest_decoded_mb": largest / 2**20 * 4,  # as float32 after conversion
        "all_decoded_mb": full / 2**20, "load_s": seconds,
        "device": f"{device_info(moved[0].device)['type']}:{device_info(moved[0].device).get('name')}",
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="mvtec")
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad"))
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument(
        "--synthetic-side", type=int, default=0, help="write a synthetic MVTec AD 2 category first"
    )
    ap.add_argument("--synthetic-n", type=int, default=24, help="its training images (test: a third of that)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if a.synthetic_side:
            sys.path.insert(0, str(ROOT))
            from ebmad.data.synthetic import generate_category

            n = a.synthetic_n
            generate_category(tmp, "synthetic_ad2", size=a.synthetic_side, n_train=n, n_test_good=max(1, n // 6),
                              n_test_defect=max(1, n // 12), layout="mvtec_ad2", n_validation=max(1, n // 6))  # fmt: skip
            a.layout, a.root, a.category = "mvtec_ad2", tmp, "synthetic_ad2"
        cmd = [sys.executable, __file__, "--child", "--layout", a.layout, "--root", a.root, "--category", a.category,
               "--image-size", str(a.image_size), "--val-fraction", str(a.val_fraction), "--device", a.device]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            return p.returncode
        r = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"device: {r['device']}")
    print(
        f"{r['layout']} / {r['category']}: {r['n_images']} images at {r['image_size']} px, loaded in {r['load_s']:.1f} s"
    )
    print(f"peak resident memory {r['peak_rss_mb']:.0f} MiB (baseline after imports {r['baseline_rss_mb']:.0f} MiB, "
          f"growth {r['growth_mb']:.0f} MiB)")  # fmt: skip
    print(f"resident tensors {r['tensors_mb']:.0f} MiB; one decoded image as float {r['largest_decoded_mb']:.0f} MiB; "
          f"the whole category decoded at full size would be {r['all_decoded_mb']:.0f} MiB (8-bit)")  # fmt: skip
    path = ROOT / "experiments" / "results" / "bench_data_memory.csv"
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["date", *r])
        if new:
            w.writeheader()
        w.writerow({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}})  # fmt: skip
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
