"""The Folder layout: your own images, any nesting, any accepted image format.

    data=folder data.normal_dir=DIR [data.abnormal_dir=DIR data.mask_dir=DIR data.normal_test_dir=DIR]

- ``normal_dir``: defect-free images (training).
- ``normal_test_dir``: defect-free test images; without it a seeded share ``normal_test_fraction`` of
  ``normal_dir`` is held out as defect-free test images (never trained on).
- ``abnormal_dir``: defective test images; the defect type is an image's first sub-folder (``defect``
  for images directly in it).
- ``mask_dir``: masks of the defective images, matched by relative path and stem, never by sort order:
  ``abnormal_dir/a/x.png`` takes ``mask_dir/a/x.<ext>`` or ``mask_dir/a/x_mask.<ext>``. An image without
  a mask, a mask without an image, two images with one stem in one folder and two masks for one image
  are each an error naming the files. Without ``mask_dir`` there are image labels only (no pixel metrics).

Relative folders are taken relative to ``data.root`` when it is set. With ``normal_dir`` only, the test
set is defect-free: thresholds are fitted and stored, and the run reports the false-alarm rate on the
held-out images; no defect AUROC can be computed. Masks: defective above half of full scale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ebmad.data.io import DatasetError
from ebmad.data.layout import DatasetIndex, Problems, TestItem
from ebmad.data.mvtec_ad2 import images_below

NAME = "folder"
CATEGORIES: tuple[str, ...] = ()
OPTIONS: dict[str, Any] = {
    "normal_dir": None, "abnormal_dir": None, "mask_dir": None, "normal_test_dir": None,
    "normal_test_fraction": 0.2,
}  # fmt: skip
DEFAULT_DEFECT = "defect"


def resolve(root: str | Path | None, value: str | None, key: str) -> Path | None:
    """Folder setting ``data.<key>`` as a path (relative to ``data.root`` when set), checked to exist."""
    if value is None or str(value) == "":
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and root not in (None, ""):
        path = Path(root).expanduser() / path
    if not path.is_dir():
        raise DatasetError(f"data.{key}={value}: folder {path} does not exist")
    return path


def stem_index(folder: Path, files: list[Path], what: str, problems: Problems,
               strip_mask: bool = False) -> dict[tuple[str, str], Path]:  # fmt: skip
    """Files by (relative folder, stem); two files with one key are an error naming both."""
    out: dict[tuple[str, str], Path] = {}
    for f in files:
        rel = f.relative_to(folder)
        stem = f.stem[: -len("_mask")] if strip_mask and f.stem.endswith("_mask") else f.stem
        key = (rel.parent.as_posix(), stem)
        if key in out:
            problems.add(f"{what} {out[key]} and {f} have one stem: rename one (files are matched by stem)")
            continue
        out[key] = f
    return out


def images(folder: Path, key: str, problems: Problems) -> list[Path]:
    files = images_below(folder)
    if not files:
        problems.add(f"data.{key}: folder {folder} contains no images")
    stem_index(folder, files, "images", problems)
    return files


def held_out(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(kept, held out): a seeded ``fraction`` of ``files``, both in their listed order."""
    n = int(round(fraction * len(files)))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    out = set(order[:n])
    return [f for i, f in enumerate(files) if i not in out], [f for i, f in enumerate(files) if i in out]


def abnormal_items(abnormal: Path, mask_dir: Path | None, problems: Problems) -> list[TestItem]:
    files = images(abnormal, "abnormal_dir", problems)
    by_stem = stem_index(abnormal, files, "images", Problems(strict=False))  # duplicates reported above
    masks: dict[tuple[str, str], Path] = {}
    if mask_dir is not None:
        masks = stem_index(mask_dir, images_below(mask_dir), "masks", problems, strip_mask=True)
        for key, mask in masks.items():
            if key not in by_stem:
                problems.add(f"mask {mask} has no image in data.abnormal_dir={abnormal} "
                             f"(expected {abnormal / key[0] / key[1]}.<ext>)")  # fmt: skip
    items = []
    for key, img in by_stem.items():
        parts = img.relative_to(abnormal).parts
        defect = parts[0] if len(parts) > 1 else DEFAULT_DEFECT
        if defect == "good":
            problems.add(f"data.abnormal_dir={abnormal} has a sub-folder 'good': its images would count as "
                         "defect free; move them to data.normal_test_dir")  # fmt: skip
            return []
        mask = masks.get(key)
        if mask_dir is not None and mask is None:
            problems.add(f"defective image {img} has no mask in data.mask_dir={mask_dir}; expected "
                         f"{mask_dir / key[0] / key[1]}.png or {mask_dir / key[0] / key[1]}_mask.png")  # fmt: skip
            continue
        items.append(TestItem(img, mask, defect))
    return items


def index(root: str | Path | None, category: str, problems: Problems, seed: int = 0, normal_dir: str | None = None,
          abnormal_dir: str | None = None, mask_dir: str | None = None, normal_test_dir: str | None = None,
          normal_test_fraction: float = 0.2) -> DatasetIndex:  # fmt: skip
    """The index of your own folders; the test items sorted by defect type ("good" among them), then path."""
    if not 0.0 <= normal_test_fraction < 1.0:
        raise ValueError(f"data.normal_test_fraction must be in [0, 1), got {normal_test_fraction}")
    normal = resolve(root, normal_dir, "normal_dir")
    if normal is None:
        raise DatasetError("data=folder needs data.normal_dir=<folder of defect-free images>")
    abnormal = problems.run(resolve, root, abnormal_dir, "abnormal_dir")
    masks = problems.run(resolve, root, mask_dir, "mask_dir")
    normal_test = problems.run(resolve, root, normal_test_dir, "normal_test_dir")
    if masks is not None and abnormal is None and abnormal_dir in (None, ""):
        problems.add(
            f"data.mask_dir={mask_dir} is set but data.abnormal_dir is not: masks need defective images"
        )
    train = images(normal, "normal_dir", problems)
    source = f"data.normal_dir={normal}"
    if normal_test is not None:
        good = images(normal_test, "normal_test_dir", problems)
    else:
        train, good = held_out(train, normal_test_fraction, seed)
        source += f" (less the data.normal_test_fraction={normal_test_fraction} held out for testing)"
        if train and not good:
            problems.add(f"no defect-free test images: set data.normal_test_dir or data.normal_test_fraction > 0 "
                         f"(now {normal_test_fraction}) to hold some of data.normal_dir={normal} out")  # fmt: skip
        elif good and not train:
            problems.add(f"data.normal_test_fraction={normal_test_fraction} leaves no training images of "
                         f"data.normal_dir={normal}")  # fmt: skip
    test = [TestItem(p, None, "good") for p in good]
    if abnormal is not None:
        test += abnormal_items(abnormal, masks, problems)
        folders = {"good": normal_test or normal, **{it.defect: abnormal for it in test if it.label}}
        test.sort(key=lambda it: (it.defect, it.image.relative_to(folders[it.defect]).as_posix()))
    base = Path(os.path.commonpath([p for p in (normal, normal_test, abnormal) if p is not None]))
    return DatasetIndex(train=train, test=test, train_source=source, base=base)
