"""Deterministic synthetic datasets in the MVTec AD layout: procedural textures with planted defects.

Each category is a family of oriented gratings with a fixed tint (its "normal" appearance); every
image gets a random phase and sensor noise. Test defects are "spot" (an off-colour ellipse) and
"scratch" (a thin bright or dark line segment); their binary masks go to ground_truth/.

    python -m ebmad.data.synthetic --root data/synthetic --categories tex_a tex_b --seed 0
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("spot", "scratch")
VERSION = 1


def _rng(seed: int, category: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), *keys])


def _style(seed: int, category: str) -> dict:
    r = _rng(seed, category, 0)
    return {
        "angles": r.uniform(0, np.pi, size=2),
        "freqs": r.uniform(3.0, 6.0, size=2),
        "tint": r.uniform(0.35, 0.9, size=3),
    }


def _texture(style: dict, size: int, r: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for k, (a, f) in enumerate(zip(style["angles"], style["freqs"], strict=True)):
        phase = r.uniform(0, 2 * np.pi)
        field += (0.25 if k == 0 else 0.15) * np.sin(
            2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy) + phase
        )
    img = (0.5 + field)[..., None] * style["tint"][None, None, :] + 0.05
    img += r.normal(0, 0.02, size=img.shape)
    return np.clip(img, 0, 1)


def _plant(
    img: np.ndarray, defect: str, style: dict, r: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = r.uniform(0.2, 0.8, size=2) * size
    if defect == "spot":
        ry, rx = r.uniform(0.05, 0.12, size=2) * size
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        color = 1.0 - style["tint"]  # complementary colour
        img = img.copy()
        img[mask] = 0.3 * img[mask] + 0.7 * color
    elif defect == "scratch":
        angle, length = r.uniform(0, np.pi), r.uniform(0.25, 0.5) * size
        width = max(1.0, size / 48)
        dx, dy = np.cos(angle), np.sin(angle)
        t = (xx - cx) * dx + (yy - cy) * dy
        d = np.abs(-(xx - cx) * dy + (yy - cy) * dx)
        mask = (np.abs(t) <= length / 2) & (d <= width)
        img = img.copy()
        img[mask] = 0.95 if r.random() < 0.5 else 0.02
    else:
        raise ValueError(f"unknown defect type {defect!r}; choose from {DEFECTS}")
    return np.clip(img, 0, 1), mask


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(path)


def generate_category(
    root: str | Path,
    category: str,
    seed: int = 0,
    size: int = 64,
    n_train: int = 64,
    n_test_good: int = 16,
    n_test_defect: int = 12,
    overwrite: bool = False,
) -> Path:
    """Write one synthetic category under ``root``; identical files for identical arguments."""
    cdir = Path(root) / category
    params = dict(version=VERSION, seed=seed, size=size, n_train=n_train, n_test_good=n_test_good,
                  n_test_defect=n_test_defect)  # fmt: skip
    stamp = cdir / "synthetic.json"
    if stamp.is_file() and not overwrite and json.loads(stamp.read_text()) == params:
        return cdir
    style = _style(seed, category)
    for i in range(n_train):
        _save(_texture(style, size, _rng(seed, category, 1, i)), cdir / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(_texture(style, size, _rng(seed, category, 2, i)), cdir / "test" / "good" / f"{i:03d}.png")
    for d, defect in enumerate(DEFECTS):
        for i in range(n_test_defect):
            r = _rng(seed, category, 3 + d, i)
            img, mask = _plant(_texture(style, size, r), defect, style, r)
            _save(img, cdir / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.float64), cdir / "ground_truth" / defect / f"{i:03d}_mask.png")
    stamp.write_text(json.dumps(params))
    return cdir


def main(argv: list[str] | None = None) -> None:
    """CLI: write synthetic MVTec-layout categories."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="dataset root to write into")
    ap.add_argument("--categories", nargs="+", default=["tex_a"], help="category names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-test-good", type=int, default=16)
    ap.add_argument("--n-test-defect", type=int, default=12, help="per defect type")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    for c in a.categories:
        path = generate_category(
            a.root, c, a.seed, a.size, a.n_train, a.n_test_good, a.n_test_defect, a.overwrite
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
