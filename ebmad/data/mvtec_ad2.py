"""The MVTec AD 2 layout (Heckler-Kram et al., 2025).

<root>/<category>/train/good/*.png
<root>/<category>/validation/good/*.png          defect-free, never trained on: validation and thresholds
<root>/<category>/test_public/{good,bad}/*.png
<root>/<category>/test_public/ground_truth/bad/<stem>_mask.png
<root>/<category>/test_private/, test_private_mixed/   unlabelled: scored, not evaluated

Masks: defective above half of full scale (as MVTec AD). The images are several megapixels; the
datamodule decodes, resizes and drops them one at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ebmad.data.io import IMAGE_SUFFIXES, is_hidden, list_images
from ebmad.data.layout import DatasetIndex, Problems, TestItem, category_dir
from ebmad.data.mvtec import defect_items, image_folder, mask_index

NAME = "mvtec_ad2"
CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
OPTIONS: dict[str, Any] = {}
UNLABELLED = ("test_private", "test_private_mixed")


def images_below(folder: Path) -> list[Path]:
    """Every image under ``folder``, at any depth, sorted by relative path (hidden files and folders left out)."""
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
         and not any(is_hidden(Path(part)) for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )  # fmt: skip


def index(root: str | Path | None, category: str, problems: Problems, seed: int = 0) -> DatasetIndex:
    """The MVTec AD 2 index of one category; ``validation/good`` is the label-free validation set."""
    cdir = category_dir(root, category)
    train = problems.run(image_folder, cdir / "train" / "good", "training", default=[])
    validation = problems.run(image_folder, cdir / "validation" / "good", "validation", default=[])
    public = cdir / "test_public"
    with problems.split("test"):
        test: list[TestItem] = []
        if not public.is_dir():
            problems.add(f"test folder {public} does not exist")
        else:
            bad, gt = public / "bad", public / "ground_truth" / "bad"
            if bad.is_dir():  # "bad" before "good": sorted by defect type, as MVTec AD's test folders
                items = defect_items(bad, gt, "bad", problems)
                test += items
                if gt.is_dir():
                    used = {it.mask for it in items}
                    for mask in mask_index(gt).values():
                        if mask not in used:
                            problems.add(f"mask {mask} has no image in {bad}")
            if (public / "good").is_dir():
                test += [TestItem(p, None, "good") for p in list_images(public / "good")]
            if not test and not problems:
                problems.add(
                    f"test folder {public} holds no images in good/ or bad/: the test split is empty"
                )
    unlabelled = {s: images_below(cdir / s) for s in UNLABELLED if (cdir / s).is_dir()}
    return DatasetIndex(train=train, test=test, validation=validation, unlabelled=unlabelled,
                        train_source=str(cdir / "train" / "good"), base=cdir)  # fmt: skip
