"""The EBM options end to end through the real config: training runs, exact resume, clipping, chains from data."""

import pytest
import torch

from ebmad.models.ebm import EBMModule
from ebmad.train import run

from conftest import assert_same_training_state, ckpt_state

ALL_OPTIONS = (
    "model.persistent=true", "model.buffer_size=64", "model.chain_init=data", "model.spectral_norm=true",
    "model.ema_decay=0.9", "model.aug_hflip=0.5", "model.aug_vflip=0.5", "model.aug_brightness=0.1",
    "model.input_norm=instance", "model.sgld_step_size_end=0.5", "model.sgld_noise_end=0.005",
    "model.score_noise_samples=2", "model.score_noise_std=0.02", "model.map_sigmas=[0,1,2]",
    "model.patch_energy=true", "model.default_pixel_map=a_ms", "model.default_image_score=A_ms_max",
)  # fmt: skip


def test_every_option_together_trains_tests_and_resumes_exactly(make_cfg, tmp_path):
    res = run(make_cfg(*ALL_OPTIONS, "trainer.max_steps=8", out=tmp_path / "full"))
    assert res["status"] == "completed"
    assert res["pixel_map"] == "a_ms" and res["image_score"] == "A_ms_max"
    for k in ("image_auroc/A_ms_max", "image_auroc/E_patch_max", "pixel_auroc/a_ms", "pixel_auroc/e_patch"):
        assert 0.0 <= res["metrics"][k] <= 1.0, k
    state = ckpt_state(tmp_path / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(k.startswith("net_ema.") for k in state) and "score_noise" in state and "patch_mean" in state
    # resume from step 4 gives bit-identical weights, EMA, spectral-norm vectors, buffers and Adam state
    run(make_cfg(*ALL_OPTIONS, "trainer.max_steps=4", "test=false", out=tmp_path / "part"))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    run(
        make_cfg(
            *ALL_OPTIONS, "trainer.max_steps=8", "test=false", f"ckpt_path={part}", out=tmp_path / "resumed"
        )
    )
    a = ckpt_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = ckpt_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert_same_training_state(a, b)
    torch.testing.assert_close(a["sgld_replay"], b["sgld_replay"], rtol=0, atol=0)


def test_gradient_clipping_bounds_the_applied_gradient(make_cfg, tmp_path, monkeypatch):
    norms: list[float] = []
    step = torch.optim.Adam.step

    def recording_step(self, closure=None):
        def recorded():  # Lightning's closure: forward, backward, on_before_optimizer_step, clipping
            loss = closure()
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            norms.append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            )
            return loss

        return step(self, recorded)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    run(make_cfg("test=false", out=tmp_path / "free"))
    assert len(norms) == 6 and min(norms) > 1e-2  # unclipped, the gradients are far larger
    norms.clear()
    run(make_cfg("trainer.gradient_clip_val=1e-3", "test=false", out=tmp_path / "clip"))
    assert len(norms) == 6 and max(norms) <= 1e-3 * (1 + 1e-4)


def test_chains_from_data_start_near_the_positives():
    model = EBMModule(image_size=16, base_width=8, chain_init="data", chain_init_noise=0.1)
    data = torch.rand(64, 3, 16, 16) * 1.6 - 0.8
    start = model.chain_starts(data, torch.Generator().manual_seed(0))
    assert start.shape == data.shape
    assert (start - data).std().item() == pytest.approx(0.1, rel=0.05)
    uniform = EBMModule(image_size=16, base_width=8).chain_starts(data, torch.Generator().manual_seed(0))
    assert (uniform - data).abs().mean() > 0.4 and uniform.min() >= -1 and uniform.max() <= 1


def test_reset_chains_redraws_the_replay_buffer():
    model = EBMModule(image_size=16, base_width=8, persistent=True, buffer_size=32, sgld_steps=1)
    model.negatives(torch.zeros(4, 3, 16, 16), torch.Generator().manual_seed(0))
    before = model.replay.clone()
    model.reset_chains()
    assert model.replay.shape == before.shape and not torch.equal(model.replay, before)


def test_a_checkpoint_is_scored_with_new_scoring_options_and_names_settings_it_ignores(
    make_cfg, tmp_path, caplog
):
    fit = run(make_cfg("eval.untrained_reference=false", "data.val_fraction=0.25", out=tmp_path / "fit"))
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO", logger="ebmad"):
        res = run(make_cfg("train=false", f"ckpt_path={ckpt}", "model.map_sigmas=[0,1]", "model.sgld_steps=7",
                           "model.default_pixel_map=a_ms", "eval.untrained_reference=false", out=tmp_path / "eval"))  # fmt: skip
    # a training setting: the checkpoint's is used, and one info line says so (no warning: nothing is wrong)
    noted = [r.getMessage() for r in caplog.records if "not used at evaluation" in r.getMessage()]
    assert (
        len(noted) == 1 and "model.sgld_steps=7 (checkpoint: 5)" in noted[0] and "map_sigmas" not in noted[0]
    )
    assert not [r for r in caplog.records if r.levelno >= 30 and r.name == "ebmad"]
    # scoring options: applied to the checkpoint's weights and statistics
    assert res["pixel_map"] == "a_ms" and "pixel_auroc/a_ms" in res["metrics"]
    assert res["metrics"]["pixel_auroc/a_std_l2"] == pytest.approx(fit["metrics"]["pixel_auroc/a_std_l2"])
    # one that changes the statistics needs them refitted
    with pytest.raises(
        ValueError, match=r"model.stats_gains changes the fitted statistics.*refit_stats=true"
    ):
        run(
            make_cfg(
                "train=false", f"ckpt_path={ckpt}", "model.stats_gains=[0.9,1.0,1.1]", out=tmp_path / "bad"
            )
        )
    res = run(make_cfg("train=false", f"ckpt_path={ckpt}", "model.stats_gains=[0.9,1.0,1.1]", "refit_stats=true",
                       "data.val_fraction=0.25", "eval.untrained_reference=false", out=tmp_path / "refit"))  # fmt: skip
    assert res["metrics"]["pixel_auroc/a_std_l2"] != pytest.approx(fit["metrics"]["pixel_auroc/a_std_l2"])
    # the validation is scored with the refitted statistics too (not the checkpoint's)
    key = "validation/pixel_auroc/a_std_l2"
    assert res["validation"][key] != pytest.approx(fit["validation"][key], abs=1e-7)


def test_stats_gains_fit_the_statistics_over_brightness_changed_copies():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    gains = [0.9, 1.0, 1.1]
    model = EBMModule(image_size=16, base_width=8, stats_gains=gains)
    model.fit_statistics([{"image": x}])
    copies = torch.cat([((x + 1) / 2 * g).clamp(0, 1) * 2 - 1 for g in gains])
    ref = EBMModule(image_size=16, base_width=8)
    ref.net.load_state_dict(model.net.state_dict())
    ref.fit_statistics([{"image": copies}])
    torch.testing.assert_close(model.grad_mean, ref.grad_mean, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model.grad_std, ref.grad_std, rtol=1e-5, atol=1e-8)
    assert float(model.stats_count) == 18


def test_report_compares_the_headline_with_the_same_score_of_the_untrained_reference():
    from ebmad.report import Job
    from ebmad.reporting.tables import _untrained_table, _variant_table

    job = Job(None, "bottle", "s", "completed", metrics={"image_auroc/A_ms_max": 0.9, "pixel_auroc/a_ms": 0.8},
              headline={"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.5},
              untrained={"image_auroc/A_ms_max": 0.7, "image_auroc/A_std_l2": 0.1, "pixel_auroc/a_ms": 0.6,
                         "pixel_auroc/a_std_l2": 0.2, "aupro": 0.4},
              scores={"image_auroc": "A_ms_max", "pixel_auroc": "a_ms"})  # fmt: skip
    row = _untrained_table([job])[4]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "bottle",
        "0.900",
        "0.700",
        "+0.200",
        "0.800",
        "0.600",
        "+0.200",
        "0.500",
        "0.400",
        "+0.100",
    ]
    assert "A_ms_max" in " ".join(_variant_table([job], "image_auroc", ("A_std_l2", "A_ms_max"), "t"))
