"""Run metadata: git commit, device description, score statistics, JSON output."""

from __future__ import annotations

import difflib
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit hash and whether the work tree has uncommitted changes (None outside git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if sha.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The device the run used, in words."""
    device = torch.device(device or "cpu")
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "host": platform.node()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["name"] = torch.cuda.get_device_name(idx)
        info["count"] = torch.cuda.device_count()
    else:
        info["name"] = cpu_name()
        info["threads"] = torch.get_num_threads()
        info["cores"] = os.cpu_count()
    return info


def score_statistics(scores: dict[str, list[float]], labels: list[int]) -> dict[str, Any]:
    """Mean, std, min and max of each image score, for defect-free and defective images."""
    lab = torch.tensor(labels)
    out: dict[str, Any] = {}
    for name, values in scores.items():
        v = torch.tensor(values, dtype=torch.float64)
        out[name] = {}
        for group, sel in (("good", lab == 0), ("defective", lab == 1)):
            x = v[sel]
            out[name][group] = (
                {
                    "n": int(x.numel()),
                    "mean": float(x.mean()),
                    "std": float(x.std(unbiased=False)),
                    "min": float(x.min()),
                    "max": float(x.max()),
                }  # fmt: skip
                if x.numel()
                else {"n": 0}
            )
    return out


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write strict JSON (non-finite floats become null) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=False))
    tmp.replace(path)


def append_csv_rows(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """Append rows to a CSV of results, writing the header when the file is new."""
    import csv

    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    """``"; did you mean '<prefix><closest>'?"`` for the closest of ``choices`` (difflib), or ``""``."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""
