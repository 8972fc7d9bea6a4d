"""A first run is quiet: the demo's settings and a folder run, piped as in a log file, print no library warning
(:mod:`ebmad.run.quiet`) and no progress-bar debris; ebmad's own lines (thresholds, RESULT) stay."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

from ebmad.data.synthetic import generate_category
from ebmad.run.quiet import LOG_FILTERS, WARNING_FILTERS, install

from conftest import REPO, SMALL

# a Python warning ("...: UserWarning: ..."), Lightning's warning format ("<file>.py:321: <message>"), the echo
# of warnings.warn, W&B's warnings, and the noise named in the issue
NOISE = re.compile(
    r"Warning|warnings\.warn|\.py:\d+: |wandb: WARNING|litlogger|weights_only|Epoch \d+/"
    r"|\]\[WARNING\] - (spike|level shift)"
)


def piped_run(*args: str) -> str:
    """``python -m ebmad.train`` with stdout and stderr into one pipe (not a terminal), the default logger
    (W&B, offline); returns the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("WANDB_SILENT", None)  # W&B as a user gets it
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-m", "ebmad.train", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line)]


def test_the_demo_settings_log_no_warning(tmp_path):
    """``make demo`` (experiment=quickstart) for 40 steps, past the early rise of the energy that the spike
    detector notes: figures, untrained reference and W&B included."""
    out = piped_run("experiment=quickstart", f"paths.data_dir={tmp_path / 'data'}", "trainer.max_steps=40",
                    f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert "RESULT category=tex_a model=ebm" in out
    assert noise(out) == []


def test_a_folder_run_logs_no_warning(tmp_path):
    """``data=folder`` with normal images only: the false-alarm line is the one that matters."""
    generate_category(tmp_path / "data", "tex_a", seed=0, layout="folder", **SMALL)
    out = piped_run("data=folder", f"data.normal_dir={tmp_path / 'data' / 'tex_a' / 'normal'}",
                    "data.normal_test_fraction=0.25", "data.val_fraction=0.25", "data.image_size=32",
                    "data.batch_size=8", "model.sgld_steps=2", "trainer.max_steps=3",
                    f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert "RESULT category=folder model=ebm false_alarm_rate=" in out
    assert noise(out) == []


def test_the_filters_are_precise(recwarn):
    """Only the listed messages are dropped: the same category with another message still warns."""
    install()
    assert all(why for *_, why in WARNING_FILTERS) and all(why for *_, why in LOG_FILTERS)
    warnings.warn(
        "No positive samples in targets, true positive value should be meaningless.",
        UserWarning,
        stacklevel=1,
    )
    warnings.warn("something else went wrong", UserWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["something else went wrong"]
