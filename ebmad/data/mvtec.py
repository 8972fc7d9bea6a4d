"""The MVTec AD layout (Bergmann et al., CVPR 2019).

<root>/<category>/train/good/*.png
<root>/<category>/test/<defect>/*.png          (defect "good" = defect free)
<root>/<category>/ground_truth/<defect>/<stem>_mask.png   (also <stem>_mask.<ext> or <stem>.<ext>)

Hidden files and folders (``.DS_Store``, ``._x.png``, ``.ipynb_checkpoints``, ``Thumbs.db``) are
ignored. Which images are accepted and how they are converted: :mod:`ebmad.data.io`. Masks: a pixel
is defective above half of full scale (``mask_rule="half"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ebmad.data.datamodule import AnomalyDataModule, category_channels, shift_brightness
from ebmad.data.io import DatasetError, is_hidden, list_images
from ebmad.data.layout import DatasetIndex, Problems, TestItem, category_dir

NAME = "mvtec"
CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MVTEC_CATEGORIES = CATEGORIES
OPTIONS: dict[str, Any] = {}

__all__ = [
    "CATEGORIES", "MVTEC_CATEGORIES", "MVTecDataModule", "TestItem", "category_channels", "category_dir",
    "index", "mask_index", "shift_brightness", "test_items", "train_files",
]  # fmt: skip


def image_folder(folder: Path, what: str) -> list[Path]:
    """The images of a folder that must exist and hold some, or a :class:`DatasetError` naming it."""
    if not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} does not exist")
    files = list_images(folder)
    if not files:
        raise DatasetError(f"{what} folder {folder} contains no images")
    return files


def train_files(cdir: Path) -> list[Path]:
    return image_folder(cdir / "train" / "good", "training")


def mask_index(gt_dir: Path) -> dict[str, Path]:
    """Mask files of a ground-truth folder by stem, a ``.png`` preferred when several share a stem."""
    files = sorted(list_images(gt_dir), key=lambda p: (p.suffix.lower() != ".png", p.name))
    index: dict[str, Path] = {}
    for p in files:
        index.setdefault(p.stem, p)
    return index


def defect_items(ddir: Path, gt_dir: Path, defect: str, problems: Problems) -> list[TestItem]:
    """The defective images of ``ddir`` with their masks in ``gt_dir`` (``<stem>_mask.<ext>`` or ``<stem>.<ext>``)."""
    images = list_images(ddir)
    if images and not gt_dir.is_dir():
        problems.add(
            f"ground-truth folder {gt_dir} does not exist, but {ddir} holds defective test images: "
            f"defective test image {images[0]} has no mask; expected {gt_dir / f'{images[0].stem}_mask.png'}"
        )
        return []
    masks = mask_index(gt_dir) if images else {}
    items = []
    for img in images:
        mask = masks.get(f"{img.stem}_mask") or masks.get(img.stem)
        if mask is None:
            problems.add(
                f"defective test image {img} has no mask; expected {gt_dir / f'{img.stem}_mask.png'}"
            )
            continue
        items.append(TestItem(img, mask, defect))
    return items


def test_items(cdir: Path, problems: Problems | None = None) -> list[TestItem]:
    """Test images with their masks: ``<stem>_mask.<ext>`` (MVTec) or else ``<stem>.<ext>`` in ground_truth."""
    problems = problems if problems is not None else Problems()
    folder = cdir / "test"
    if not folder.is_dir():
        problems.add(f"test folder {folder} does not exist")
        return []
    items: list[TestItem] = []
    for ddir in sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)):
        if ddir.name == "good":
            items += [TestItem(img, None, "good") for img in list_images(ddir)]
        else:
            items += defect_items(ddir, cdir / "ground_truth" / ddir.name, ddir.name, problems)
    if not items and not problems:
        problems.add(f"test folder {folder} contains no images")
    return items


def index(root: str | Path | None, category: str, problems: Problems, seed: int = 0) -> DatasetIndex:
    """The MVTec AD index of one category."""
    cdir = category_dir(root, category)
    train = problems.run(train_files, cdir, default=[])
    with problems.split("test"):
        test = test_items(cdir, problems)
    return DatasetIndex(train=train, test=test, train_source=str(cdir / "train" / "good"), base=cdir)


class MVTecDataModule(AnomalyDataModule):
    """:class:`AnomalyDataModule` with the MVTec AD layout (kept for code written against it)."""

    def __init__(self, root: str, category: str, **kwargs: Any) -> None:
        if kwargs.pop("layout", NAME) != NAME:
            raise ValueError(
                "MVTecDataModule reads the MVTec AD layout only: use AnomalyDataModule(layout=...)"
            )
        super().__init__(root=root, category=category, layout=NAME, **kwargs)
