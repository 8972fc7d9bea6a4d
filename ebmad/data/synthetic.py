"""Deterministic synthetic datasets in any layout: procedural textures with planted defects.

Each category is a family of oriented gratings with a fixed tint (its "normal" appearance); every
image gets a random phase and sensor noise. Test defects are "spot" (an off-colour ellipse) and
"scratch" (a thin bright or dark line segment); their binary masks go to ground_truth/.

    python -m ebmad.data.synthetic --root data/synthetic --categories tex_a tex_b --seed 0
    ebmad-synth --root data/synth_visa --layout visa          # also mvtec_ad2, folder

The same images (and masks) are written in every layout (``--layout mvtec|visa|mvtec_ad2|folder``).
"""

from __future__ import annotations

import argparse
import csv
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


LAYOUTS = ("mvtec", "visa", "mvtec_ad2", "folder")


def _samples(seed: int, category: str, size: int, n_train: int, n_test_good: int, n_test_defect: int,
             n_validation: int) -> dict:  # fmt: skip
    """Every image (and mask) of a category, independent of the layout it is written in."""
    style = _style(seed, category)
    out = {
        "train": [_texture(style, size, _rng(seed, category, 1, i)) for i in range(n_train)],
        "good": [_texture(style, size, _rng(seed, category, 2, i)) for i in range(n_test_good)],
        "validation": [_texture(style, size, _rng(seed, category, 6, i)) for i in range(n_validation)],
        "defects": {},
    }
    for d, defect in enumerate(DEFECTS):
        pairs = []
        for i in range(n_test_defect):
            r = _rng(seed, category, 3 + d, i)
            pairs.append(_plant(_texture(style, size, r), defect, style, r))
        out["defects"][defect] = pairs
    return out


def _write_mvtec(cdir: Path, s: dict) -> None:
    for i, img in enumerate(s["train"]):
        _save(img, cdir / "train" / "good" / f"{i:03d}.png")
    for i, img in enumerate(s["good"]):
        _save(img, cdir / "test" / "good" / f"{i:03d}.png")
    for defect, pairs in s["defects"].items():
        for i, (img, mask) in enumerate(pairs):
            _save(img, cdir / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.float64), cdir / "ground_truth" / defect / f"{i:03d}_mask.png")


def _write_mvtec_ad2(cdir: Path, s: dict) -> None:
    for i, img in enumerate(s["train"]):
        _save(img, cdir / "train" / "good" / f"{i:03d}.png")
    for i, img in enumerate(s["validation"]):
        _save(img, cdir / "validation" / "good" / f"{i:03d}.png")
    for i, img in enumerate(s["good"]):
        _save(img, cdir / "test_public" / "good" / f"{i:03d}.png")
    for defect, pairs in s["defects"].items():
        for i, (img, mask) in enumerate(pairs):
            _save(img, cdir / "test_public" / "bad" / f"{defect}_{i:03d}.png")
            _save(
                mask.astype(np.float64),
                cdir / "test_public" / "ground_truth" / "bad" / f"{defect}_{i:03d}_mask.png",
            )
    unlabelled = [*s["good"][:1], *(pairs[0][0] for pairs in s["defects"].values() if pairs)]
    for i, img in enumerate(unlabelled):  # an unlabelled mix, as test_private_mixed
        _save(img, cdir / "test_private_mixed" / f"{i:03d}.png")


def _write_folder(cdir: Path, s: dict) -> None:
    for i, img in enumerate(s["train"]):
        _save(img, cdir / "normal" / f"{i:03d}.png")
    for i, img in enumerate(s["good"]):
        _save(img, cdir / "normal_test" / f"{i:03d}.png")
    for defect, pairs in s["defects"].items():
        for i, (img, mask) in enumerate(pairs):
            _save(img, cdir / "abnormal" / defect / f"{i:03d}.png")
            _save(mask.astype(np.float64), cdir / "masks" / defect / f"{i:03d}_mask.png")


def _write_visa(root: Path, category: str, s: dict) -> None:
    """VisA: images under Data/Images/{Normal,Anomaly}, 0/1 masks under Data/Masks/Anomaly, rows in split_csv/1cls.csv."""
    cdir = root / category / "Data"
    rows = []
    for i, img in enumerate(s["train"]):
        _save(img, cdir / "Images" / "Normal" / f"{i:04d}.png")
        rows.append([category, "train", "normal", f"{category}/Data/Images/Normal/{i:04d}.png", ""])
    tests = [("good", i, img, None) for i, img in enumerate(s["good"])]
    tests += [(d, i, img, m) for d, pairs in s["defects"].items() for i, (img, m) in enumerate(pairs)]
    n = len(s["train"])
    for k, (_defect, _, img, mask) in enumerate(
        sorted(tests, key=lambda t: (t[0], t[1]))
    ):  # MVTec AD's order
        if mask is None:
            _save(img, cdir / "Images" / "Normal" / f"{n + k:04d}.png")
            rows.append([category, "test", "normal", f"{category}/Data/Images/Normal/{n + k:04d}.png", ""])
        else:
            _save(img, cdir / "Images" / "Anomaly" / f"{k:03d}.png")
            path = cdir / "Masks" / "Anomaly" / f"{k:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8)).save(path)  # stored as 0/1, as in VisA
            rows.append([category, "test", "anomaly", f"{category}/Data/Images/Anomaly/{k:03d}.png",
                         f"{category}/Data/Masks/Anomaly/{k:03d}.png"])  # fmt: skip
    split = root / "split_csv" / "1cls.csv"
    split.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if split.is_file():
        with open(split, newline="") as fh:
            kept = [r for r in list(csv.reader(fh))[1:] if r and r[0] != category]
    with open(split, "w", newline="") as fh:
        csv.writer(fh).writerows([["object", "split", "label", "image", "mask"], *kept, *rows])


def generate_category(
    root: str | Path,
    category: str,
    seed: int = 0,
    size: int = 64,
    n_train: int = 64,
    n_test_good: int = 16,
    n_test_defect: int = 12,
    overwrite: bool = False,
    layout: str = "mvtec",
    n_validation: int = 4,
) -> Path:
    """Write one synthetic category under ``root`` in ``layout``; identical files for identical arguments.

    Every layout holds the same training and test images (and masks); ``mvtec_ad2`` also gets
    ``n_validation`` further defect-free images in ``validation/good`` and an unlabelled
    ``test_private_mixed``. ``folder`` writes ``<root>/<category>/{normal,normal_test,abnormal,masks}``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    cdir = Path(root) / category
    params = dict(version=VERSION, seed=seed, size=size, n_train=n_train, n_test_good=n_test_good,
                  n_test_defect=n_test_defect)  # fmt: skip
    if layout != "mvtec":  # stamps of MVTec-layout categories stay as they were
        params.update(layout=layout, n_validation=n_validation if layout == "mvtec_ad2" else 0)
    stamp = cdir / "synthetic.json"
    if stamp.is_file() and not overwrite and json.loads(stamp.read_text()) == params:
        return cdir
    s = _samples(seed, category, size, n_train, n_test_good, n_test_defect,
                 n_validation if layout == "mvtec_ad2" else 0)  # fmt: skip
    if layout == "mvtec":
        _write_mvtec(cdir, s)
    elif layout == "mvtec_ad2":
        _write_mvtec_ad2(cdir, s)
    elif layout == "folder":
        _write_folder(cdir, s)
    else:
        _write_visa(Path(root), category, s)
    cdir.mkdir(parents=True, exist_ok=True)
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
    ap.add_argument("--n-validation", type=int, default=4, help="validation/good images (mvtec_ad2 only)")
    ap.add_argument("--layout", choices=LAYOUTS, default="mvtec", help="folder layout to write")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    for c in a.categories:
        path = generate_category(
            a.root,
            c,
            a.seed,
            a.size,
            a.n_train,
            a.n_test_good,
            a.n_test_defect,
            a.overwrite,
            a.layout,
            a.n_validation,
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
