"""What a new user meets in the first hour: typos get "did you mean", errors one line, the RESULT line last,
logs without tensors, checkpoints evaluated without retyping what they know, the debug switch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from ebmad.reliability.checkpointing import CheckpointError
from ebmad.run.cli import UnknownSetting, check_overrides, front_door
from ebmad.train import CONF_DIR, run

from conftest import REPO, compose_cfg, tiny_overrides

DRAEM64 = ["model=draem", "model.recon_base_width=8", "model.disc_base_width=8", "data.image_size=64"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ebmad.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip


@pytest.mark.parametrize(
    "override,suggestion",
    [("model.sgld_stepz=5", "did you mean 'model.sgld_steps'"), ("data.categry=a,b", "did you mean 'data.category'"),
     ("model=draemm", "did you mean 'model=draem'"), ("trainer.max_step=3", "did you mean 'trainer.max_steps'")],
)  # fmt: skip
def test_a_typo_suggests_the_real_name(override, suggestion):
    with pytest.raises(UnknownSetting, match=suggestion):
        check_overrides([override], CONF_DIR, "train")


def test_keys_of_the_chosen_group_are_known():
    check_overrides(["model=draem", "model.recon_base_width=8", "+model.new_key=1", "recipe=ssae_tiny"], CONF_DIR,
                    "train")  # fmt: skip
    with pytest.raises(UnknownSetting, match="model.schedule"):  # a DRAEM key, but model is the EBM here
        check_overrides(["model.schedule=paper"], CONF_DIR, "train")


def test_the_front_door_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        front_door(["model.sgld_stepz=5"], CONF_DIR, "train")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'model.sgld_steps'" in err[0] and "+model.sgld_stepz=5" in err[0]


def test_a_misspelt_category_suggests_the_folder(make_cfg, synth_root):
    with pytest.raises(ValueError, match="did you mean 'data.category=tex_a'"):
        run(make_cfg("data.category=tex_aa"))


def test_a_root_that_is_a_file_says_so(make_cfg, tmp_path):
    not_a_folder = tmp_path / "mvtec.tar"
    not_a_folder.write_text("an archive, not yet unpacked")
    with pytest.raises(ValueError, match=f"{not_a_folder} .data.root. is a file, not a folder"):
        run(make_cfg(f"data.root={not_a_folder}"))


def test_an_ebmad_error_is_one_line_without_traceback(synth_root, tmp_path):
    out = tmp_path / "run"
    proc = cli(
        "data=mvtec", f"data.root={synth_root}", "data.category=nope", "logger=none", f"hydra.run.dir={out}"
    )
    assert proc.returncode == 1
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and f"run folder: {out}" in proc.stderr
    errors = [line for line in text.splitlines() if "category 'nope'" in line]
    assert len(errors) == 1 and errors[0].startswith("error: DatasetError: category 'nope'")
    assert "category 'nope'" in (out / "train.log").read_text()
    assert "Traceback" in json.loads((out / "results.json").read_text())["traceback"]  # kept for debugging


def test_the_result_line_is_last_and_logs_hold_no_tensors(synth_root, tmp_path):
    out = tmp_path / "run"
    proc = cli(*tiny_overrides(synth_root), "data.val_fraction=0.25", "logger=wandb", f"hydra.run.dir={out}",
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-1].startswith("RESULT category=tex_a model=ebm"), lines[-5:]
    log_text = (out / "train.log").read_text()
    assert "tensor(" not in log_text
    assert "image threshold from 4 held_out scores" in log_text and "too few defect-free images" in log_text
    assert max(len(line) for line in log_text.splitlines()) < 1000  # one line per fact, no dumps


@pytest.fixture(scope="module")
def draem64(tmp_path_factory, synth_root):
    out = tmp_path_factory.mktemp("draem64")
    base = [o for o in tiny_overrides(synth_root) if not o.startswith(("model.", "data.image_size"))]
    run(compose_cfg(out, [*base, "logger=none", *DRAEM64]))
    return out / "checkpoints" / "last.ckpt"


def test_evaluating_a_checkpoint_takes_type_size_and_channels_from_it(draem64, synth_root, tmp_path, caplog):
    """No model=draem, no data.image_size=64: the defaults (EBM, 128 px) would not fit the checkpoint."""
    base = ["data=mvtec", f"data.root={synth_root}", "data.category=tex_a", "logger=none"]
    with caplog.at_level(logging.INFO):
        res = run(compose_cfg(tmp_path / "eval", [*base, "train=false", "test=true", f"ckpt_path={draem64}"]))
    assert res["status"] == "completed" and res["model"] == "draem"
    assert res["config"]["data"]["image_size"] == 64 and res["config"]["data"]["channels"] == 3
    assert "NOT used" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(CheckpointError, match="model type 'draem' but model=ssae"):
        run(compose_cfg(tmp_path / "e2", [*base, "model=ssae", "train=false", f"ckpt_path={draem64}"]))
    with pytest.raises(CheckpointError, match="image_size=64 but data.image_size=32"):
        run(
            compose_cfg(tmp_path / "e3", [*base, "data.image_size=32", "train=false", f"ckpt_path={draem64}"])
        )


def test_debug_switch_composes_a_tiny_run():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["debug=default", "recipe=draem_cpu"])
    assert cfg.trainer.max_steps == 2 and cfg.data.image_size == 32 and cfg.full_traceback
    assert not cfg.logger and cfg.model._target_.endswith("DraemModule")
