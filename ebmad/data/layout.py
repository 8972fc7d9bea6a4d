"""Dataset layouts: each turns (root, category, options) into a :class:`DatasetIndex` of files.

A layout only indexes files; decoding, resizing, channel detection, the validation split and planted
defects are shared (:class:`ebmad.data.datamodule.AnomalyDataModule`). The layouts:

- ``mvtec``: MVTec AD (:mod:`ebmad.data.mvtec`)
- ``visa``: VisA with its ``split_csv/1cls.csv`` (:mod:`ebmad.data.visa`)
- ``mvtec_ad2``: MVTec AD 2 (:mod:`ebmad.data.mvtec_ad2`)
- ``folder``: any folders of your own (:mod:`ebmad.data.folder`)

Each layout module defines ``NAME``, ``CATEGORIES`` (empty for ``folder``), ``OPTIONS`` (its extra
``data.*`` keys with defaults) and ``index(root, category, problems, **options)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ebmad.data.io import DatasetError, is_hidden
from ebmad.run.metadata import did_you_mean

LAYOUTS = ("mvtec", "visa", "mvtec_ad2", "folder")
MASK_RULES = ("half", "nonzero")


@dataclass(frozen=True)
class TestItem:
    """One test image: its mask (None for a defect-free image) and its defect type ("good" = defect free).

    ``mask_rule``: how stored mask values become defective pixels (see :func:`ebmad.data.io.load_mask`):
    ``half`` (> half of full scale, MVTec) or ``nonzero`` (any non-zero value, VisA).
    """

    __test__ = False  # not a pytest test class

    image: Path
    mask: Path | None
    defect: str
    mask_rule: str = "half"

    @property
    def label(self) -> int:
        return int(self.defect != "good")


@dataclass
class DatasetIndex:
    """The files of one category: training images, defect-free validation images, test items.

    ``validation``: defect-free images never trained on that the layout provides (MVTec AD 2
    ``validation/good``); empty when the layout has none (then ``data.val_fraction`` holds out a share of
    ``train``). ``base``: the category's folder. ``unlabelled``: extra splits without labels, by name (MVTec AD 2 ``test_private``), that
    can be scored but not evaluated. ``train_source``: the folder or setting the training images come
    from, for messages.
    """

    train: list[Path]
    test: list[TestItem]
    validation: list[Path] = field(default_factory=list)
    unlabelled: dict[str, list[Path]] = field(default_factory=dict)
    train_source: str = ""
    base: Path | None = None  # the category's folder (paths in reports are shown relative to it)

    @property
    def masks(self) -> int:
        return sum(it.mask is not None for it in self.test)


class Problems:
    """Collects dataset problems: raises the first at once (``strict``) or keeps them all (the data check)."""

    def __init__(self, strict: bool = True, unused: Sequence[str] = ()) -> None:
        self.strict = strict
        self.messages: list[str] = []
        self.unused = tuple(unused)  # splits the run does not read (e.g. "test" with test=false)
        self.unused_messages: list[str] = []  # their problems: kept, raised only if the split is read
        self._split: str | None = None

    @contextmanager
    def split(self, name: str) -> Iterator[None]:
        """Problems added inside concern split ``name``; for an ``unused`` split they are only recorded."""
        outer, self._split = self._split, name
        try:
            yield
        finally:
            self._split = outer

    def add(self, message: str) -> None:
        if self._split is not None and self._split in self.unused:
            if message not in self.unused_messages:
                self.unused_messages.append(message)
            return
        if self.strict:
            raise DatasetError(message)
        if message not in self.messages:
            self.messages.append(message)

    def run(self, fn: Callable[..., Any], *args: Any, default: Any = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a :class:`DatasetError` it raises recorded (non-strict) and ``default`` returned."""
        try:
            return fn(*args, **kwargs)
        except DatasetError as exc:
            if self.strict:
                raise
            self.add(str(exc))
            return default

    def __bool__(self) -> bool:
        return bool(self.messages)


def layout_module(name: str) -> ModuleType:
    """The module implementing layout ``name`` (``data.layout``)."""
    if name not in LAYOUTS:
        raise ValueError(f"data.layout={name!r} is not a dataset layout; choose from {', '.join(LAYOUTS)}")
    return importlib.import_module(f"ebmad.data.{name}")


def get_layout(name: str) -> ModuleType:
    """Alias of :func:`layout_module`."""
    return layout_module(name)


def categories(name: str) -> list[str]:
    """The published categories of a layout (empty for ``folder``: its category is your own)."""
    return list(layout_module(name).CATEGORIES)


def layout_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The layout's options with defaults filled in; an unknown ``data.*`` key is an error naming it."""
    known = layout_module(name).OPTIONS
    unknown = sorted(set(options) - set(known))
    if unknown:
        others = [n for n in LAYOUTS if n != name and set(unknown) <= set(layout_module(n).OPTIONS)]
        hint = f" (options of data={others[0]})" if others else ""
        raise ValueError(
            f"data.{unknown[0]} is not a setting of data.layout={name}{hint}; its settings: "
            f"{', '.join(f'data.{k}' for k in known) or 'none'}"
        )
    return {**known, **options}


def build_index(name: str, root: str | Path | None, category: str, problems: Problems | None = None,
                seed: int = 0, **options: Any) -> DatasetIndex:  # fmt: skip
    """Index one category with layout ``name``; raises :class:`DatasetError` unless ``problems`` collects.

    ``seed`` (``data.seed``) decides seeded splits a layout makes itself (Folder's held-out test share).
    """
    problems = problems if problems is not None else Problems()
    return layout_module(name).index(root, category, problems, seed=seed, **layout_options(name, options))


def category_dir(root: str | Path | None, category: str) -> Path:
    """The category folder, or a :class:`DatasetError` naming what is missing."""
    if root is None or str(root) == "":
        raise DatasetError("data.root is not set: point it at the dataset folder")
    root = Path(root).expanduser()
    if root.is_file():
        raise DatasetError(f"dataset root {root} (data.root) is a file, not a folder: point it at the folder "
                           f"that holds the category folders (e.g. {root.parent})")  # fmt: skip
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} (data.root) does not exist")
    cdir = root / category
    if not cdir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p))
        raise DatasetError(
            f"category '{category}' (data.category) not found under {root}; folders there: {found or 'none'}"
            f"{did_you_mean(category, found, prefix='data.category=')}"
        )
    return cdir
