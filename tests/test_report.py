"""The sweep report: seeds as replicates, the published comparison, searches, HTML (in a real browser), W&B."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_hydra import cli

from ebmad.evaluation.examples import load_examples, select_examples
from ebmad.report import Job, write_reports
from ebmad.reporting.sweeps import load_sweep
from ebmad.reporting.tables import metric_table, table_md

from conftest import tiny_overrides

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def _results(sweep: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(sweep.glob("*/results.json"))]


@pytest.fixture(scope="module")
def seed_sweep(synth_root, tmp_path_factory) -> Path:
    """2 models x 2 seeds on one synthetic category (report written by the sweep's callback)."""
    sweep = tmp_path_factory.mktemp("report") / "sweep"
    base = [o for o in tiny_overrides(synth_root) if not o.startswith(("model.", "trainer.max_steps"))]
    p = cli("-m", "recipe=ebm_tiny,ssae_tiny", "seed=0,1", *base, "trainer.max_steps=4", "eval.figures=false",
            "logger=csv", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "HTML report: " in p.stdout
    (sweep.parent / "output.txt").write_text(p.stdout + p.stderr)
    return sweep


def test_the_sweep_runs_seed_major_and_says_which_job_of_how_many(seed_sweep):
    """Every method gets seed 0 before any gets seed 1; each job logs "sweep job i/4: <overrides>"."""
    text = (seed_sweep.parent / "output.txt").read_text()
    jobs = re.findall(r"sweep job (\d)/4: (.*)", text)
    assert [int(i) for i, _ in jobs] == [1, 2, 3, 4]
    seeds = [re.search(r"seed=(\d)", overrides).group(1) for _, overrides in jobs]
    assert seeds == ["0", "0", "1", "1"], jobs
    assert (
        "Command: `python -m ebmad.train -m recipe=ebm_tiny,ssae_tiny seed=0,1"
        in (seed_sweep / "report.md").read_text()
    )


def test_seeds_are_replicates_mean_and_sample_std_match_the_runs(seed_sweep, tmp_path):
    runs = _results(seed_sweep)
    assert sorted((r["model"], r["config"]["seed"]) for r in runs) == [("ebm", 0), ("ebm", 1), ("ssae", 0),
                                                                       ("ssae", 1)]  # fmt: skip
    assert all(r["status"] == "completed" for r in runs)
    md = (seed_sweep / "report.md").read_text()
    assert md.count("## Setting:") == 1  # seed is not a setting
    assert "sample standard deviation (ddof=1)" in md and "Seeds: 0, 1." in md
    assert "| category | ebm (A_std_l2) | paper ebm | Δ | ssae (max_smooth) | paper ssae | Δ | status |" in md
    assert "image size 32, 4 steps (trainer.max_steps), eval resolution model; seeds 0, 1" in md
    rows = list(csv.DictReader((seed_sweep / "report.csv").open()))
    for model in ("ebm", "ssae"):
        mine = [r for r in runs if r["model"] == model]
        cells = []
        for metric in METRICS:
            values = [r[metric] for r in mine]
            cells.append(_mean_std(values))
            agg = {
                r["row"]: r
                for r in rows
                if r["model"] == model and r["category"] == "tex_a" and r["row"] != "run"
            }
            assert float(agg["mean"][f"headline_{metric}"]) == pytest.approx(
                statistics.fmean(values), abs=1e-12
            )
            assert float(agg["std"][f"headline_{metric}"]) == pytest.approx(
                statistics.stdev(values), abs=1e-12
            )
            assert agg["mean"]["n"] == "2"
            # one category: the mean over categories is that category's mean, its spread the same seeds'
            assert "| **mean** (completed/all categories) | " in md
            assert f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (1/1, n=2)" in md
        for cell in cells:
            assert f"| tex_a | {cell} |" in md or f"| {cell} |" in md
        key = "image_auroc/energy" if model == "ebm" else "image_auroc/mean_error"
        energy = [r["metrics"][key] for r in mine]
        run_rows = [r for r in rows if r["model"] == model and r["row"] == "run"]
        assert sorted(float(r[key]) for r in run_rows) == sorted(energy)  # every run kept in the CSV
    ebm = [r for r in runs if r["model"] == "ebm"]
    assert f"| tex_a | {_mean_std([r['metrics']['image_auroc/energy'] for r in ebm])} |" in md
    head = next(csv.reader((seed_sweep / "report.csv").open()))
    assert len(head) == len(set(head)), "duplicate CSV columns"

    # a missing seed lowers n and is named
    copy = tmp_path / "sweep"
    shutil.copytree(seed_sweep, copy, ignore=shutil.ignore_patterns("*.ckpt", "report.*"))
    gone = next(f.parent for f in copy.glob("*/results.json")
                if json.loads(f.read_text())["model"] == "ssae" and json.loads(f.read_text())["config"]["seed"] == 1)  # fmt: skip
    shutil.rmtree(gone)
    write_reports(copy, formats=("md", "csv"), wandb=False)
    md = (copy / "report.md").read_text()
    kept = next(r for r in runs if r["model"] == "ssae" and r["config"]["seed"] == 0)
    assert (
        f"| {kept['image_auroc']:.3f} (n=1) | n/a | n/a | ssae seed=1 missing (1 of 2 seeds completed) |"
        in md
    )
    assert "| default | ssae | tex_a | 1 | missing |" in md  # the jobs-not-completed table
    rows = list(csv.DictReader((copy / "report.csv").open()))
    agg = next(r for r in rows if r["model"] == "ssae" and r["category"] == "tex_a" and r["row"] == "mean")
    assert agg["n"] == "1" and float(agg["headline_image_auroc"]) == kept["image_auroc"]
    assert any(r["status"] == "missing" and r["seed"] == "1" and r["model"] == "ssae" for r in rows)


def test_every_model_shows_the_same_examples_good_and_each_defect(seed_sweep):
    files = sorted(seed_sweep.glob("*/examples.npz"))
    assert len(files) == 4
    data = [load_examples(f) for f in files]
    paths = [d["paths"].tolist() for d in data]
    assert all(p == paths[0] for p in paths)  # the same test images for every model and seed
    defects = data[0]["defects"].tolist()
    assert defects[0] == "good" and {"good", "spot", "scratch"} <= set(defects)
    for d in data:
        assert d["maps"].dtype == np.float16 and d["images"].dtype == np.uint8
        assert d["maps"].shape == (8, 32, 32) and d["pro"].shape[0] == 2 and d["pro"].shape[1] > 2
    for png in sorted(seed_sweep.glob("*/maps/*.png")):
        w, h = Image.open(png).size
        assert h >= 256 and w >= 3 * 256  # image | mask | map, each >= 256 px


def test_example_selection_takes_good_then_each_defect_type():
    defects = ["crack", "crack", "good", "good", "hole", "good", "hole", "crack"]
    assert select_examples(defects, 3) == [2, 0, 4]
    assert select_examples(defects, 5) == [2, 3, 0, 1, 4]
    assert select_examples(defects, 100) == [2, 3, 5, 0, 1, 7, 4, 6]
    assert select_examples(["good"] * 3, 2) == [0, 1]


def _job(category: str, value: float, model: str = "ebm", seed: str = "0", size: int = 128, steps: int = 5000,
         data: dict | None = None) -> Job:  # fmt: skip
    """A completed job; by default trained as Genc et al. (MVTec AD, 128 px, 5000 steps): comparable."""
    config = {"data": {"layout": "mvtec", "image_size": size, "batch_size": 32, **(data or {})}}
    return Job(None, category, "default", "completed", headline={"image_auroc": value, "pixel_auroc": value},
               model=model, seed=seed, scores={"image_auroc": "A_std_l2", "pixel_auroc": "a_std_l2"},
               config=config, global_step=steps, n_train=209)  # fmt: skip


def test_the_mean_row_compares_over_the_same_categories_only():
    one = [_job("bottle", 0.881)]
    image = table_md(metric_table(one, "image_auroc", "t"))
    assert "| **mean** (completed/all categories) | 0.881 (1/1) | n/a | n/a |  |" in image  # not beside 0.720
    assert "0.720 as the mean over 15 categories only" in " ".join(image)
    pixel = table_md(metric_table(one, "pixel_auroc", "t"))
    assert "| bottle | 0.881 | 0.720 | +0.161 | completed |" in pixel  # per-category published value
    assert "| **mean** (completed/all categories) | 0.881 (1/1) | 0.720 | +0.161 |  |" in pixel
    two = [_job("bottle", 0.9), _job("pill", 0.8)]
    pixel = table_md(metric_table(two, "pixel_auroc", "t"))
    assert (
        "| **mean** (completed/all categories) | 0.850 (2/2) | 0.735 | +0.115 |  |" in pixel
    )  # (0.72+0.75)/2
    cats = "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper"
    full = [_job(c, 0.8) for c in cats.split()]
    image = table_md(metric_table(full, "image_auroc", "t"))
    assert "| **mean** (completed/all categories) | 0.800 (15/15) | 0.720 | +0.080 |  |" in image


def test_a_published_value_is_context_only_where_the_protocol_differs():
    """32 px, 150 steps on synthetic data vs Genc et al. (MVTec AD, 128 px, 5000 steps): no Δ, the reasons."""
    tiny = [_job("bottle", 0.877, size=32, steps=150, data={"synthetic": {"size": 64}})]
    lines = table_md(metric_table(tiny, "pixel_auroc", "t"))
    why = "synthetic data, the paper's mvtec_ad; 32 px, the paper's 128 px; 150 steps, the paper's 5000"
    assert f"| bottle | 0.877 | 0.720 | not comparable: {why} | completed |" in lines
    assert not any("+0.157" in line for line in lines)  # the Δ of the issue is gone
    assert any(line.startswith("- ebm: the published values are context only") for line in lines)
    # one thing differs: only it is named; a run trained at least 90 % of the paper's length is comparable
    lines = table_md(metric_table([_job("bottle", 0.8, steps=4600)], "pixel_auroc", "t"))
    assert "| bottle | 0.800 | 0.720 | +0.080 | completed |" in lines
    lines = table_md(metric_table([_job("bottle", 0.8, steps=4000)], "pixel_auroc", "t"))
    assert "| bottle | 0.800 | 0.720 | not comparable: 4000 steps, the paper's 5000 | completed |" in lines
    # DRAEM's protocol is in epochs (700 at 256 px): 18,000 steps x 8 / 209 images = 689 epochs
    draem = _job("bottle", 0.99, model="draem", size=256, steps=18000, data={"batch_size": 8})
    lines = table_md(metric_table([draem], "pixel_auroc", "t"))
    assert "| bottle | 0.990 | 0.991 | -0.001 | completed |" in lines
    short = _job("bottle", 0.9, model="draem", size=256, steps=800, data={"batch_size": 8})
    lines = table_md(metric_table([short], "pixel_auroc", "t"))
    assert "not comparable: 31 epochs, the paper's 700" in " ".join(lines)
    # SSAE's training length is not in published.csv: never compared, and said why
    ssae = _job("bottle", 0.99, model="ssae", size=256, steps=20000)
    lines = table_md(metric_table([ssae], "image_auroc", "t"))
    assert "the paper's training length is not recorded" in " ".join(lines)


def test_a_published_value_of_another_backbone_is_context_only():
    """PatchCore on EfficientNet-Lite0 at the paper's data, size and (no) training steps vs the paper's
    WideResNet-50: the backbone alone makes it not comparable; the same backbone would be compared."""
    lite = _job("bottle", 0.99, model="patchcore", size=224, steps=0)
    lite.config["model"] = {"backbone": "efficientnet_lite0"}
    lines = table_md(metric_table([lite], "pixel_auroc", "t"))
    why = "efficientnet_lite0 backbone, the paper's wide_resnet50_2"
    assert f"| bottle | 0.990 | 0.985 | not comparable: {why} | completed |" in lines
    assert any(line.startswith("- patchcore: the published values are context only") for line in lines)
    same = _job("bottle", 0.99, model="patchcore", size=224, steps=0)
    same.config["model"] = {"backbone": "wide_resnet50_2"}
    lines = table_md(metric_table([same], "pixel_auroc", "t"))
    assert "| bottle | 0.990 | 0.985 | +0.005 | completed |" in lines


def test_captions_state_n_and_say_single_run():
    one = table_md(metric_table([_job("bottle", 0.8), _job("pill", 0.7)], "pixel_auroc", "t"))
    assert "- single run (n = 1) per model and category: no standard deviation" in one
    two = table_md(metric_table([_job("bottle", 0.8), _job("bottle", 0.9, seed="1")], "pixel_auroc", "t"))
    assert "- mean ± sample standard deviation over n = 2 seeds per model and category" in two


def _fake_job(sweep: Path, name: str, written: float) -> None:
    folder = sweep / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"status": "completed", "category": "tex_a", "model": "ebm",
                                                     "config": {"seed": 0}}))  # fmt: skip
    os.utime(folder / "results.json", (written, written))


def test_the_header_names_every_invocation_that_ran_jobs(tmp_path):
    from omegaconf import OmegaConf

    from ebmad.report import SweepSummary
    from ebmad.reporting.tables import header_lines

    sweep = tmp_path / "sweep"
    first = {"hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["recipe=ebm_tiny,ssae_tiny"]}}}
    second = {"hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["recipe=draem_tiny"]}}}
    third = {"hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["recipe=ebm_tiny,ssae_tiny"]}}}
    t0 = time.time() - 100
    for i, cfg in enumerate((first, second, third)):  # the third ran nothing (all jobs done): not listed
        SweepSummary().on_multirun_start(OmegaConf.create(cfg))
        lines = (sweep / "invocations.jsonl").read_text().splitlines()
        rec = json.loads(lines[-1])
        rec["started"] = t0 + 30 * i
        (sweep / "invocations.jsonl").write_text("\n".join([*lines[:-1], json.dumps(rec)]) + "\n")
    _fake_job(sweep, "recipe=ebm_tiny", t0 + 10)
    _fake_job(sweep, "recipe=ssae_tiny", t0 + 20)
    _fake_job(sweep, "recipe=draem_tiny", t0 + 40)
    lines = header_lines(load_sweep(sweep))
    assert "Command 1 of 2 (2 jobs): `python -m ebmad.train -m recipe=ebm_tiny,ssae_tiny`" in lines
    assert "Command 2 of 2 (1 job): `python -m ebmad.train -m recipe=draem_tiny`" in lines
    assert not any(line.startswith("Command: ") for line in lines)


def test_search_report_ranks_the_trials_by_the_objective(synth_root, tmp_path):
    sweep = tmp_path / "optuna"
    base = [
        o for o in tiny_overrides(synth_root) if not o.startswith(("model.sgld_steps", "trainer.max_steps"))
    ]
    p = cli("hparams_search=ebm_optuna", *base, "trainer.max_steps=3", "eval.figures=false", "logger=none",
            "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
            "model.sgld_steps=choice(2,3)", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = _results(sweep)
    assert len(trials) == 3
    md = (sweep / "report.md").read_text()
    assert "Trials: 3 completed (n_trials=3)" in md and "missing" not in md  # no phantom jobs
    assert "| rank | trial | objective (validation/score, maximize) |" in md
    ranked = [line for line in md.splitlines() if re.match(r"\| [123] \| \d \| ", line)]
    assert len(ranked) == 3
    objectives = [float(line.split("|")[3]) for line in ranked]
    assert objectives == sorted(objectives, reverse=True)
    assert objectives[0] == pytest.approx(best["best_value"], abs=5e-5)
    assert md.count("## Setting:") == 1  # the best trial's tables
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    runs = [r for r in rows if r["row"] == "run"]
    assert sorted(float(r["objective"]) for r in runs) == sorted(
        t["validation"]["validation/score"] for t in trials
    )
    assert {r["trial"] for r in runs} == {"0", "1", "2"}
    # the objective is the label-free validation score on graded kinds (hparams_search=ebm_optuna)
    for t in trials:
        assert t["validation"]["validation/score"] == pytest.approx(
            (
                t["validation"]["validation/image_auroc/A_std_l2"]
                + t["validation"]["validation/pixel_auroc/a_std_l2"]
            )
            / 2
        )
        assert (
            t["validation_set"]["kinds"] == ["perlin_patch", "warp", "color"]
            and "validation/color/score" in t["validation"]
        )


# ----------------------------------------------------------------------------------------- HTML
def _embedded_pngs(page: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(b)))
        for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    ]


def test_html_report_is_self_contained_with_every_table_and_figure(seed_sweep):
    page = (seed_sweep / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page), "external resource in report.html"
    md = (seed_sweep / "report.md").read_text()
    titles = re.findall(r"^\*\*(.+)\*\*$", md, flags=re.M)
    for title in titles:
        assert f"<h3>{html.escape(title)}</h3>" in page
    assert page.count("<table") == len(titles)
    images = _embedded_pngs(page)
    # a bar chart per metric table (4), the ROC/PRO curves and the anomaly-map strip of the category
    assert len(images) == 4 + 1 + 1
    for im in images:
        assert np.asarray(im.convert("L")).std() > 5  # drawn, not blank
    strip = images[-1]
    assert strip.size[0] >= 4 * 256 and strip.size[1] >= 8 * 256  # image | mask | 2 maps, 8 examples
    assert "Command: <code>python -m ebmad.train -m recipe=ebm_tiny,ssae_tiny seed=0,1" in page
    assert "Commit: " in page and "Device: cpu" in page and "untrained reference" in page


CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const r = {images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
             tables: document.querySelectorAll("table").length};
  const pre = document.createElement("pre"); pre.id = "ebmad-check"; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _browser() -> str | None:
    return next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)


def test_html_report_in_a_headless_browser(seed_sweep, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/google-chrome installed (apt-get install chromium): browser check skipped")
    page = (seed_sweep / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    found = re.search(r'<pre id="ebmad-check">(.*?)</pre>', dom.stdout)
    assert found, f"the page did not load in {browser}: {dom.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert check == {"images": 6, "broken": 0, "tables": page.count("<table")}
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,2000", (seed_sweep / "report.html").as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    im = np.asarray(Image.open(shot).convert("L"))
    assert im.shape == (2000, 1400)
    assert (im < 128).mean() > 0.01 and im.std() > 20  # text, tables and figures drawn on the page


# ----------------------------------------------------------------------------------------- W&B
def test_summary_is_logged_to_wandb_offline_under_the_sweep_group(seed_sweep, tmp_path):
    from ebmad.reporting.wandb_table import COLUMNS, log_summary, summary_rows

    from wandb_records import records, summary_and_config

    copy = tmp_path / "sweep"
    shutil.copytree(seed_sweep, copy, ignore=shutil.ignore_patterns("*.ckpt", "*.npz", "maps", "report.*"))
    sweep = load_sweep(copy)
    assert log_summary(sweep) is None  # the runs logged to CSV, not W&B: nothing is logged
    folder = log_summary(sweep, {"project": "ebmad", "group": "train-report-test", "offline": True})
    assert folder is not None and folder.name.startswith("offline-run-")
    run_file = next(folder.glob("run-*.wandb"))
    for _ in range(60):  # the W&B service may still be writing the offline run file after finish()
        summary, config = summary_and_config(run_file)
        if "report/summary/_type" in summary and "_group" in config:
            break
        time.sleep(0.5)
    assert config["_group"] == "train-report-test" and config["_project"] == "ebmad"
    assert summary["report/summary/_type"] == "table-file"
    table = json.loads((folder / "files" / summary["report/summary/path"]).read_text())
    assert table["columns"] == COLUMNS
    expected = summary_rows(sweep)
    assert len(table["data"]) == len(expected) == 2 * 4 * 2  # 2 models x 4 metrics x (tex_a, mean)
    row = next(r for r in table["data"] if r[1] == "ebm" and r[2] == "tex_a" and r[3] == "image_auroc")
    values = [r["image_auroc"] for r in _results(seed_sweep) if r["model"] == "ebm"]
    assert row[4] == pytest.approx(statistics.fmean(values)) and row[5] == pytest.approx(
        statistics.stdev(values)
    )
    assert row[6] == 2 and records(run_file)


def test_fit_only_models_are_described_without_training_steps():
    from ebmad.reporting.tables import setting_lines

    cfg = {"data": {"image_size": 224}, "trainer": {"max_steps": 20}, "eval": {"resolution": "native"}}
    jobs = [
        Job(None, "bottle", "s", "completed", model=m, seed="0", config=cfg) for m in ("patchcore", "ebm")
    ]
    lines = {line.split(":")[0]: line for line in setting_lines(jobs)}
    patchcore, ebm = lines["- patchcore"], lines["- ebm"]
    assert "no training steps (fitted in one pass)" in patchcore and "trainer.max_steps" not in patchcore
    assert "20 steps (trainer.max_steps)" in ebm
