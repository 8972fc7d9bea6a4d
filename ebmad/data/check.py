"""Check a dataset without training: ``python -m ebmad.data.check data=<layout> data.root=... [overrides]``.

Console script ``ebmad-data-check``. The data config is composed as ``ebmad.train`` composes it (the
same ``data=...`` and ``data.*`` overrides). For each category (``data.category``, or ``--all`` for
every category of the layout found under the root, or ``--categories a b``) it prints the counts
(train / validation / test good / test defective / masks), the image sizes and modes, the detected
channels and every problem the loader would raise, all at once: every image and mask is decoded the
way training decodes it. The exit status is 1 when there is a problem.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from ebmad.data.datamodule import AnomalyDataModule, category_channels
from ebmad.data.io import DatasetError, load_image, load_mask
from ebmad.data.layout import DatasetIndex, Problems, build_index, categories, layout_options
from ebmad.run.metadata import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf"
# the datamodule's own settings (the rest of data.* are layout options): from its signature, one source
DATAMODULE_KEYS = ("_target_", "synthetic", *(name for name, p in inspect.signature(AnomalyDataModule).parameters.items()
                                              if p.kind is not inspect.Parameter.VAR_KEYWORD))  # fmt: skip


def data_config(overrides: list[str]) -> dict[str, Any]:
    """``cfg.data`` of ``conf/train.yaml`` with these overrides, resolved."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg.data, resolve=True)


def _describe(counter: Counter, limit: int = 4) -> str:
    parts = [f"{k} x{n}" for k, n in counter.most_common(limit)]
    if len(counter) > limit:
        parts.append(f"... ({len(counter)} kinds)")
    return ", ".join(parts) or "none"


def scan_images(index: DatasetIndex, channels: int, problems: Problems) -> tuple[Counter, Counter]:
    """Decode every image and mask as training does (one at a time); (sizes, modes) counted."""
    sizes: Counter = Counter()
    modes: Counter = Counter()
    files = [*index.train, *index.validation, *(it.image for it in index.test)]
    masks = {it.image: it for it in index.test if it.mask is not None}
    for f in files:
        try:
            with Image.open(f) as img:
                modes[img.mode] += 1
        except Exception:  # load_image below names the file
            pass
        try:
            _, orig = load_image(f, 8, channels)
        except DatasetError as exc:
            problems.add(str(exc))
            continue
        sizes[f"{orig[0]}x{orig[1]}"] += 1
        item = masks.get(f)
        if item is not None:
            problems.run(load_mask, item.mask, 8, orig, item.image, rule=item.mask_rule)
    return sizes, modes


def check_category(data: dict[str, Any], category: str) -> list[str]:
    """Print one category's summary; returns its problems."""
    layout = data.get("layout", "mvtec")
    options = {k: v for k, v in data.items() if k not in DATAMODULE_KEYS}
    problems = Problems(strict=False)
    print(f"== {layout} / {category} (root {data.get('root')})")
    try:
        index = build_index(layout, data.get("root"), category, problems, seed=int(data.get("seed", 0)),
                            **layout_options(layout, options))  # fmt: skip
    except (DatasetError, ValueError) as exc:
        problems.add(str(exc))
        index = None
    if index is not None:
        val_fraction = float(data.get("val_fraction") or 0.0)
        n_val = len(index.validation) or int(round(val_fraction * len(index.train)))
        n_train = len(index.train) - (0 if index.validation else n_val)
        good = sum(1 for it in index.test if not it.label)
        source = "validation images" if index.validation else f"data.val_fraction={val_fraction} of train"
        print(f"   train {n_train} | validation {n_val} ({source}) | test good {good} | "
              f"test defective {len(index.test) - good} | masks {index.masks}")  # fmt: skip
        for split, files in index.unlabelled.items():
            print(f"   unlabelled {split}: {len(files)} images (scored, no metrics)")
        if index.validation and val_fraction > 0:
            problems.add(f"data.val_fraction={val_fraction}: data.layout={layout} provides its own validation "
                         "images; set data.val_fraction=0")  # fmt: skip
        batch = int(data.get("batch_size") or 1)
        if index.train and n_train < batch:
            problems.add(
                f"data.batch_size={batch} exceeds the {n_train} training images ({index.train_source})"
            )
        if index.test and good == len(index.test):
            print(
                "   note: the test set is defect free: the run reports the false-alarm rate, no defect AUROC"
            )
        channels = data.get("channels") or (problems.run(category_channels, index.train, default=3) or 3)
        sizes, modes = scan_images(index, channels, problems)
        print(f"   image sizes: {_describe(sizes)}")
        print(f"   image modes: {_describe(modes)}")
        print(
            f"   channels: {channels}"
            + ("" if data.get("channels") else " (detected from the training images)")
        )
    if problems.messages:
        print(f"   {len(problems.messages)} problem(s):")
        for msg in problems.messages:
            print(f"   - {msg}")
    else:
        print("   no problems")
    return problems.messages


def found_categories(data: dict[str, Any]) -> list[str]:
    """The layout's categories present under the root (a folder, or VisA rows)."""
    layout = data.get("layout", "mvtec")
    names = categories(layout)
    root = Path(str(data.get("root") or "")).expanduser()
    present = [c for c in names if (root / c).is_dir()]
    if not present:
        raise SystemExit(f"no category of data.layout={layout} ({', '.join(names) or 'none'}) under {root}")
    return present


def main(argv: list[str] | None = None) -> int:
    """CLI; returns (and exits with) 1 when any category has a problem."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every category of the layout found under data.root")
    ap.add_argument("--categories", nargs="+", help="these categories instead of data.category")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=visa data.root=/data/visa")
    args = ap.parse_args(argv)
    data = data_config(args.overrides)
    data.pop("synthetic", None)
    cats = args.categories or (found_categories(data) if args.all else [str(data.get("category"))])
    bad = {c: check_category(data, c) for c in cats}
    n = sum(len(v) for v in bad.values())
    print(f"{n} problem(s) in {sum(bool(v) for v in bad.values())} of {len(cats)} category(ies)" if n
          else f"all {len(cats)} category(ies) OK")  # fmt: skip
    return int(n > 0)


if __name__ == "__main__":
    sys.exit(main())
