"""End-to-end runs through the real Hydra config (shrunk): statistics, checkpoints, resume, W&B, errors."""

import json

import pytest
import torch

from ebmad.data import MVTecDataModule
from ebmad.models.ebm import EBMModule
from ebmad.models.ebm.scoring import energy_and_grad
from ebmad.train import run

from conftest import assert_same_training_state, ckpt_state, read_scores
from wandb_records import summary_and_config


def test_train_test_writes_results_and_checkpoint_with_stats(make_cfg, tmp_path):
    cfg = make_cfg(out=tmp_path / "a")
    res = run(cfg)
    out = tmp_path / "a"
    saved = json.loads((out / "results.json").read_text())
    assert saved["category"] == "tex_a" and saved["status"] == "completed"
    for key in ("energy", "A_raw_l1", "A_raw_l2", "A_std_l1", "A_std_l2"):
        assert 0.0 <= saved["metrics"][f"image_auroc/{key}"] <= 1.0
    for key in ("a_raw_l1", "a_raw_l2", "a_std_l1", "a_std_l2"):
        assert 0.0 <= saved["metrics"][f"pixel_auroc/{key}"] <= 1.0
    assert saved["metrics"] == pytest.approx(res["metrics"])
    assert saved["n_train"] == 16 and saved["n_test"] == 14 and saved["global_step"] == 6
    assert saved["device"]["type"] == "cpu" and "commit" in saved["git"]
    assert saved["config"]["data"]["category"] == "tex_a"
    assert saved["score_statistics"]["A_std_l2"]["good"]["n"] == 6
    assert len(read_scores(out / "scores.csv")) == 14
    assert len(list((out / "maps").glob("*.png"))) == 8
    state = ckpt_state(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert float(state["stats_count"]) == 16
    assert state["grad_std"].shape == (3, 32, 32) and float(state["grad_std"].min()) > 0


def test_stats_callback_equals_direct_computation(make_cfg, tmp_path, synth_root):
    run(make_cfg("test=false", out=tmp_path / "s"))
    model = EBMModule.load_from_checkpoint(tmp_path / "s" / "checkpoints" / "last.ckpt", map_location="cpu")
    images = MVTecDataModule(str(synth_root), "tex_a", image_size=32).load_train()["image"]
    grads = torch.cat([energy_and_grad(model.net, x[None])[1] for x in images]).double()
    assert torch.allclose(model.grad_mean.double(), grads.mean(0), rtol=1e-4, atol=1e-7)
    assert torch.allclose(model.grad_std.double(), grads.std(0, unbiased=False), rtol=1e-4, atol=1e-7)


def test_checkpoint_round_trip_scores_identically_without_recomputing(make_cfg, tmp_path, monkeypatch):
    run(make_cfg(out=tmp_path / "fit"))
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"

    def fail(*a, **k):
        raise AssertionError("statistics were recomputed")

    monkeypatch.setattr(EBMModule, "fit_statistics", fail)
    # (the untrained reference fits statistics of its own, by design: off here)
    res = run(
        make_cfg("train=false", f"ckpt_path={ckpt}", "eval.untrained_reference=false", out=tmp_path / "eval")
    )
    before, after = (
        read_scores(tmp_path / "fit" / "scores.csv"),
        read_scores(tmp_path / "eval" / "scores.csv"),
    )
    assert before == after
    assert res["metrics"] == json.loads((tmp_path / "fit" / "results.json").read_text())["metrics"]


@pytest.mark.parametrize("batch,stop", [(8, 4), (4, 6)], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_exact(make_cfg, tmp_path, batch, stop):
    common = ("test=false", f"data.batch_size={batch}")
    run(make_cfg(*common, "trainer.max_steps=8", out=tmp_path / "full"))
    run(make_cfg(*common, f"trainer.max_steps={stop}", out=tmp_path / "part"))
    first = ckpt_state(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert first["global_step"] == stop
    resumed_from = tmp_path / "part" / "checkpoints" / "last.ckpt"
    run(make_cfg(*common, "trainer.max_steps=8", f"ckpt_path={resumed_from}", out=tmp_path / "resumed"))
    a = ckpt_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = ckpt_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["epoch"] == b["epoch"]
    assert_same_training_state(a, b)


def test_wandb_offline_run_files(make_cfg, tmp_path):
    out = tmp_path / "wb"
    run(make_cfg("logger=wandb", "tags=[unit]", out=out))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1, "no W&B transaction log written"
    summary, config = summary_and_config(files[0])
    saved = json.loads((out / "results.json").read_text())
    assert summary["test/image_auroc/A_std_l2"] == pytest.approx(saved["metrics"]["image_auroc/A_std_l2"])
    assert summary["test/anomaly_maps/count"] == 8
    assert config["sgld_steps"] == 5 and config["cfg"]["data"]["category"] == "tex_a"
    assert config["_group"] == "train-default" and config["_project"] == "ebmad"  # <task_name>-<sweep_name>


def test_csv_logger(make_cfg, tmp_path):
    run(make_cfg("logger=csv", out=tmp_path / "c"))
    rows = read_scores(tmp_path / "c" / "csv" / "metrics.csv")
    assert any(r.get("train/loss") for r in rows) and any(r.get("test/image_auroc/A_std_l2") for r in rows)


@pytest.mark.parametrize(
    "override,match",
    [("model.sgld_steps=0", "model.sgld_steps"), ("model.sgld_step_size=-1", "model.sgld_step_size"),
     ("model.optimizer=rmsprop", "model.optimizer"), ("model.lr=0", "model.lr"),
     ("trainer.inference_mode=true", "trainer.inference_mode"), ("data.image_size=48", "image_size"),
     ("train=false", "ckpt_path"), ("ckpt_path=/no/such.ckpt", "/no/such.ckpt"),
     ("data.category=nope", "category 'nope'"), ("data.root=/no/such/root", "/no/such/root")],
)  # fmt: skip
def test_invalid_config_values_are_named(make_cfg, override, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run(make_cfg(override))


def test_scoring_without_stats_is_refused():
    model = EBMModule(image_size=32)
    with pytest.raises(RuntimeError, match="gradient statistics are not fitted"):
        model.score(torch.zeros(1, 3, 32, 32))


def test_run_folder_is_skipped_when_done_and_never_reused_for_another_model(make_cfg, tmp_path):
    out = tmp_path / "job"
    first = run(make_cfg(out=out))
    again = run(make_cfg(out=out))  # completed: returned from results.json, nothing retrained
    assert again["metrics"] == pytest.approx(first["metrics"])
    with pytest.raises(ValueError, match=r"different configuration \(model.base_width differ\)"):
        run(make_cfg("model.base_width=16", out=out))
    fresh = run(make_cfg("model.base_width=16", "resume=false", out=out))
    assert fresh["config"]["model"]["base_width"] == 16
