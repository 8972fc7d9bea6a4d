"""Kill -9 a real ``python -m ebmad.train`` run at chosen or random moments, rerun the same command each
time, and get exactly the metrics of an uninterrupted run.

Kill points are planted by a ``sitecustomize.py`` that only this test puts on ``PYTHONPATH``
(``EBMAD_FAULT=<phase>:<n>`` sends SIGKILL to the process itself at the n-th event of the phase):

- ``train``: at the start of the n-th training step;
- ``checkpoint``: halfway through writing the n-th checkpoint (half of its bytes reach the file
  object torch.save was given, then the kill);
- ``statistics``: at the n-th batch of the post-fit gradient statistics;
- ``stats_write``: halfway through writing ``statistics.pt``;
- ``test``: at the n-th test batch.

The default-suite test kills twice (checkpoint write, statistics write); the slow variant runs 4
rounds, each in a fresh folder: a random planted fault, a kill from outside at a random time, a rerun.

Before the AtomicCheckpointIO wiring these pass too, but for a weaker reason: Lightning 2.6 serializes
a checkpoint into memory and then writes it through an fsspec transaction (temp file + move, no
fsync), and a half-written ``statistics.pt`` is rewritten by the rerun that resumes before it.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ebmad.train import run

from conftest import REPO, compose_cfg, tiny_overrides

SITECUSTOMIZE = r"""
import os
import signal

_SPEC = os.environ.get("EBMAD_FAULT")
if _SPEC:
    _PHASE, _, _NTH = _SPEC.partition(":")
    _NTH = int(_NTH or 1)
    _SEEN = [0]

    def _hit():
        _SEEN[0] += 1
        return _SEEN[0] == _NTH

    def _die():
        os.kill(os.getpid(), signal.SIGKILL)

    import torch

    if _PHASE in ("checkpoint", "stats_write"):
        import io

        _save = torch.save

        def _half_save(obj, f, *args, **kwargs):
            is_ckpt = isinstance(obj, dict) and "state_dict" in obj
            is_stats = isinstance(obj, dict) and "mean" in obj and "std" in obj
            if (is_ckpt if _PHASE == "checkpoint" else is_stats) and _hit():
                buf = io.BytesIO()
                _save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
                fh.write(data[: len(data) // 2])
                fh.flush()
                _die()
            return _save(obj, f, *args, **kwargs)

        torch.save = _half_save
    else:
        from ebmad.models.ebm import EBMModule

        if _PHASE == "train":
            _step = EBMModule.training_step

            def _training_step(self, *args, **kwargs):
                if _hit():
                    _die()
                return _step(self, *args, **kwargs)

            EBMModule.training_step = _training_step
        elif _PHASE == "statistics":
            _fit = EBMModule.fit_statistics

            def _fit_statistics(self, batches, *args, **kwargs):
                def killing():
                    for batch in batches:
                        if _hit():
                            _die()
                        yield batch

                return _fit(self, killing(), *args, **kwargs)

            EBMModule.fit_statistics = _fit_statistics
        elif _PHASE == "test":
            _test = EBMModule.test_step

            def _test_step(self, *args, **kwargs):
                if _hit():
                    _die()
                return _test(self, *args, **kwargs)

            EBMModule.test_step = _test_step
"""

PHASE_COUNTS = {"train": 6, "checkpoint": 4, "statistics": 2, "stats_write": 1, "test": 2}  # events per run


def overrides(synth_root):
    return [*tiny_overrides(synth_root), "logger=none", "data.test_batch_size=4"]


def command(synth_root, run_dir):
    return [sys.executable, "-m", "ebmad.train", *overrides(synth_root), f"hydra.run.dir={run_dir}"]


def reference_run(synth_root, out):
    """The uninterrupted run, in this process (saves a start-up); same settings as ``main()`` uses."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as ebmad.train.main
    try:
        run(compose_cfg(out, overrides(synth_root)))
    finally:
        torch.set_float32_matmul_precision(before)


def launch(cmd, hook_dir, fault=None, kill_after=None, timeout=600):
    """Run the command; returns its exit code (-9 when killed)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
    }
    env.pop("EBMAD_FAULT", None)
    if fault:
        env["EBMAD_FAULT"] = fault
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{cmd} failed with {proc.returncode}:\n{err[-4000:]}")
    return proc.returncode


@pytest.fixture
def hook_dir(tmp_path):
    d = tmp_path / "hooks"
    d.mkdir()
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def check_same_as_reference(run_dir, ref_dir):
    got, want = results(run_dir), results(ref_dir)
    assert got["status"] == "completed"
    assert got["metrics"] == want["metrics"]  # exact: resume is bitwise on CPU
    assert got["score_statistics"] == want["score_statistics"]
    assert got["global_step"] == want["global_step"]
    a, b = (torch.load(d / "statistics.pt", weights_only=False) for d in (run_dir, ref_dir))
    assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"])
    return got


def run_with_kills(cmd, hook_dir, faults, kill_times=(), strict=True):
    """Each fault in turn (a phase spec, then kills at given times), then one clean run; returns #kills.

    ``strict``: every planted fault must fire (a random schedule may ask for an event a resumed run
    no longer reaches, e.g. a training step before its checkpoint; that run then just completes).
    """
    kills = 0
    for fault, after in [*((f, None) for f in faults), *((None, t) for t in kill_times)]:
        rc = launch(cmd, hook_dir, fault=fault, kill_after=after)
        if strict and fault is not None:
            assert rc == -signal.SIGKILL, f"EBMAD_FAULT={fault} never fired"
        kills += rc == -signal.SIGKILL
    assert launch(cmd, hook_dir) == 0
    return kills


def test_killed_twice_then_completed_equals_an_uninterrupted_run(synth_root, tmp_path, hook_dir):
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    reference_run(synth_root, ref)
    # killed while writing the step-4 checkpoint, then (resumed from step 2) while writing the statistics
    kills = run_with_kills(command(synth_root, run_dir), hook_dir, ["checkpoint:2", "stats_write:1"])
    assert kills == 2
    got = check_same_as_reference(run_dir, ref)
    assert got["resumed_from_step"] == 4  # the step-4 checkpoint of the second run


@pytest.mark.slow
def test_many_random_kills_then_completed_equals_an_uninterrupted_run(synth_root, tmp_path, hook_dir):
    """4 rounds in fresh folders: a random planted fault (always fires), a kill at a random time (fires
    unless the resumed run is already done), then a clean rerun that must equal the reference."""
    rng = random.Random(0)
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    assert launch(command(synth_root, ref), hook_dir) == 0  # also times a whole run, for the random kills
    duration = time.perf_counter() - t0
    kills, tried = 0, []
    for round_ in range(4):
        phase = rng.choice(list(PHASE_COUNTS))
        fault, after = f"{phase}:{rng.randint(1, PHASE_COUNTS[phase])}", rng.uniform(0.3, 0.8) * duration
        tried.append((fault, round(after, 1)))
        kills += run_with_kills(command(synth_root, tmp_path / f"run{round_}"), hook_dir, [fault], [after])
        check_same_as_reference(tmp_path / f"run{round_}", ref)
    print(f"fault injection: {kills} kills of {2 * len(tried)} tried: {tried}")
    assert kills >= len(tried)
