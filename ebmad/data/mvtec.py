"""LightningDataModule for the MVTec AD folder layout.

<root>/<category>/train/good/*.png
<root>/<category>/test/<defect>/*.png          (defect "good" = defect free)
<root>/<category>/ground_truth/<defect>/<stem>_mask.png   (also <stem>_mask.<ext> or <stem>.<ext>)

Hidden files and folders (``.DS_Store``, ``._x.png``, ``.ipynb_checkpoints``, ``Thumbs.db``) are
ignored. Which images are accepted and how they are converted: :mod:`ebmad.data.io`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

from ebmad.data.corruption import plant_defects
from ebmad.data.io import DatasetError, image_channels, is_hidden, list_images, load_image, load_mask
from ebmad.data.loader import DeviceBatchLoader

log = logging.getLogger(__name__)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip


@dataclass
class TestItem:
    image: Path
    mask: Path | None
    defect: str

    @property
    def label(self) -> int:
        return int(self.defect != "good")


def category_dir(root: str | Path, category: str) -> Path:
    """The category folder, or a :class:`DatasetError` naming what is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} (data.root) does not exist or is not a folder")
    cdir = root / category
    if not cdir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p))
        raise DatasetError(
            f"category '{category}' (data.category) not found under {root}; folders there: {found or 'none'}"
        )
    return cdir


def train_files(cdir: Path) -> list[Path]:
    folder = cdir / "train" / "good"
    if not folder.is_dir():
        raise DatasetError(f"training folder {folder} does not exist")
    files = list_images(folder)
    if not files:
        raise DatasetError(f"training folder {folder} contains no images")
    return files


def mask_index(gt_dir: Path) -> dict[str, Path]:
    """Mask files of a ground-truth folder by stem, a ``.png`` preferred when several share a stem."""
    files = sorted(list_images(gt_dir), key=lambda p: (p.suffix.lower() != ".png", p.name))
    index: dict[str, Path] = {}
    for p in files:
        index.setdefault(p.stem, p)
    return index


def test_items(cdir: Path) -> list[TestItem]:
    """Test images with their masks: ``<stem>_mask.<ext>`` (MVTec) or else ``<stem>.<ext>`` in ground_truth."""
    folder = cdir / "test"
    if not folder.is_dir():
        raise DatasetError(f"test folder {folder} does not exist")
    items: list[TestItem] = []
    for ddir in sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)):
        images = list_images(ddir)
        if ddir.name == "good":
            items += [TestItem(img, None, "good") for img in images]
            continue
        gt_dir = cdir / "ground_truth" / ddir.name
        if images and not gt_dir.is_dir():
            raise DatasetError(
                f"ground-truth folder {gt_dir} does not exist, but {ddir} holds defective test images: "
                f"defective test image {images[0]} has no mask; expected {gt_dir / f'{images[0].stem}_mask.png'}"
            )
        masks = mask_index(gt_dir) if images else {}
        for img in images:
            mask = masks.get(f"{img.stem}_mask") or masks.get(img.stem)
            if mask is None:
                raise DatasetError(
                    f"defective test image {img} has no mask; expected {gt_dir / f'{img.stem}_mask.png'}"
                )
            items.append(TestItem(img, mask, ddir.name))
    if not items:
        raise DatasetError(f"test folder {folder} contains no images")
    return items


def category_channels(files: list[Path]) -> int:
    """3 if any of the images is in colour, else 1 (reads headers only); logs a warning when they mix."""
    channels = [image_channels(f) for f in files]
    n_colour = sum(c == 3 for c in channels)
    if 0 < n_colour < len(channels):
        folder = files[0].parent
        log.warning(
            "%s mixes %d grayscale and %d colour images: using 3 channels (grayscale images replicated)",
            folder, len(channels) - n_colour, n_colour,
        )  # fmt: skip
    return 3 if n_colour else 1


def shift_brightness(images: torch.Tensor, gain: float) -> torch.Tensor:
    """Images in [-1, 1] with their [0, 1] intensities multiplied by ``gain`` (clamped): a global lighting change."""
    return ((images + 1) / 2 * gain).clamp(0, 1) * 2 - 1


class MVTecDataModule(pl.LightningDataModule):
    """Decodes a category once, keeps it as tensors on the training device, batches there."""

    def __init__(
        self,
        root: str,
        category: str,
        image_size: int = 128,
        channels: int | None = None,
        batch_size: int = 32,
        test_batch_size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.0,
        test_good_gain: float | None = None,
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"data.image_size must be >= 8, got {image_size}")
        if channels not in (None, 1, 3):
            raise ValueError(f"data.channels must be null (auto), 1 or 3, got {channels}")
        if batch_size < 1 or test_batch_size < 1:
            raise ValueError(
                f"data.batch_size and data.test_batch_size must be >= 1, got {batch_size}, {test_batch_size}"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if test_good_gain is not None and not 0 < test_good_gain <= 2:
            raise ValueError(f"data.test_good_gain must be null or in (0, 2], got {test_good_gain}")
        self.test_good_gain = test_good_gain
        self.val_fraction = val_fraction
        self.val_data: dict[str, torch.Tensor] | None = None
        self.root = root
        self.category = category
        self.image_size = image_size
        self._channels = channels
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.seed = seed
        self.train_data: dict[str, torch.Tensor] | None = None
        self.test_data: dict[str, torch.Tensor] | None = None
        self.test_meta: list[TestItem] = []

    @property
    def category_dir(self) -> Path:
        return category_dir(self.root, self.category)

    @property
    def num_channels(self) -> int:
        """1 for grayscale categories (every training image grayscale), else 3."""
        if self._channels is None:
            self._channels = category_channels(train_files(self.category_dir))
        return self._channels

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _dist(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def load_train(self) -> dict[str, torch.Tensor]:
        """Training images; with ``val_fraction`` > 0 a seeded share of them is held out for validation."""
        if self.train_data is None:
            files = train_files(self.category_dir)
            imgs = torch.stack([load_image(f, self.image_size, self.num_channels)[0] for f in files])
            n_val = int(round(self.val_fraction * len(imgs)))
            if n_val:
                order = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(self.seed))
                held, imgs = imgs[order[:n_val]], imgs[order[n_val:]]
                bad, masks = plant_defects(held, seed=self.seed)
                n = len(held)
                self.val_data = {
                    "image": torch.cat([held, bad]).to(self._device()),
                    "mask": torch.cat([torch.zeros_like(masks), masks]).to(self._device()),
                    "label": torch.cat([torch.zeros(n), torch.ones(n)]).long().to(self._device()),
                    "index": torch.arange(2 * n, device=self._device()),
                }
            self.train_data = {"image": imgs.to(self._device())}
        return self.train_data

    def validation_dataloader(self) -> DeviceBatchLoader:
        """Held-out good images and the same images with planted defects (no test data involved)."""
        self.load_train()
        if self.val_data is None:
            raise ValueError("no validation data: set data.val_fraction > 0")
        return DeviceBatchLoader(self.val_data, self.test_batch_size)

    def load_test(self) -> dict[str, torch.Tensor]:
        if self.test_data is None:
            self.test_meta = test_items(self.category_dir)
            imgs, masks = [], []
            for item in self.test_meta:
                img, orig = load_image(item.image, self.image_size, self.num_channels)
                imgs.append(img)
                if item.mask is None:
                    masks.append(torch.zeros(self.image_size, self.image_size, dtype=torch.bool))
                else:
                    masks.append(load_mask(item.mask, self.image_size, orig, item.image))
            device = self._device()
            images = torch.stack(imgs)
            if self.test_good_gain is not None:  # an illumination shift of the defect-free test images only
                good = torch.tensor([it.label == 0 for it in self.test_meta])
                images[good] = shift_brightness(images[good], self.test_good_gain)
            self.test_data = {
                "image": images.to(device),
                "mask": torch.stack(masks).to(device),
                "label": torch.tensor([it.label for it in self.test_meta], device=device),
                "index": torch.arange(len(self.test_meta), device=device),
            }
        return self.test_data

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.load_train()
        if stage in (None, "test", "predict"):
            self.load_test()

    def train_dataloader(self) -> DeviceBatchLoader:
        data = self.load_train()
        rank, world = self._dist()
        n_per_rank = len(data["image"]) // world
        if n_per_rank < self.batch_size:
            raise DatasetError(
                f"data.batch_size={self.batch_size} exceeds the {n_per_rank} training images per process "
                f"in {self.category_dir / 'train' / 'good'}"
            )
        trainer = self.trainer
        return DeviceBatchLoader(
            data, self.batch_size, shuffle=True, drop_last=True, seed=self.seed, rank=rank, world_size=world,
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
        )  # fmt: skip

    def stats_dataloader(self) -> DeviceBatchLoader:
        """Every training image once, in order, sharded across ranks: for the gradient statistics."""
        rank, world = self._dist()
        return DeviceBatchLoader(self.load_train(), self.test_batch_size, rank=rank, world_size=world)

    def test_dataloader(self) -> DeviceBatchLoader:
        rank, world = self._dist()
        return DeviceBatchLoader(self.load_test(), self.test_batch_size, rank=rank, world_size=world)
