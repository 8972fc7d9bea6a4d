"""Per-run example images and curve points for the sweep report (``<run>/examples.npz``).

Every model of a sweep picks the same test images (:func:`select_examples` depends only on the test set's
defect names in test order), so the report can set their anomaly maps side by side. The file holds only
arrays of numbers and strings (``np.load(..., allow_pickle=False)`` reads it: no pickles, nothing runs):

- ``images`` (K, H, W, C) uint8, ``masks`` (K, H, W) bool, ``maps`` (K, H, W) float16 at model resolution;
- ``index`` (K,) test indices, ``defects`` / ``paths`` (K,) defect names and paths relative to the category;
- ``image_threshold``, ``pixel_threshold`` (scalars, NaN when not fitted), ``image_score`` / ``pixel_map``;
- curve points over the whole test set: ``image_roc`` (2, n), ``pixel_roc`` (2, n), ``pro`` (2, n) as
  (x, y) rows, thinned to at most :data:`CURVE_POINTS` points (empty when undefined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

CURVE_POINTS = 400
EXAMPLES_FILE = "examples.npz"


def select_examples(defects: Sequence[str], limit: int = 8) -> list[int]:
    """Test indices to show: the first good image, then the first image of each defect type (in test
    order), then the second of each, and so on, up to ``limit``. Deterministic in the defect names alone."""
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(defects):
        groups.setdefault(d, []).append(i)
    order = sorted(groups, key=lambda d: (d != "good", groups[d][0]))
    picked: list[int] = []
    depth = 0
    while len(picked) < limit and any(depth < len(groups[d]) for d in order):
        picked += [groups[d][depth] for d in order if depth < len(groups[d])]
        depth += 1
    return sorted(picked[:limit], key=lambda i: (defects[i] != "good", order.index(defects[i]), i))


def _thin(x: np.ndarray, y: np.ndarray, n: int = CURVE_POINTS) -> np.ndarray:
    if len(x) > n:
        idx = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
        x, y = x[idx], y[idx]
    return np.stack([x, y]).astype(np.float32)


def curve_points(scores: Sequence[float], labels: Sequence[int], maps: torch.Tensor, masks: torch.Tensor
                 ) -> dict[str, np.ndarray]:  # fmt: skip
    """Image ROC, pixel ROC and PRO (FPR, PRO) points of one test set; (2, 0) arrays where undefined."""
    from ebmad.evaluation.aupro import PixelTable
    from ebmad.evaluation.metrics import binary_curve, curve_roc

    empty = np.zeros((2, 0), dtype=np.float32)
    out = {"image_roc": empty, "pixel_roc": empty, "pro": empty}
    lab = np.asarray(labels) != 0
    if lab.any() and not lab.all():
        out["image_roc"] = _thin(*curve_roc(binary_curve(np.asarray(scores, dtype=np.float64), lab)))
    m, g = maps.float().numpy(), masks.bool().numpy()
    if g.any() and not g.all():
        out["pixel_roc"] = _thin(*curve_roc(binary_curve(m, g)))
        out["pro"] = _thin(*PixelTable.build(list(m), list(g)).pro_curve())
    return out


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(K, C, H, W) in [-1, 1] -> (K, H, W, C) uint8."""
    import torch

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return x.transpose(0, 2, 3, 1)


def run_examples(model: Any, dm: Any, limit: int | None = None, curves: bool = True) -> dict[str, np.ndarray]:
    """The example arrays of a tested model (``model.test_results``) on its datamodule's test set
    (``curves=False``: without the curve points, which sort every pixel of the test set)."""
    import torch

    res = model.test_results
    if not res:
        raise ValueError("run_examples: the model has no test results (run trainer.test first)")
    meta = dm.test_meta
    index = list(res["index"])
    defects = [meta[i].defect for i in index]
    limit = int(model.hparams.get("n_examples", 8)) if limit is None else limit
    rows = select_examples(defects, limit)
    picked = [index[r] for r in rows]
    images = dm.load_test()["image"][torch.tensor(picked, dtype=torch.long)].detach().cpu()
    root = getattr(dm, "category_dir", None)

    def rel(p: Path) -> str:
        try:
            return str(Path(p).relative_to(root)) if root is not None else Path(p).name
        except ValueError:
            return Path(p).name

    arrays = {
        "images": _to_uint8(images),
        "masks": res["masks"][rows].numpy().astype(bool),
        "maps": res["maps"][rows].float().numpy().astype(np.float16),
        "index": np.asarray(picked, dtype=np.int64),
        "defects": np.asarray([defects[r] for r in rows], dtype=str),
        "paths": np.asarray([rel(meta[i].image) for i in picked], dtype=str),
        "image_threshold": np.float64(float(model.image_threshold)),
        "pixel_threshold": np.float64(float(model.pixel_threshold)),
        "image_score": np.asarray(model.DEFAULT_IMAGE_SCORE),
        "pixel_map": np.asarray(model.DEFAULT_PIXEL_MAP),
    }
    if curves:
        scores = res["scores"][model.DEFAULT_IMAGE_SCORE]
        arrays.update(curve_points(scores, res["labels"], res["maps"], res["masks"]))
    return arrays


def save_examples(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write the arrays as a compressed ``.npz`` (atomically: a partial file never has the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def write_run_examples(out: str | Path, model: Any, dm: Any) -> Path:
    """``<out>/examples.npz`` of a tested model (see the module docstring)."""
    return save_examples(Path(out) / EXAMPLES_FILE, run_examples(model, dm))


def load_examples(path: str | Path) -> dict[str, Any]:
    """Read an ``examples.npz`` without unpickling; scalars come back as Python numbers/strings."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable examples file ({exc})") from exc
    for key in ("images", "masks", "maps", "defects", "paths"):
        if key not in data:
            raise ValueError(f"{path}: examples file without '{key}'")
    for key in ("image_threshold", "pixel_threshold"):
        data[key] = float(data.get(key, math.nan))
    for key in ("image_score", "pixel_map"):
        data[key] = str(data.get(key, ""))
    return data
