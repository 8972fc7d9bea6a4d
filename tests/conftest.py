"""Shared fixtures: small synthetic datasets and the real Hydra config, composed and shrunk."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from ebmad.data.synthetic import generate_category
from ebmad.run.builders import compose_config

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parent.parent
BOTTLE_ROOT = REPO.parent / "shared" / "data" / "mvtec_ad"

# Tiny but learnable: 32x32 images, 16 training images per category.
SMALL = dict(size=32, n_train=16, n_test_good=6, n_test_defect=4)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for cat in ("tex_a", "tex_b"):
        generate_category(root, cat, seed=0, **SMALL)
    return root


def tiny_overrides(root: Path, category: str = "tex_a") -> list[str]:
    """Overrides that make a full train+test run take a few seconds on CPU."""
    return [
        "data=mvtec", f"data.root={root}", f"data.category={category}", "data.image_size=32",
        "data.batch_size=8", "data.test_batch_size=8", "model.sgld_steps=5", "trainer.max_steps=6",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2",
    ]  # fmt: skip


compose_cfg = compose_config  # conf/train.yaml as python -m ebmad.train composes it


@pytest.fixture
def make_cfg(tmp_path, synth_root):
    """make_cfg(*extra_overrides, category=..., out=...) -> composed, shrunk config."""

    def _make(*extra: str, category: str = "tex_a", out: Path | None = None) -> DictConfig:
        base = tiny_overrides(synth_root, category)
        if any(e.startswith("model=") and e != "model=ebm" for e in extra):  # EBM-only keys
            base = [o for o in base if not o.startswith("model.")]
        return compose_cfg(out or tmp_path / "run", [*base, "logger=none", *extra])

    return _make


def read_scores(path: Path) -> list[dict[str, str]]:
    """Rows of a run's scores.csv."""
    with open(path) as fh:
        return list(csv.DictReader(fh))


def ckpt_state(path: Path) -> dict:
    """A checkpoint file's contents (on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical weights/buffers (NaN = unfitted thresholds in both) and Adam state."""
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, equal_nan=True, msg=k)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[i][k], opt_b[i][k]), (i, k)
