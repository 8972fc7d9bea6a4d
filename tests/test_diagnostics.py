"""EBMDiagnostics: per-step CSV (resumed without duplicates), sample grids, energy histograms, no-op elsewhere."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from ebmad.models.ebm.diagnostics import COLUMNS, EBMDiagnostics, sample_grid, to_uint8
from ebmad.train import run

from conftest import read_scores


def rows_of(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_grid_puts_positives_above_samples():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 4)).ravel().tolist() == [0, 128, 255, 255]
    pos, neg = -torch.ones(3, 1, 4, 5), torch.ones(3, 1, 4, 5)  # grayscale: black data, white samples
    grid = sample_grid(pos, neg, n=8, pad=2)
    assert grid.shape == (2 * 4 + 3 * 2, 3 * 5 + 4 * 2, 3) and grid.dtype == np.uint8
    assert (grid[2:6, 2:7] == 0).all() and (grid[8:12, 2:7] == 255).all()
    rgb = sample_grid(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), n=1)
    assert rgb.shape == (14, 8, 3)


def test_ebm_run_writes_rows_and_pngs(make_cfg, tmp_path):
    out = tmp_path / "d"
    run(make_cfg("test=false", "logger=csv", "callbacks.diagnostics.every_n_steps=2", out=out))
    header, rows = rows_of(out / "diagnostics" / "diagnostics.csv")
    assert header == list(COLUMNS) and [int(r["step"]) for r in rows] == list(range(6))
    for r in rows:
        values = {k: float(v) for k, v in r.items()}
        assert all(math.isfinite(v) for v in values.values()), r
        assert math.isclose(
            values["gap"], values["energy_neg"] - values["energy_pos"], rel_tol=1e-5, abs_tol=1e-6
        )
        assert math.isclose(values["cd"], -values["gap"], rel_tol=1e-5, abs_tol=1e-6)
        assert values["param_grad_norm"] > 0 and values["sgld_grad_norm"] > 0 and values["lr"] == 1e-4
    names = sorted(p.name for p in (out / "diagnostics").glob("*.png"))
    steps = (0, 2, 4, 5)  # every 2 steps, and the last one
    assert names == sorted(
        [f"energy_hist_step{s:06d}.png" for s in steps] + [f"samples_step{s:06d}.png" for s in steps]
    )
    grid = Image.open(out / "diagnostics" / "samples_step000004.png")
    assert grid.size == (8 * 32 + 9 * 2, 2 * 32 + 3 * 2) and grid.mode == "RGB"
    assert Image.open(out / "diagnostics" / "energy_hist_step000005.png").size[0] > 100
    logged = [r for r in read_scores(out / "csv" / "metrics.csv") if r.get("train/param_grad_norm")]
    assert len(logged) == 6 and all(math.isclose(float(r["train/lr"]), 1e-4, rel_tol=1e-6) for r in logged)
    by_step = {int(r["step"]): float(r["train/param_grad_norm"]) for r in logged}
    assert by_step == {int(r["step"]): float(r["param_grad_norm"]) for r in rows}  # same step numbering


def test_resumed_run_appends_without_duplicate_steps(make_cfg, tmp_path):
    out = tmp_path / "k"
    common = ("test=false", "callbacks.model_checkpoint.every_n_train_steps=100")
    run(make_cfg(*common, "trainer.max_steps=3", out=out))
    path = out / "diagnostics" / "diagnostics.csv"
    # as if a run had been killed after writing the rows of steps 3 and 4, before checkpointing them
    with open(path, "a", newline="") as fh:
        csv.writer(fh).writerows([[3, *["-9"] * 7], [4, *["-9"] * 7]])
    run(make_cfg(*common, "trainer.max_steps=6", out=out))  # resumes from last.ckpt (step 3)
    header, rows = rows_of(path)
    assert header == list(COLUMNS) and [int(r["step"]) for r in rows] == list(range(6))
    assert all(r["energy_pos"] != "-9" for r in rows)


def test_draem_run_is_unaffected(make_cfg, tmp_path):
    out = tmp_path / "draem"
    res = run(make_cfg("model=draem", "model.recon_base_width=8", "model.disc_base_width=8", "trainer.max_steps=2",
                       "eval.figures=false", "callbacks.diagnostics.every_n_steps=1", out=out))  # fmt: skip
    assert res["status"] == "completed" and json.loads((out / "results.json").read_text())["model"] == "draem"
    assert not (out / "diagnostics").exists()


class FakeWandb(pl.loggers.WandbLogger):
    def __init__(self):  # no W&B run: only what log_image is given
        self.images = []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))


def test_images_go_to_a_wandb_logger(tmp_path):
    cb = EBMDiagnostics(str(tmp_path / "diag"), every_n_steps=1)
    gen = torch.Generator().manual_seed(0)
    module = SimpleNamespace(hparams={"data_range": (-1.0, 1.0)}, train_diagnostics={
        "x_pos": torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1, "x_neg": torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1,
        "energy_pos": torch.randn(4, generator=gen), "energy_neg": torch.randn(4, generator=gen) + 3})  # fmt: skip
    wb = FakeWandb()
    cb._save_images(SimpleNamespace(loggers=[wb], global_step=8), module, 7)
    grid, hist = (
        tmp_path / "diag" / "samples_step000007.png",
        tmp_path / "diag" / "energy_hist_step000007.png",
    )
    assert grid.is_file() and hist.is_file()
    assert wb.images == [("train/samples", [str(grid)], 7), ("train/energy_hist", [str(hist)], 7)]
