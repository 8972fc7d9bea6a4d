"""Progress when not on a terminal: a line every ``callbacks.progress.every_s`` seconds with the step, steps/s
and the time left, no progress-bar debris; sweeps run seed-major (:mod:`ebmad.run.progress`, :mod:`ebmad.run.jobs`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from ebmad.run.jobs import seed_major
from ebmad.run.progress import ProgressLog, duration

from conftest import REPO, tiny_overrides

LINE = re.compile(r"step (\d+)/6 \(\d+%\), (\d+\.\d+) steps/s, (\S+) left")


def test_a_piped_run_logs_step_rate_and_time_left(synth_root, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        o for o in tiny_overrides(synth_root) if "enable_progress_bar" not in o
    ]  # the bar as a user has it
    proc = subprocess.run([sys.executable, "-m", "ebmad.train", *args, "logger=none",
                           "eval.figures=false", "eval.untrained_reference=false", "callbacks.progress.every_s=0.01",
                           f"hydra.run.dir={out}"], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = proc.stdout
    lines = [m.groups() for m in LINE.finditer(text)]
    assert [int(step) for step, _, _ in lines] == list(range(1, 7))  # a line per step at this interval
    assert all(float(rate) > 0 for _, rate, _ in lines) and lines[-1][2] == "0s"
    assert "training 6 steps; progress every" in text and "trained 6 steps in " in text
    assert "Epoch " not in text and "Testing" not in text  # the progress bars are off in a log
    assert "step 3/6" in (out / "train.log").read_text()  # the run's log file has them too


def test_the_line_and_its_durations():
    p = ProgressLog(every_s=30, when="always")
    assert p.active and p.line(50, 200.0, 25.0) == "step 50/200 (25%), 2.00 steps/s, 1m15s left"
    assert p.line(7, float("inf"), 2.0) == "step 7, 3.50 steps/s"
    assert [duration(s) for s in (4.4, 65, 3 * 3600 + 125)] == ["4s", "1m05s", "3h02m"]
    assert not ProgressLog(when="never").active
    with pytest.raises(ValueError, match="callbacks.progress.when"):
        ProgressLog(when="sometimes")
    with pytest.raises(ValueError, match="callbacks.progress.every_s"):
        ProgressLog(every_s=0)


def test_sweeps_run_every_method_before_a_second_seed():
    jobs = [[f"recipe={r}", f"seed={s}"] for r in ("ebm_tiny", "draem_tiny", "ssae_tiny") for s in (0, 1, 2)]
    order = [jobs[i] for i in seed_major(jobs)]
    assert [o[1] for o in order] == ["seed=0"] * 3 + ["seed=1"] * 3 + ["seed=2"] * 3
    assert [o[0] for o in order[:3]] == ["recipe=ebm_tiny", "recipe=draem_tiny", "recipe=ssae_tiny"]
    unseeded = [["data.category=a"], ["data.category=b"]]
    assert seed_major(unseeded) == [0, 1]  # no seed swept: as given
