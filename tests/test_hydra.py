"""The real entry point and config groups: composition of every experiment, a CLI run and a multirun."""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ebmad.models import MODEL_CLASSES
from ebmad.train import CONF_DIR

from conftest import REPO, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))
EXPECTED_MODEL = {"draem_paper": "draem", "ssae_paper": "ssae"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"])
    assert cfg.trainer.inference_mode is False
    assert cfg.model._target_ == MODEL_CLASSES[EXPECTED_MODEL.get(experiment, "ebm")]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_selects_its_model(recipe):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"recipe={recipe}"])
    model = next(m for m in sorted(MODEL_CLASSES, key=len, reverse=True) if recipe.startswith(m + "_"))
    assert cfg.model._target_ == MODEL_CLASSES[model]
    assert cfg.model.image_size == cfg.data.image_size


def test_paper_experiment_matches_the_paper():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=paper"])
    assert cfg.data.image_size == 128 and cfg.model.image_size == 128
    assert cfg.model.sgld_steps == 100 and cfg.model.persistent is False and cfg.model.alpha == 0.0
    assert cfg.trainer.accelerator == "gpu"


def cli(*args, cwd=REPO, timeout=600):
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "ebmad.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow  # covered in the default run by tests/test_sweep.py::test_multirun_over_two_categories_then_report
def test_two_job_multirun_writes_one_result_per_job(synth_root, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(synth_root) if not o.startswith("data.category")]
    p = cli("-m", "data.category=tex_a,tex_b", *overrides, "logger=csv", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2
    cats = {json.loads(r.read_text())["category"] for r in results}
    assert cats == {"tex_a", "tex_b"}
    assert p.stdout.count("RESULT category=") == 2


@pytest.mark.slow  # in-process: test_train round trip, test_first_hour evaluation from a checkpoint
def test_cli_evaluates_a_checkpoint(synth_root, tmp_path):
    p = cli(*tiny_overrides(synth_root), "logger=none", f"hydra.run.dir={tmp_path / 'fit'}")
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    p = cli(*tiny_overrides(synth_root), "logger=none", "train=false", f"ckpt_path={ckpt}",
            f"hydra.run.dir={tmp_path / 'eval'}")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    a = json.loads((tmp_path / "fit" / "results.json").read_text())["metrics"]
    b = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert a == b


@pytest.mark.slow  # the default run has tests/test_first_hour.py::test_an_ebmad_error_is_one_line_without_traceback
def test_cli_reports_bad_input_clearly(tmp_path):
    p = cli(
        "data=mvtec", f"data.root={tmp_path / 'missing'}", "logger=none", f"hydra.run.dir={tmp_path / 'x'}"
    )
    assert p.returncode != 0
    assert f"dataset root {tmp_path / 'missing'}" in p.stderr
