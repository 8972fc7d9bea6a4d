"""DDP with two CPU processes (gloo) through the Hydra entry point, and preemption by signal."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_hydra import cli

from conftest import REPO, tiny_overrides


def scores(path):
    with open(path) as fh:
        return {r["index"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow  # two gloo processes + one reference run: ~65 s on 2 cores (make test-all)
def test_ddp_two_processes_match_one_process(synth_root, tmp_path):
    # one set of weights, trained once
    base = [*tiny_overrides(synth_root), "logger=none"]
    assert cli(*base, f"hydra.run.dir={tmp_path / 'fit'}").returncode == 0
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    # refit the statistics and test with 1 process and with 2 DDP processes on the same weights and data
    evaluate = [*base, "train=false", "refit_stats=true", f"ckpt_path={ckpt}", "data.test_batch_size=3"]
    one = cli(*evaluate, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(*evaluate, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              f"hydra.run.dir={tmp_path / 'two'}")  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (torch.load(tmp_path / d / "statistics.pt") for d in ("one", "two"))
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s1["count"] == s2["count"] == 16  # every training image once: sums reduced, not per-rank means
    assert torch.allclose(s1["mean"], s2["mean"], rtol=1e-5, atol=1e-8)
    assert torch.allclose(s1["std"], s2["std"], rtol=1e-5, atol=1e-8)
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r1["n_test"] == r2["n_test"] == 14
    # AUROCs agree to 1e-6; values in score units (thresholds) and ranks near ties to float noise of the scores
    assert r2["metrics"] == pytest.approx(r1["metrics"], rel=1e-4, abs=1e-5)
    a, b = scores(tmp_path / "one" / "scores.csv"), scores(tmp_path / "two" / "scores.csv")
    assert a.keys() == b.keys() and len(a) == 14
    for i in a:
        for k in ("energy", "A_std_l2", "A_raw_l1"):
            assert float(a[i][k]) == pytest.approx(float(b[i][k]), rel=1e-4), (i, k)
    # the extra rank ran as a single run of this job, in this job's folder
    assert (tmp_path / "two" / "train_ddp_process_1.log").is_file()
    assert not any(p.name.startswith("train_ddp") for p in (tmp_path / "one").iterdir())


@pytest.mark.slow  # (make test-all) DDP itself: test_ddp_two_processes_match_one_process
def test_ddp_training_in_a_multirun(synth_root, tmp_path):
    sweep = tmp_path / "sweep"
    base = [o for o in tiny_overrides(synth_root) if not o.startswith("data.category")]
    p = cli("-m", "data.category=tex_a,tex_b", *base, "data.batch_size=4", "logger=none", "trainer=ddp",
            "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.sweep.dir={sweep}", timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert len(jobs) == 2  # no duplicate folders from the extra ranks
    for d in jobs:
        res = json.loads((d / "results.json").read_text())
        assert res["status"] == "completed" and res["global_step"] == 6
        assert (d / "train_ddp_process_1.log").is_file()
        stats = torch.load(d / "statistics.pt")
        assert stats["world_size"] == 2 and stats["count"] == 16


STEPS = 150  # the signal lands after 3 steps; the resumed leg trains the rest


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_signal_saves_checkpoint_and_next_start_resumes(synth_root, tmp_path, sig):
    out = tmp_path / "job"
    args = [sys.executable, "-m", "ebmad.train", *tiny_overrides(synth_root), f"trainer.max_steps={STEPS}",
            "callbacks.model_checkpoint.every_n_train_steps=1000", "logger=wandb", f"hydra.run.dir={out}"]  # fmt: skip
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wandb_dir = out / "wandb"
    steps_done = out / "diagnostics" / "diagnostics.csv"  # one row per training step (EBMDiagnostics)
    deadline = time.time() + 300  # a loaded machine can take long to start; the handler is set at train start
    while time.time() < deadline and not (
        steps_done.is_file() and len(steps_done.read_text().splitlines()) > 3
    ):
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), log[-3000:]
    state = json.loads((out / "results.json").read_text())
    assert state["status"] == "interrupted"
    stopped_at = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < stopped_at < STEPS and stopped_at == state["global_step"]
    run_id = (out / "wandb_run_id").read_text().strip()

    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    done = json.loads((out / "results.json").read_text())
    assert done["status"] == "completed" and done["global_step"] == STEPS
    assert done["resumed_from_step"] == stopped_at
    assert (out / "wandb_run_id").read_text().strip() == run_id
    runs = sorted(wandb_dir.glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # the same W&B run, continued
