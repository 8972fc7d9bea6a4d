"""The untrained reference: exactly the initial weights, its own statistics, recorded in results.json."""

import json
import logging

import pytorch_lightning as pl
import torch

from ebmad.run.untrained import initial_model, training_gain
from ebmad.train import build_datamodule, build_model, run


def test_initial_model_has_the_weights_training_started_from(make_cfg, tmp_path):
    cfg = make_cfg(out=tmp_path / "r")
    dm = build_datamodule(cfg)
    pl.seed_everything(cfg.seed, workers=True)  # as ebmad.train.run does right before building the model
    start = build_model(cfg, dm)
    trained = build_model(cfg, dm)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # stands for training
    ref = initial_model(trained)
    for k, v in start.net.state_dict().items():
        assert torch.equal(v, ref.net.state_dict()[k]), k


def test_ebm_run_records_untrained_reference(make_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run(make_cfg(out=tmp_path / "r"))
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    ref = res["reference"]["untrained"]
    assert set(ref) >= {"image_auroc/A_std_l2", "pixel_auroc/a_std_l2", "image_auroc/energy"}
    assert all(0.0 <= v <= 1.0 for v in ref.values())
    assert ref != {k: res["metrics"][k] for k in ref}  # trained and untrained weights score differently
    assert res["device"]["type"] == "cpu" and res["timings_s"]["untrained_reference"] > 0
    key = f"image_auroc/{res['image_score']}"
    line = f"{key} {ref[key]:.3f} -> {res['metrics'][key]:.3f}"
    assert any("what training added" in r.message and line in r.message for r in caplog.records)


def test_training_gain_names_each_metric_before_after_and_difference():
    line = training_gain({"a": 0.9, "b": 0.5, "c": 0.7}, {"a": 0.6, "b": 0.55}, ["a", "b", "c"])
    assert (
        line
        == "what training added (untrained reference -> trained): a 0.600 -> 0.900 (+0.300), b 0.550 -> 0.500 (-0.050)"
    )


def test_untrained_reference_can_be_switched_off(make_cfg, tmp_path):
    res = run(make_cfg("eval.untrained_reference=false", out=tmp_path / "r"))
    assert "reference" not in res
