"""The one LightningDataModule of every dataset layout: decode once, keep tensors on the device, batch there.

``AnomalyDataModule(layout=..., root=..., category=..., **layout options)`` indexes the category with its
layout (:mod:`ebmad.data.layout`), then does the same for every layout: decoding with the accepted-image
rules (:mod:`ebmad.data.io`), resizing, channel detection, the label-free validation set (the layout's
defect-free validation images, or else a seeded ``val_fraction`` share of the training images, each
scored as is and with planted defects) and tensors kept on the training device. Images are decoded,
resized and dropped one at a time into preallocated tensors, so peak memory is the resized set plus
one decoded image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ebmad.data.io import DatasetError, image_channels, load_image, load_mask
from ebmad.data.layout import DatasetIndex, Problems, TestItem, build_index, category_dir, layout_options
from ebmad.data.loader import DeviceBatchLoader
from ebmad.synthesis import describe, validation_anomalies
from ebmad.synthesis import layout as validation_layout

log = logging.getLogger(__name__)


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


def decode_images(
    files: Sequence[Path], size: int, channels: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(N, C, size, size) images in [-1, 1] and their original (width, height), decoded one at a time."""
    out = torch.empty(len(files), channels, size, size)
    sizes = []
    for i, f in enumerate(files):
        img, orig = load_image(f, size, channels)
        out[i] = img
        sizes.append(orig)
    return out, sizes


def decode_test(items: Sequence[TestItem], size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images and their binary masks (all-false for defect-free images), one image at a time."""
    images = torch.empty(len(items), channels, size, size)
    masks = torch.zeros(len(items), size, size, dtype=torch.bool)
    for i, item in enumerate(items):
        img, orig = load_image(item.image, size, channels)
        images[i] = img
        if item.mask is not None:
            masks[i] = load_mask(item.mask, size, orig, item.image, rule=item.mask_rule)
    return images, masks


def false_alarm_summary(
    good_scores: Sequence[float] | torch.Tensor, image_threshold: float
) -> dict[str, Any]:
    """What a test set of defect-free images only can tell: the share flagged at the image threshold.

    A false alarm is a defect-free image whose score is >= ``image_threshold``. Image and pixel AUROC
    need defective images and cannot be computed.
    """
    scores = torch.as_tensor(good_scores, dtype=torch.float64).flatten()
    if not len(scores):
        raise ValueError("false_alarm_summary needs the scores of at least one defect-free test image")
    if not torch.isfinite(torch.tensor(image_threshold)):
        raise ValueError(f"the image threshold is {image_threshold}: fit the thresholds before the test")
    flagged = int((scores >= image_threshold).sum())
    return {
        "n_test_good": len(scores),
        "n_false_alarms": flagged,
        "false_alarm_rate": flagged / len(scores),
        "image_threshold": float(image_threshold),
        "note": "the test set holds defect-free images only: no defect AUROC can be computed (no image or "
        "pixel AUROC, AP, AUPRO); the false-alarm rate is the share of held-out defect-free images scored "
        ">= the image threshold",
    }


class AnomalyDataModule(pl.LightningDataModule):
    """Decodes a category once, keeps it as tensors on the training device, batches there."""

    def __init__(
        self,
        root: str | None = None,
        category: str = "",
        layout: str = "mvtec",
        image_size: int = 128,
        channels: int | None = None,
        batch_size: int = 32,
        test_batch_size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.0,
        test_good_gain: float | None = None,
        val_kinds: Sequence[str] = ("spots_scratches",),
        val_strengths: Sequence[float] = (1.0,),
        val_texture_dir: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        describe(val_kinds, seed, val_texture_dir, val_strengths)  # unknown kinds / bad strengths fail here
        self.val_kinds, self.val_strengths = list(val_kinds), [float(s) for s in val_strengths]
        self.val_texture_dir = val_texture_dir
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
        self.layout = layout
        self.options = layout_options(layout, options)  # an unknown data.* key fails here, naming it
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
        self._index: DatasetIndex | None = None
        self.test_needed = True  # False (a run with test=false): problems of the test split do not stop it
        self.test_problems: list[str] = []

    # ------------------------------------------------------------------ index
    @property
    def index(self) -> DatasetIndex:
        """The layout's index of the category (built on first use; raises :class:`DatasetError`)."""
        if self._index is None:
            problems = Problems(unused=() if self.test_needed else ("test",))
            self._index = build_index(self.layout, self.root, self.category, problems, seed=self.seed,
                                      **self.options)  # fmt: skip
            self.test_problems = problems.unused_messages
            if self.test_problems:
                log.warning("the test split is not used (test=false); it has problems: %s",
                            "; ".join(self.test_problems))  # fmt: skip
            if self._index.validation and self.val_fraction > 0:
                raise ValueError(
                    f"data.val_fraction={self.val_fraction}: data.layout={self.layout} provides its own "
                    f"{len(self._index.validation)} defect-free validation images; set data.val_fraction=0"
                )
        return self._index

    @property
    def category_dir(self) -> Path:
        """The category's folder (for folder layouts: the folder holding the configured folders)."""
        return self.index.base or category_dir(self.root, self.category)

    @property
    def has_validation(self) -> bool:
        """Whether there is a label-free validation set (layout validation images or ``val_fraction`` > 0)."""
        return bool(self.val_fraction > 0 or self.index.validation)

    @property
    def has_defects(self) -> bool:
        """Whether the test set holds defective images; without them no AUROC can be computed."""
        return any(it.label for it in self.index.test)

    @property
    def has_masks(self) -> bool:
        """Whether every defective test image has a mask (pixel metrics need them)."""
        return self.has_defects and all(it.mask is not None for it in self.index.test if it.label)

    @property
    def num_channels(self) -> int:
        """1 for grayscale categories (every training image grayscale), else 3."""
        if self._channels is None:
            self._channels = category_channels(self.index.train)
        return self._channels

    # ------------------------------------------------------------------ tensors
    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _dist(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def load_train(self) -> dict[str, torch.Tensor]:
        """Training images; the validation set from the layout's validation images or a ``val_fraction`` share."""
        if self.train_data is None:
            index = self.index
            files, held_files = list(index.train), list(index.validation)
            n_val = 0 if held_files else int(round(self.val_fraction * len(files)))
            if n_val:  # a seeded share, split before decoding (no second copy of the training tensor)
                order = torch.randperm(
                    len(files), generator=torch.Generator().manual_seed(self.seed)
                ).tolist()
                held_files, files = [files[i] for i in order[:n_val]], [files[i] for i in order[n_val:]]
            imgs, _ = decode_images(files, self.image_size, self.num_channels)
            held = decode_images(held_files, self.image_size, self.num_channels)[0] if held_files else None
            if held is not None:  # held-out good images + the same with synthetic anomalies (ebmad.synthesis)
                bad, masks, kind = validation_anomalies(held, self.val_kinds, seed=self.seed,
                                                        texture_dir=self.val_texture_dir,
                                                        strengths=self.val_strengths)  # fmt: skip
                n, m, dev = len(held), len(bad), self._device()
                _, strength, _ = validation_layout(n, len(self.val_kinds), len(self.val_strengths))
                self.val_data = {
                    "image": torch.cat([held, bad]).to(dev),
                    "mask": torch.cat([torch.zeros(n, *masks.shape[1:], dtype=torch.bool), masks.bool()]).to(
                        dev
                    ),
                    "label": torch.cat([torch.zeros(n), torch.ones(m)]).long().to(dev),
                    "kind": torch.cat([torch.full((n,), -1), kind]).to(dev),
                    "strength": torch.cat([torch.full((n,), -1), strength]).to(dev),
                    "index": torch.arange(n + m, device=dev),
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
        if self.test_problems:  # read although the run said it would not (test=false)
            raise DatasetError(self.test_problems[0])
        if self.test_data is None:
            self.test_meta = list(self.index.test)
            images, masks = decode_test(self.test_meta, self.image_size, self.num_channels)
            if self.test_good_gain is not None:  # an illumination shift of the defect-free test images only
                good = torch.tensor([it.label == 0 for it in self.test_meta])
                images[good] = shift_brightness(images[good], self.test_good_gain)
            device = self._device()
            self.test_data = {
                "image": images.to(device),
                "mask": masks.to(device),
                "label": torch.tensor([it.label for it in self.test_meta], device=device),
                "index": torch.arange(len(self.test_meta), device=device),
            }
        return self.test_data

    def unlabelled_images(self, split: str) -> list[Path]:
        """The image files of an unlabelled split of the layout (MVTec AD 2 ``test_private``), to score."""
        splits = self.index.unlabelled
        if split not in splits:
            raise DatasetError(f"data.layout={self.layout} has no unlabelled split {split!r} for category "
                               f"{self.category}; found: {sorted(splits) or 'none'}")  # fmt: skip
        return splits[split]

    # ------------------------------------------------------------------ Lightning
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
                f"in {self.index.train_source}"
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
