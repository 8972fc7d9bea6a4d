"""The EBM's energy-margin term on synthetic anomalies (``model.oe_weight``): loss, patch labels, the shared
synthesis, scores, off by default, and exact resume with it on."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ebmad.models.ebm import EBMModule, outlier
from ebmad.models.ebm.scoring import MomentAccumulator
from ebmad.synthesis.perlin_anomalies import synthesize
from ebmad.synthesis.textures import ProceduralTextures, shifted_others
from ebmad.train import run

from conftest import assert_same_training_state, ckpt_state

OE = dict(oe_weight=1.0, patch_energy=True)


def small(**kw) -> EBMModule:
    torch.manual_seed(0)
    args = dict(in_channels=3, image_size=32, base_width=8, sgld_steps=2)
    args.update(kw)
    return EBMModule(**args)


def images(n: int, c: int = 3, s: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


# ------------------------------------------------------------------------------------ the loss
def test_margin_loss_on_a_hand_case():
    e_in = torch.tensor([-2.0, -1.0, 0.5, 1.0])  # m_in = -1: hinges 0, 0, 1.5, 2
    e_out = torch.tensor([3.0, 0.0, -1.0])  # m_out = 1: hinges 0, 1, 2
    loss = outlier.hinge_margin_loss(e_in, e_out, -1.0, 1.0)
    assert float(loss) == pytest.approx((1.5**2 + 2**2) / 4 + (1 + 4) / 3)
    assert float(outlier.hinge_margin_loss(e_in[:2], e_out[:1], -1.0, 1.0)) == 0.0  # inside both margins
    assert float(outlier.hinge_margin_loss(e_in[:0], e_out, -1.0, 1.0)) == pytest.approx(
        5 / 3
    )  # empty set: 0


def test_patch_energies_sum_to_the_energy():
    model = small(**OE)
    h = model.net.features(images(3))
    p = outlier.patch_energies(model.net.patch_contributions(h), model.net.body[-1].bias[0])
    torch.testing.assert_close(p.sum((1, 2)), model.net.head(h), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ masks -> patches
def test_masks_map_to_the_patches_of_their_cells():
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:16, 16:24] = 1  # exactly cell (1, 2) of the 4x4 grid (8x8 cells)
    mask[1, :, 0:8, 0:1] = 1  # 1/8 of cell (0, 0): below cover 0.2, above 0.1
    bad, clean = outlier.patch_labels(mask, (4, 4), cover=0.2)
    assert bad[0].nonzero().tolist() == [[1, 2]] and not bad[1].any()
    assert clean[0].sum() == 15 and not clean[0, 1, 2]
    assert not clean[1, 0, 0] and clean[1].sum() == 15  # partly covered: neither outlier nor normal
    bad, _ = outlier.patch_labels(mask[:, 0], (4, 4), cover=0.1)  # (B, H, W) masks too
    assert bad[1].nonzero().tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="do not tile"):
        outlier.patch_labels(torch.zeros(1, 30, 30), (4, 4), 0.1)


def test_each_patch_energy_looks_at_its_own_cell():
    """The grid of patch_labels is the network's: patch (i, j)'s input gradient is centred in cell (i, j)."""
    model = small(image_size=64, patch_energy=True)
    x = images(1, s=64).requires_grad_(True)
    patch = model.net.patch_contributions(model.net.features(x))[0]
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for i in range(4):
        for j in range(4):
            (g,) = torch.autograd.grad(patch[i, j], x, retain_graph=True)
            w = g[0].abs().sum(0)
            cy, cx = float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())
            assert 16 * i <= cy < 16 * (i + 1) and 16 * j <= cx < 16 * (j + 1), (i, j, cy, cx)


# ------------------------------------------------------------------------------- the synthesis
def test_synthetic_anomalies_are_drawn_from_the_shared_synthesis():
    model = small(**OE)
    x = images(4)
    gen = torch.Generator().manual_seed(123)
    bad, mask = model.synthetic_anomalies(x, gen)
    g = torch.Generator().manual_seed(123 ^ 0x0E0E0E)
    want, want_mask, has = synthesize((x + 1) / 2, ProceduralTextures(32), g, anomaly_prob=1.0)
    assert torch.equal(bad, torch.where(want_mask > 0, want * 2 - 1, x)) and torch.equal(mask, want_mask)
    assert bool(has.all())  # every image gets an anomaly (DRAEM: half of them)
    assert torch.equal(torch.where(mask.bool(), x, bad), x)  # outside the mask: the positive exactly


def test_other_images_source_moves_other_images():
    model = small(**OE, oe_source="images", in_channels=1)
    x = images(4, c=1)
    bad, mask = model.synthetic_anomalies(x, torch.Generator().manual_seed(5))
    assert bad.shape == x.shape and mask.sum() > 0
    others = shifted_others(x, torch.Generator().manual_seed(0))
    assert not any(torch.equal(others[i], x[i]) for i in range(4))


def test_draem_keeps_its_synthesis_stream():
    """anomaly_prob only changes which images get an anomaly: DRAEM's default draws are those of 0.5."""
    x = images(6) * 0.5 + 0.5
    a = synthesize(x, ProceduralTextures(32), torch.Generator().manual_seed(9))
    b = synthesize(x, ProceduralTextures(32), torch.Generator().manual_seed(9), anomaly_prob=0.5)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


# ------------------------------------------------------------------------------ the training loss
@pytest.mark.parametrize("level", ["patch", "image", "both"])
def test_training_loss_is_cd_plus_weight_times_the_margin_loss(level):
    kw = dict(oe_weight=0.5, oe_level=level, oe_margin_in=-0.3, oe_margin_out=0.3, patch_energy=True)
    model, ref = small(**kw).train(), small().train()
    x = images(4)
    loss = model.training_step({"image": x}, 0)
    cd = ref.training_step({"image": x}, 0)  # same seed and step: the same chains
    assert torch.equal(model.train_diagnostics["x_neg"], ref.train_diagnostics["x_neg"])
    gen = torch.Generator().manual_seed((0 * 1_000_003 + 0) * 1009 + 0)
    x_pos = x  # no data noise, no augmentation: the positives as given
    bad, mask = model.synthetic_anomalies(x_pos, torch.Generator().manual_seed(gen.initial_seed()))
    net = model.net
    bias = net.body[-1].bias[0]
    h_pos, h_bad = net.features(x_pos), net.features(bad)
    want = x.new_zeros(())
    if level in ("patch", "both"):
        p_pos = net.patch_contributions(h_pos) + bias / 16
        p_bad = net.patch_contributions(h_bad) + bias / 16
        share = F.avg_pool2d(mask, 8)[:, 0]
        e_in = torch.cat([p_pos.flatten(), p_bad[share == 0]])
        e_out = p_bad[share >= 0.1]
        want = want + F.relu(e_in + 0.3).pow(2).mean() + F.relu(0.3 - e_out).pow(2).mean()
    if level in ("image", "both"):
        want = want + F.relu(net(x_pos) / 16 + 0.3).pow(2).mean() + F.relu(0.3 - net(bad) / 16).pow(2).mean()
    assert float(loss) == pytest.approx(float(cd) + 0.5 * float(want), rel=1e-5, abs=1e-6)


def test_off_by_default_trains_bit_identically():
    """oe_weight 0 (the default) ignores every other oe_ option: the paper's step, bit for bit."""
    a = small(data_noise=0.03).train()
    b = small(
        data_noise=0.03, oe_level="both", oe_margin_in=-3.0, oe_source="images", oe_patch_cover=0.5
    ).train()
    assert a.training_anomaly_kinds() == b.training_anomaly_kinds() == ()
    x = images(4)
    la, lb = a.training_step({"image": x}, 0), b.training_step({"image": x}, 0)
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    for (k, p), (_, q) in zip(a.net.named_parameters(), b.net.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), k
    assert a.state_dict().keys() == b.state_dict().keys()


def test_training_anomaly_kinds_follow_the_source():
    assert small(**OE).training_anomaly_kinds() == ("perlin_texture",)
    assert small(**OE, oe_source="images").training_anomaly_kinds() == ("perlin_patch",)


@pytest.mark.parametrize(
    "kw,setting",
    [(dict(oe_weight=-1), "oe_weight"), (dict(oe_level="pixel"), "oe_level"), (dict(oe_source="x"), "oe_source"),
     (dict(oe_margin_in=1, oe_margin_out=0), "oe_margin_in"), (dict(oe_patch_cover=0), "oe_patch_cover"),
     (dict(combo_map=True), "combo_map")],
)  # fmt: skip
def test_bad_settings_are_refused_naming_them(kw, setting):
    with pytest.raises(ValueError, match=f"model.{setting}"):
        small(**kw)


# ------------------------------------------------------------------------------------ scores
def test_combo_map_is_the_sum_of_the_standardized_maps():
    model = small(patch_energy=True, map_sigmas=[0, 1], combo_map=True).eval()
    x = images(6, seed=2)
    model.fit_statistics(iter([{"image": x[:3]}, {"image": x[3:]}]))  # a one-shot iterator is read twice
    acc = MomentAccumulator((2,))
    for part in (x[:3], x[3:]):
        _, maps = model.score(part)
        acc.update(torch.stack([maps["a_ms"].flatten(), maps["e_patch"].flatten()], 1))
    mean, std = acc.mean_std()
    torch.testing.assert_close(model.combo_stats, torch.stack([mean, std], 1).float())
    images_, maps = model.score(x[:2])
    want = (maps["a_ms"] - mean[0]) / std[0] + (maps["e_patch"] - mean[1]) / std[1]
    torch.testing.assert_close(maps["a_combo"], want.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(images_["A_combo_max"], maps["a_combo"].amax((1, 2)))
    assert "combo_stats" in model.state_dict()  # travels with the checkpoint


# ------------------------------------------------------------------------------- end to end
def test_resume_with_the_option_on_is_exact(make_cfg, tmp_path):
    common = ("test=false", "data.batch_size=4", "model.oe_weight=1.0", "model.patch_energy=true",
              "model.oe_level=both", "model.persistent=true", "model.buffer_size=16")  # fmt: skip
    run(make_cfg(*common, "trainer.max_steps=6", out=tmp_path / "full"))
    run(make_cfg(*common, "trainer.max_steps=3", out=tmp_path / "part"))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    run(make_cfg(*common, "trainer.max_steps=6", f"ckpt_path={part}", out=tmp_path / "resumed"))
    a = ckpt_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = ckpt_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert_same_training_state(a, b)


def test_ebm_oe_experiment_records_what_it_trains_on(make_cfg, tmp_path):
    cfg = make_cfg("experiment=ebm_oe", "data=mvtec", *_tiny_data(make_cfg), "data.image_size=32",
                   "trainer.max_steps=3", "model.sgld_steps=2", "data.val_fraction=0.25", "model.oe_source_dir=null")  # fmt: skip
    res = run(cfg)
    assert res["status"] == "completed"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    vs = saved["validation_set"]
    assert vs["model_trains_on"] == ["perlin_texture"]  # what its training draws, recorded
    assert (
        vs["trains_on_validation_kinds"] == [] and "perlin_texture" not in vs["kinds"]
    )  # validated elsewhere
    assert (
        "pixel_auroc/a_combo" in saved["metrics"] and "pixel_auroc/a_combo" in saved["reference"]["untrained"]
    )


def _tiny_data(make_cfg) -> list[str]:
    cfg = make_cfg()
    return [f"data.root={cfg.data.root}", f"data.category={cfg.data.category}"]
