"""The VisA layout (Zou et al., ECCV 2022), as distributed, with its split file ``split_csv/1cls.csv``.

<root>/split_csv/1cls.csv                       columns object, split, label, image, mask
<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
<root>/<category>/Data/Masks/Anomaly/*.png

The CSV decides the split: ``split`` is ``train`` or ``test``, ``label`` ``normal`` or ``anomaly``,
``image`` and ``mask`` are paths relative to the root (``mask`` empty for normal images). Masks are
stored as 0/1 or 0/255: a pixel is defective where its stored value is non-zero
(``mask_rule="nonzero"``); after resizing a mask is binarized at 0.5. VisA has no defect types: every
defective test image has defect ``anomaly``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ebmad.data.io import DatasetError
from ebmad.data.layout import DatasetIndex, Problems, TestItem

NAME = "visa"
CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
OPTIONS: dict[str, Any] = {"split_csv": "split_csv/1cls.csv"}
COLUMNS = ("object", "split", "label", "image", "mask")
DEFECT = "anomaly"


def split_file(root: str | Path | None, split_csv: str) -> Path:
    """The split CSV (``data.split_csv``, relative to ``data.root`` unless absolute)."""
    if root is None or str(root) == "":
        raise DatasetError("data.root is not set: point it at the VisA folder (the one holding split_csv/)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} (data.root) "
            + ("is a file, not a folder" if root.is_file() else "does not exist")
        )
    path = Path(split_csv).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DatasetError(f"VisA split file {path} (data.split_csv) does not exist")
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"VisA split file {path} lacks the column(s) {', '.join(missing)}; it needs {', '.join(COLUMNS)}"
            )
        return [{k: (v or "").strip() for k, v in row.items() if k in COLUMNS} for row in reader]


def index(root: str | Path | None, category: str, problems: Problems, seed: int = 0,
          split_csv: str = OPTIONS["split_csv"]) -> DatasetIndex:  # fmt: skip
    """The VisA index of one category, from the split CSV."""
    path = split_file(root, split_csv)
    base = Path(root).expanduser()
    rows = read_rows(path)
    mine = [(n, r) for n, r in enumerate(rows, start=2) if r["object"] == category]  # line 1 is the header
    if not mine:
        found = sorted({r["object"] for r in rows})
        raise DatasetError(f"category '{category}' (data.category) has no rows in {path}; objects there: "
                           f"{found or 'none'}")  # fmt: skip
    train: list[Path] = []
    test: list[TestItem] = []
    seen: dict[Path, int] = {}
    for line, r in mine:
        where = f"{path} line {line}"
        if r["split"] not in ("train", "test"):
            problems.add(f"{where}: split {r['split']!r} is neither 'train' nor 'test'")
            continue
        if r["label"] not in ("normal", "anomaly"):
            problems.add(f"{where}: label {r['label']!r} is neither 'normal' nor 'anomaly'")
            continue
        image = base / r["image"]
        if not r["image"] or not image.is_file():
            problems.add(f"{where}: image file {image} does not exist")
            continue
        if image in seen:
            problems.add(f"{where}: image file {image} is listed again (first on line {seen[image]})")
            continue
        seen[image] = line
        mask = base / r["mask"] if r["mask"] else None
        if r["label"] == "normal":
            if mask is not None:
                problems.add(
                    f"{where}: normal image {image} is given a mask {mask}; only anomalies have masks"
                )
                continue
        elif r["split"] == "train":
            problems.add(
                f"{where}: anomalous image {image} is in the train split; training is on normal images"
            )
            continue
        elif mask is None:
            problems.add(f"{where}: anomalous test image {image} has no mask (empty mask column)")
            continue
        elif not mask.is_file():
            problems.add(f"{where}: mask file {mask} of {image} does not exist")
            continue
        if r["split"] == "train":
            train.append(image)
        else:
            test.append(TestItem(image, mask, "good" if mask is None else DEFECT, mask_rule="nonzero"))
    for split, items in (("train", train), ("test", test)):
        if not items and not problems:
            with problems.split(split):
                problems.add(
                    f"category '{category}' has no usable {split} rows in {path}: the {split} split is empty"
                )
    return DatasetIndex(
        train=train, test=test, train_source=f"the train rows of {category} in {path}", base=base / category
    )
