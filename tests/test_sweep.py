"""Multiruns: per-job folders, failure isolation, the report, skipping finished jobs on re-run."""

import csv
import json

import pytest
import yaml
from test_hydra import cli

from conftest import tiny_overrides


def sweep_args(root, sweep, categories="tex_a,tex_b"):
    base = [o for o in tiny_overrides(root) if not o.startswith("data.category")]
    return ["-m", f"data.category={categories}", *base, "logger=csv", f"hydra.sweep.dir={sweep}"]


def report(sweep, out):
    import subprocess
    import sys

    args = [sys.executable, "-m", "ebmad.report", str(sweep), "--out", str(out), "--format", "md", "csv"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_multirun_over_two_categories_then_report(synth_root, tmp_path):
    sweep = tmp_path / "sweep"
    p = cli(*sweep_args(synth_root, sweep, "tex_a,tex_b,no_such_category"))
    assert p.returncode == 0, p.stderr[-3000:]  # the failing job does not stop the sweep
    results = {
        json.loads(f.read_text())["category"]: json.loads(f.read_text()) for f in sweep.glob("*/results.json")
    }
    assert results["tex_a"]["status"] == results["tex_b"]["status"] == "completed"
    assert results["no_such_category"]["status"] == "failed"
    assert "category 'no_such_category'" in results["no_such_category"]["error"]
    assert (sweep / "report.md").is_file()  # written by the sweep-summary callback

    r = report(sweep, tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Table 1: image-level AUROC" in md and "Table 2: pixel-level AUROC" in md
    for cat in ("tex_a", "tex_b"):
        m = results[cat]["metrics"]
        assert f"| {cat} | {m['image_auroc/energy']:.3f} | {m['image_auroc/A_std_l1']:.3f} | " \
               f"{m['image_auroc/A_std_l2']:.3f} | n/a | completed |" in md  # fmt: skip
        assert (
            f"| {cat} | {m['pixel_auroc/a_std_l1']:.3f} | {m['pixel_auroc/a_std_l2']:.3f} | n/a | completed |"
            in md
        )
    assert "| no_such_category | — | — | — | n/a | failed: DatasetError" in md
    mean = (
        results["tex_a"]["metrics"]["image_auroc/A_std_l2"]
        + results["tex_b"]["metrics"]["image_auroc/A_std_l2"]
    ) / 2
    assert "(2 of 3 categories completed) | " in md and f"{mean:.3f}" in md

    rows = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    by_cat = {r["category"]: r for r in rows if r["row"] in ("run", "mean")}  # a category's mean row last
    assert (
        float(by_cat["tex_a"]["image_auroc/A_std_l2"]) == results["tex_a"]["metrics"]["image_auroc/A_std_l2"]
    )
    assert next(r for r in rows if r["category"] == "no_such_category")["status"] == "failed"
    # the published EBM image AUROC is a 15-category mean: not compared with a mean over tex_a, tex_b
    assert by_cat["mean"]["paper_image_auroc"] == "" and "0.720 as the mean over 15 categories only" in md


@pytest.mark.slow  # (make test-all) keeps the default run under 15 min on 2 cores
def test_report_lists_categories_that_never_ran(synth_root, tmp_path):
    sweep = tmp_path / "sweep"
    assert cli(*sweep_args(synth_root, sweep, "tex_a")).returncode == 0
    r = report(sweep, tmp_path / "rep")
    assert r.returncode == 0
    from ebmad.report import collect_jobs

    jobs = collect_jobs(sweep, categories=["tex_a", "tex_b", "tex_c"])
    assert [(j.category, j.status) for j in jobs] == [
        ("tex_a", "completed"),
        ("tex_b", "missing"),
        ("tex_c", "missing"),
    ]


@pytest.mark.slow  # (make test-all) keeps the default run under 15 min on 2 cores
def test_rerunning_a_finished_sweep_skips_completed_jobs(synth_root, tmp_path):
    sweep = tmp_path / "sweep"
    args = sweep_args(synth_root, sweep)
    assert cli(*args).returncode == 0
    stamps = {f: f.stat().st_mtime_ns for f in sweep.glob("*/results.json")}
    ckpts = {f: f.stat().st_mtime_ns for f in sweep.glob("*/checkpoints/last.ckpt")}
    assert len(stamps) == 2 and len(ckpts) == 2
    p = cli(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("SKIP category=") == 2 and "RESULT category=" not in p.stdout
    assert {f: f.stat().st_mtime_ns for f in sweep.glob("*/results.json")} == stamps
    assert {f: f.stat().st_mtime_ns for f in sweep.glob("*/checkpoints/last.ckpt")} == ckpts


@pytest.mark.slow  # the same 3-trial search as tests/test_report.py::test_search_report_ranks_the_trials_by_the_objective
def test_optuna_search_optimizes_the_label_free_validation_metric(synth_root, tmp_path):
    sweep = tmp_path / "optuna"
    base = [o for o in tiny_overrides(synth_root) if not o.startswith("model.sgld_steps")]
    p = cli("hparams_search=ebm_optuna", *base, "logger=none", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads(f.read_text()) for f in sweep.glob("*/results.json")]
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials)
    for t in trials:
        assert t["n_train"] == 14  # 2 of 16 training images held out for validation
        assert set(t["validation"]) >= {"validation/score", "validation/image_auroc/A_std_l2",
                                        "validation/pixel_auroc/a_std_l2", "validation/color/score"}  # fmt: skip
        assert t["validation_set"]["kinds"] == ["perlin_patch", "warp", "color"]
    assert best["best_value"] == max(t["validation"]["validation/score"] for t in trials)
    assert set(best["best_params"]) == {"model.sgld_step_size", "model.sgld_noise", "model.sgld_steps", "model.lr",
                                        "model.data_noise"}  # fmt: skip


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ebmad.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["experiment=paper_sweep", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"])  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 4 and launcher.max_num_timeout == 3
    assert cfg.hydra.sweeper.params["data.category"].count(",") == 14  # all 15 MVTec AD categories


@pytest.mark.slow  # (make test-all) keeps the default run under 15 min on 2 cores
def test_sweep_through_the_submitit_launcher(synth_root, tmp_path):
    # submitit's local executor: the same launcher plugin as SLURM, with jobs as separate processes
    sweep = tmp_path / "sweep"
    p = cli(*sweep_args(synth_root, sweep), "hydra/launcher=submitit_local", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    done = [json.loads(f.read_text()) for f in sweep.glob("*/results.json")]
    assert sorted(d["category"] for d in done) == ["tex_a", "tex_b"]
    assert all(d["status"] == "completed" for d in done)


def test_two_model_multirun_writes_the_comparison_report(synth_root, tmp_path):
    sweep = tmp_path / "cmp"
    base = [o for o in tiny_overrides(synth_root) if not o.startswith(("model.", "trainer.max_steps"))]
    p = cli("-m", "recipe=ebm_tiny,ssae_tiny", *base, "trainer.max_steps=4", "eval.figures=false",
            "logger=csv", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    results = {r["model"]: r for r in (json.loads(f.read_text()) for f in sweep.glob("*/results.json"))}
    assert set(results) == {"ebm", "ssae"} and all(r["status"] == "completed" for r in results.values())
    md = (sweep / "report.md").read_text()
    assert md.count("## Setting:") == 1  # the model is a column, not a setting
    head = "| category | ebm (A_std_l2) | paper ebm | Δ | ssae (max_smooth) | paper ssae | Δ | status |"
    assert "**Table 1: image-level AUROC**" in md and head in md
    e, s = results["ebm"], results["ssae"]
    assert f"| tex_a | {e['image_auroc']:.3f} | n/a | n/a | {s['image_auroc']:.3f} | n/a | n/a | " in md
    assert (
        f"| **mean** (completed/all categories) | {e['aupro']:.3f} (1/1) | {s['aupro']:.3f} (1/1) |" in md
    )  # no paper AUPRO
    assert "0.998 as the mean over 15 categories only" in md  # named, not compared with one category
    ref = e["reference"]["untrained"]
    assert "**EBM: trained vs untrained reference" in md
    assert f"| tex_a | {e['image_auroc']:.3f} | {ref['image_auroc/A_std_l2']:.3f} | " in md
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    means = {r["model"]: r for r in rows if r["category"] == "mean"}
    assert means["ssae"]["paper_image_auroc"] == "" and means["ebm"]["paper_image_auroc"] == ""
    assert float(means["ssae"]["headline_image_auroc"]) == s["image_auroc"]
