"""Image thresholds an engineer can put on a line: where they come from, and calibration on labelled shots.

Three sources, in this order of precedence in ``ebmad-predict``:

- ``command line``: ``image_threshold=<value>``;
- ``calibrated``: a thresholds file written by ``ebmad-predict calibrate=<shots>`` (default
  ``<model file>.threshold.json`` beside the checkpoint or ONNX model, or ``thresholds_file=``), chosen
  for a goal on a few labelled shots; it records the goal, the shots' confusion matrix, n and the model
  file's SHA-256 (a file calibrated for another model is refused);
- ``label-free``: the one stored with the model, fitted after training on out-of-sample scores of
  defect-free images for a false-alarm target (:func:`ebmad.evaluation.thresholds.false_alarm_threshold`).

Each comes with its expected false-alarm rate and an upper bound: the label-free fit's own (order
statistic), else the rate of that threshold on the label-free fit's defect-free scores, which it was not
chosen on (:func:`ebmad.evaluation.thresholds.false_alarm_estimate`). Labelled shots never touch training
or the label-free numbers. docs/thresholds.md explains the numbers.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from ebmad.data.io import IMAGE_SUFFIXES
from ebmad.evaluation.thresholds import calibrate_threshold, false_alarm_estimate

LABELS = {"good": 0, "0": 0, "defective": 1, "1": 1}
SHOT_FOLDERS = ("good", "defective")


def thresholds_file_for(model_path: str | Path) -> Path:
    """The default thresholds file of a checkpoint or ONNX model: ``<model file>.threshold.json``."""
    return Path(f"{model_path}.threshold.json")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def labelled_shots(spec: str | Path) -> list[tuple[Path, int]]:
    """(image, label) pairs of ``calibrate=``: a folder with ``good/`` and ``defective/`` (any nesting below
    them), or a CSV with columns ``path,label`` (label good|defective|0|1; relative paths from the CSV's
    folder). Errors name the folder, file or line."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".csv":
        shots = []
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"calibrate={path}: the CSV needs the columns path,label")
            for line, row in enumerate(reader, start=2):
                label = LABELS.get(str(row["label"]).strip().lower())
                if label is None:
                    raise ValueError(f"calibrate={path} line {line}: label {row['label']!r} is not one of "
                                     f"{', '.join(LABELS)}")  # fmt: skip
                image = Path(row["path"])
                image = image if image.is_absolute() else path.parent / image
                if not image.is_file():
                    raise FileNotFoundError(f"calibrate={path} line {line}: {image} does not exist")
                shots.append((image, label))
    elif path.is_dir():
        missing = [s for s in SHOT_FOLDERS if not (path / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"calibrate={path} has no {' and no '.join(f'{m}/' for m in missing)} folder "
                                    "(give a folder with good/ and defective/, or a CSV path,label)")  # fmt: skip
        shots = []
        for name in SHOT_FOLDERS:
            found = sorted(glob.glob(str(Path(glob.escape(str(path / name))) / "**" / "*"), recursive=True))
            shots += [(Path(p), LABELS[name]) for p in found
                      if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    else:
        raise FileNotFoundError(
            f"calibrate={spec} is neither a folder with good/ and defective/ nor a .csv file"
        )
    n_def = sum(label for _, label in shots)
    if n_def == 0:
        raise ValueError(
            f"calibrate={spec}: no defective shots found ({len(shots)} good); calibration needs some"
        )
    return shots


def calibration_record(scores: list[float], labels: list[int], goal: str, shots: str, model_path: str | Path,
                       model_type: str, image_score: str, label_free: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The thresholds file's content: the calibrated threshold, its goal, the shots' confusion matrix, the
    model it belongs to, its false-alarm estimate on the label-free defect-free scores, the label-free fit."""
    chosen = calibrate_threshold(scores, labels, goal)
    record = {
        "image_threshold": chosen["threshold"],
        "source": "calibrated",
        **{k: v for k, v in chosen.items() if k != "threshold"},
        "shots": str(shots),
        "model": str(model_path),
        "model_sha256": file_sha256(model_path),
        "model_type": model_type,
        "image_score": image_score,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label_free": summary_of_fit(label_free),
    }
    estimate = estimate_for(label_free, chosen["threshold"])
    if estimate:
        record["false_alarm_estimate"] = estimate
    return record


def summary_of_fit(fit: dict[str, Any]) -> dict[str, Any]:
    """A label-free fit without its pooled scores (for files, CSVs and logs)."""
    return {k: v for k, v in fit.items() if k != "scores"}


def estimate_for(fit: dict[str, Any], threshold: float) -> dict[str, Any]:
    """False-alarm rate and bound of a threshold not fitted on the label-free fit's defect-free scores (empty
    when the model stores none: exported or trained before they were kept)."""
    scores = fit.get("scores") or []
    return false_alarm_estimate(scores, threshold, fit.get("confidence", 0.95)) if scores else {}


def write_thresholds_file(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def read_thresholds_file(path: Path, model_path: str | Path, image_score: str) -> dict[str, Any]:
    """A thresholds file, checked: a finite image threshold, for this model file (SHA-256) and score."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"thresholds file {path} cannot be read: {exc}") from None
    value = record.get("image_threshold") if isinstance(record, dict) else None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"thresholds file {path} holds no finite image_threshold")
    if record.get("image_score") not in (None, image_score):
        raise ValueError(f"thresholds file {path} was calibrated on the score {record['image_score']!r}, this model "
                         f"gives {image_score!r}: calibrate again (calibrate=<shots>) or delete the file")  # fmt: skip
    sha = record.get("model_sha256")
    if sha and Path(model_path).is_file() and sha != file_sha256(model_path):
        raise ValueError(f"thresholds file {path} was calibrated for another version of {model_path} (its SHA-256 "
                         "differs): calibrate again (calibrate=<shots>) or delete the file")  # fmt: skip
    return record


def describe(source: str, record: dict[str, Any]) -> str:
    """A short provenance text for the summary line and the overlay legend."""
    if source == "calibrated":
        return (f"calibrated on {record.get('n_good', '?')} good + {record.get('n_defective', '?')} defective shots, "
                f"goal {record.get('goal', '?')}")  # fmt: skip
    if source == "label-free":
        if not record:
            return "label-free (no record: the model predates threshold provenance)"
        used = " + ".join(f"{s['n']} {s['source'].replace('_', '-')}" for s in record.get("sources", []))
        return f"label-free, {used} defect-free images" + ("" if record.get("enough", True) else " (too few)")
    return "command line"
