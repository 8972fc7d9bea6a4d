"""Feature-space EBM: CD step and gradient maps by hand, the untrained model is its prior, resume, runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ebmad.data.loader import DeviceBatchLoader
from ebmad.models.ebm.scoring import standardize
from ebmad.models.feature_ebm import FeatureEBMModule
from ebmad.models.padim.network import GaussianSums
from ebmad.models.patchcore import PatchCoreModule
from ebmad.train import run

from conftest import assert_same_training_state, ckpt_state, read_scores


def images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def fitted(**kw) -> FeatureEBMModule:
    model = FeatureEBMModule(image_size=32, coreset_ratio=1.0, head_hidden=8, **kw).eval()
    model.fit_statistics(DeviceBatchLoader({"image": images()}, 3))
    return model


# ------------------------------------------------------------------ the untrained model is its prior
def test_untrained_model_equals_the_gaussian_prior_exactly():
    model = fitted(prior="gaussian", gradient_maps=False)
    x = images(3, seed=1)
    s, m = model.score(x)
    with torch.no_grad():
        feats = [model.net.patch_features(b[None])[0][0] for b in images()]
        test_feats = model.net.patch_features(x)[0]
    sums = GaussianSums(*feats[0].shape, torch.device("cpu"))
    sums.add(torch.stack(feats))
    mean, inv = sums.mean_and_inverse(0.01)
    e = torch.einsum("bpi,pij,bpj->bp", test_feats - mean, inv, test_feats - mean) * 0.5
    torch.testing.assert_close(s["E_max"], e.amax(1), rtol=1e-5, atol=1e-5)
    grid = model.net.features.grid(32)
    torch.testing.assert_close(m["e_map"], model.net.maps(e, (grid, grid))[1], rtol=1e-5, atol=1e-5)


def test_untrained_knn_prior_equals_patchcore_max_distance():
    """prior=knn with a full bank scores exactly as PatchCore's s* (the largest nearest-neighbour distance)."""
    model = fitted(prior="knn", gradient_maps=False)
    pc = PatchCoreModule(image_size=32, coreset_ratio=1.0).eval()
    pc.fit_statistics(DeviceBatchLoader({"image": images()}, 3))
    x = images(3, seed=1)
    torch.testing.assert_close(model.score(x)[0]["E_max"], pc.score(x)[0]["max_distance"])


# ------------------------------------------------------------------ training step by hand
def test_cd_step_equals_a_hand_computation(monkeypatch):
    torch.manual_seed(0)
    model = fitted(prior="knn", gradient_maps=False, alpha=0.5, patches_per_step=7, lr=0.01)
    head = model.net.head
    for p in head.parameters():  # a non-zero head, so every term of the loss counts
        torch.nn.init.normal_(p, std=0.3)
    f_neg = torch.randn(7, model.net.features.dim)
    monkeypatch.setattr(model, "negatives", lambda f, pos, imgs, gen: (f_neg, pos))
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    monkeypatch.setattr(model, "step_generator", lambda: torch.Generator().manual_seed(5))
    batch = {"image": images(2, seed=3)}
    loss = model.training_step(batch, 0)
    # the same positives: the step's generator chose 7 of the batch's patches
    with torch.no_grad():
        f, _ = model.net.patch_features(batch["image"])
    take = torch.randperm(f.shape[0] * f.shape[1], generator=torch.Generator().manual_seed(5))[:7]
    f_pos = f.reshape(-1, f.shape[-1])[take].double().numpy()
    fn = f_neg.double().numpy()
    bank, center = model.net.memory_bank.double().numpy(), model.net.center.double().numpy()
    mu, sd = model.net.feat_mean.double().numpy(), model.net.feat_std.double().numpy()
    w = [(lin.weight.double().detach().numpy(), lin.bias.double().detach().numpy())
         for lin in (head.body[0], head.body[2], head.out)]  # fmt: skip

    def elu(a):
        return np.where(a > 0, a, np.exp(np.minimum(a, 0)) - 1)

    def e_theta(feat):
        h = (feat - mu) / sd
        h = elu(h @ w[0][0].T + w[0][1])
        h = elu(h @ w[1][0].T + w[1][1])
        return (h @ w[2][0].T + w[2][1])[:, 0]

    def e_prior(feat):
        return np.linalg.norm((feat - center)[:, None] - bank[None], axis=2).min(1)

    t_pos, t_neg = e_theta(f_pos), e_theta(fn)
    want = (e_prior(f_pos) + t_pos).mean() - (e_prior(fn) + t_neg).mean() + 0.5 * (t_pos**2 + t_neg**2).mean()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    # one Adam step from zero moments moves each weight by lr * g / (|g| + eps): the loss's own gradient
    opt = model.configure_optimizers()
    before = [p.detach().clone() for p in head.parameters()]
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    opt.step()
    for p, b, g in zip(head.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.01 * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-7)
    assert all(not p.requires_grad for p in model.net.features.parameters())


def test_noise_negatives_without_sgld_steps_are_the_perturbed_positives():
    model = fitted(prior="knn", gradient_maps=False, sgld_steps=0, negative_noise=0.3)
    f = torch.randn(5, model.net.features.dim)
    pos = torch.arange(5)
    neg, _ = model.negatives(f, pos, images(1), torch.Generator().manual_seed(2))
    noise = torch.randn(5, model.net.features.dim, generator=torch.Generator().manual_seed(2))
    want = model.net.unstandardize(model.net.standardize(f) + 0.3 * noise)
    torch.testing.assert_close(neg, want)


# ------------------------------------------------------------------ gradient maps
def test_gradient_map_has_the_image_shape_and_is_standardized_as_eq_2():
    model = fitted(prior="knn")
    x = images(2, seed=7)
    s, m = model.score(x)
    assert m["a_std_l2"].shape == (2, 32, 32) and m["e_map"].shape == (2, 32, 32)
    xr = x.clone().requires_grad_(True)
    e, _ = model.net.patch_energies(xr)
    (g,) = torch.autograd.grad(e.sum(), xr)
    g = -g
    z = standardize(g, model.grad_mean, model.grad_std)
    torch.testing.assert_close(m["a_std_l2"], z.pow(2).sum(1).sqrt(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s["A_std_l2"], z.pow(2).sum(dim=(1, 2, 3)).sqrt(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s["energy"], e.sum(1).detach(), rtol=1e-5, atol=1e-5)
    assert float(model.stats_count) == 6


# ------------------------------------------------------------------ framework runs
@pytest.fixture
def febm_cfg(make_cfg):
    def _make(*extra: str, out):
        return make_cfg("model=feature_ebm", "model.head_hidden=8", "model.patches_per_step=32",
                        "model.coreset_ratio=0.1", *extra, out=out)  # fmt: skip

    return _make


def test_run_reference_and_checkpoint_round_trip(febm_cfg, tmp_path):
    res = run(febm_cfg("eval.untrained_reference=true", out=tmp_path / "fit"))
    saved = json.loads((tmp_path / "fit" / "results.json").read_text())
    assert saved["status"] == "completed" and saved["model"] == "feature_ebm" and saved["global_step"] == 6
    assert saved["image_score"] == "E_max" and saved["pixel_map"] == "e_map"
    assert 0.0 <= saved["metrics"]["pixel_auroc/a_std_l2"] <= 1.0
    assert "image_auroc/E_max" in saved["reference"]["untrained"]  # the prior alone
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    again = run(febm_cfg("train=false", f"ckpt_path={ckpt}", out=tmp_path / "eval"))
    assert read_scores(tmp_path / "fit" / "scores.csv") == read_scores(tmp_path / "eval" / "scores.csv")
    assert again["metrics"] == res["metrics"]


def test_resume_mid_training_is_exact(febm_cfg, tmp_path):
    common = ("test=false", "data.batch_size=4", "model.gradient_maps=false")
    run(febm_cfg(*common, "trainer.max_steps=4", out=tmp_path / "full"))
    run(febm_cfg(*common, "trainer.max_steps=3", out=tmp_path / "part"))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    run(febm_cfg(*common, "trainer.max_steps=4", f"ckpt_path={part}", out=tmp_path / "resumed"))
    a = ckpt_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = ckpt_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert_same_training_state(a, b)


def test_onnx_export_of_the_energy_map_equals_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from ebmad.deploy.onnx import export_onnx, verify_onnx

    model = fitted(prior="knn", gradient_maps=False)
    export_onnx(model, tmp_path / "m.onnx")
    assert verify_onnx(model, tmp_path / "m.onnx", batch=3) < 1e-3
