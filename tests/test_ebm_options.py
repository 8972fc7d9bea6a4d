"""The EBM's options beyond the paper, each against an independent computation; and the paper setting unchanged.

Tiny networks (8x8 / 16x16 inputs, base width 4-8) on CPU: every test runs in well under a second or two.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from ebmad.models.ebm import EBMModule, EnergyNet
from ebmad.models.ebm.export import EBMScorer
from ebmad.models.ebm.network import apply_spectral_norm
from ebmad.models.ebm.scoring import (
    IMAGE_SCORES,
    PIXEL_MAPS,
    compute_scores,
    energy_and_grad,
    gaussian_blur,
    gaussian_kernel,
    instance_normalize,
)
from ebmad.models.ebm.sgld import chain_schedule, sgld_sample, uniform_init

NEW_HPARAMS = (
    "sgld_step_size_end", "sgld_noise_end", "spectral_norm", "ema_decay", "aug_hflip", "aug_vflip",
    "aug_brightness", "input_norm", "score_noise_samples", "score_noise_std", "map_sigmas", "patch_energy",
    "default_image_score", "default_pixel_map", "chain_init", "chain_init_noise", "stats_gains", "oe_weight",
    "oe_level", "oe_margin_in", "oe_margin_out", "oe_source", "oe_source_dir", "oe_patch_cover", "combo_map",
)  # fmt: skip


def small(**kw) -> EBMModule:
    """A tiny EBM (3x16x16, base width 8) with the given options, in eval mode."""
    torch.manual_seed(0)
    args = dict(in_channels=3, image_size=16, base_width=8)
    args.update(kw)
    return EBMModule(**args).eval()


def images(n: int, c: int = 3, s: int = 16, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Images in [-1, 1] with some spatial structure (so that maps vary across pixels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, s, s, generator=g, dtype=torch.float64) * 1.6 - 0.8
    ramp = torch.linspace(-0.2, 0.2, s, dtype=torch.float64)
    return (x + ramp[None, None, None, :]).clamp(-1, 1).to(dtype)


def fitted(model: EBMModule, n: int = 6, seed: int = 2) -> EBMModule:
    """The model with its scoring statistics fitted on ``images(n, seed=seed)``, in two batches."""
    hp = model.hparams
    x = images(n, hp.in_channels, hp.image_size, seed, dtype=model.grad_mean.dtype)
    model.fit_statistics([{"image": x[: n // 2]}, {"image": x[n // 2 :]}])
    return model


# ---------------------------------------------------------------- SGLD schedules along the chain
def quad_energy_and_grad(a: float = 1.5, c: float = 0.2):
    """E(x) = sum(a/2 (x - c)^2 + 0.1 cos(3x)) and its analytic gradient (no autograd)."""

    def energy(x):
        return (0.5 * a * (x - c) ** 2 + 0.1 * torch.cos(3 * x)).flatten(1).sum(1)

    def grad(x):
        return a * (x - c) - 0.3 * torch.sin(3 * x)

    return energy, grad


def hand_sgld(grad, x0, sizes, noises, data_range, gen):
    """x <- clamp(x - size_k dE/dx + noise_k eps); returns (x, dE/dx at the last update)."""
    x, g = x0.clone(), None
    for size, noise in zip(sizes, noises, strict=True):
        g = grad(x)
        eps = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        x = (x - size * g + noise * eps).clamp(*data_range)
    return x, g


@pytest.mark.parametrize("size_end,noise_end", [(0.01, 0.001), (0.3, None), (None, 0.2)])
def test_sgld_schedule_equals_hand_loop_with_linear_values(size_end, noise_end):
    energy, grad = quad_energy_and_grad()
    steps, size0, noise0 = 7, 0.2, 0.05
    x0 = uniform_init((4, 2, 5, 5), (-1, 1), "cpu", torch.Generator().manual_seed(0)).double()
    stats: dict[str, torch.Tensor] = {}
    got = sgld_sample(energy, x0, steps, size0, noise0, (-1, 1), torch.Generator().manual_seed(5),
                      step_size_end=size_end, noise_std_end=noise_end, stats=stats)  # fmt: skip
    sizes = np.linspace(size0, size_end, steps) if size_end is not None else [size0] * steps
    noises = np.linspace(noise0, noise_end, steps) if noise_end is not None else [noise0] * steps
    want, last_grad = hand_sgld(grad, x0, sizes, noises, (-1, 1), torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the stats: the mean per-sample L2 norm of dE/dx at the last update
    assert stats["grad_norm"].dim() == 0
    want_norm = np.mean([float(np.linalg.norm(g.numpy())) for g in last_grad])
    assert float(stats["grad_norm"]) == pytest.approx(want_norm, rel=1e-10)
    # and the schedule matters: the constant chain ends elsewhere
    const = sgld_sample(energy, x0, steps, size0, noise0, (-1, 1), torch.Generator().manual_seed(5))
    assert (const - got).abs().max() > 1e-4


def test_sgld_schedule_is_constant_when_none():
    energy, grad = quad_energy_and_grad()
    x0 = uniform_init((3, 1, 4, 4), (-1, 1), "cpu", torch.Generator().manual_seed(1)).double()
    plain = sgld_sample(energy, x0, 5, 0.1, 0.02, (-1, 1), torch.Generator().manual_seed(2))
    nones = sgld_sample(energy, x0, 5, 0.1, 0.02, (-1, 1), torch.Generator().manual_seed(2),
                        step_size_end=None, noise_std_end=None)  # fmt: skip
    want, _ = hand_sgld(grad, x0, [0.1] * 5, [0.02] * 5, (-1, 1), torch.Generator().manual_seed(2))
    assert torch.equal(plain, nones)
    torch.testing.assert_close(plain, want, rtol=1e-12, atol=1e-12)
    assert chain_schedule(0.5, None, 4) == [0.5] * 4
    assert chain_schedule(0.5, 0.1, 1) == [0.5]  # a single update uses the start value
    assert chain_schedule(1.0, 0.0, 5) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_training_step_uses_the_configured_chain_schedule():
    """The module's negatives follow sgld_step_size_end / sgld_noise_end (same generator, same chain)."""
    kw = dict(in_channels=1, image_size=8, base_width=4, sgld_steps=4, sgld_step_size=0.5, sgld_noise=0.05,
              data_noise=0.0)  # fmt: skip
    model = small(**kw, sgld_step_size_end=0.05, sgld_noise_end=0.0).train()
    x = images(3, 1, 8)
    model.training_step({"image": x}, 0)
    gen = model.step_generator()  # the step's generator (global step 0, rank 0), drawn in the same order
    x0 = uniform_init(tuple(x.shape), (-1.0, 1.0), "cpu", gen)
    stats: dict[str, torch.Tensor] = {}
    want = sgld_sample(model.net, x0, 4, 0.5, 0.05, (-1.0, 1.0), gen, step_size_end=0.05, noise_std_end=0.0,
                       stats=stats)  # fmt: skip
    torch.testing.assert_close(model.train_diagnostics["x_neg"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.train_diagnostics["sgld_grad_norm"], stats["grad_norm"])


# ---------------------------------------------------------------- spectral normalization
def conv_sigmas(net: nn.Module) -> list[float]:
    """Largest singular value of each conv weight reshaped to (out, in * k * k)."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    return [float(torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)) for c in convs]


def test_spectral_norm_gives_every_conv_unit_sigma_whatever_the_weight_scale():
    model = small(spectral_norm=True).train()
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if name.endswith("original"):
                p.mul_(5.0)  # sigma of the raw weights is now far from 1
    raw = [float(torch.linalg.matrix_norm(p.detach().flatten(1), ord=2))
           for n, p in model.net.named_parameters() if n.endswith("original")]  # fmt: skip
    assert len(raw) == 4 and min(raw) > 2.0
    x = images(2)
    for _ in range(50):  # one power iteration per conv per forward in train mode
        model.net(x)
    model.eval()
    sig = conv_sigmas(model.net)
    assert len(sig) == 4
    assert sig == pytest.approx([1.0] * 4, abs=3e-3)
    assert not any(isinstance(m, nn.Conv2d) and nn.utils.parametrize.is_parametrized(m)
                   for m in small().net.modules())  # fmt: skip  # off by default


def test_spectral_norm_export_matches_autograd_in_float64_and_score():
    model = fitted(small(spectral_norm=True).double())
    x = images(3, dtype=torch.float64)
    # references first (building the scorer once broke a spectrally normalized model: test below)
    e_ref, g_ref = energy_and_grad(model.scoring_net, x)
    images_, maps = model.score(x)
    scorer = model.scorer()
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in scorer.modules())
    e, g = scorer.energy_and_grad(x)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14 * float(g_ref.abs().max()))
    pixel_map, image_score, energy = scorer(x)
    torch.testing.assert_close(pixel_map, maps["a_std_l2"], rtol=1e-10, atol=0)
    torch.testing.assert_close(image_score, images_["A_std_l2"], rtol=1e-10, atol=0)
    torch.testing.assert_close(energy, images_["energy"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_building_the_scorer_leaves_a_spectrally_normalized_model_usable(ema_decay):
    model = fitted(small(in_channels=1, image_size=8, base_width=4, spectral_norm=True, ema_decay=ema_decay))
    x = images(2, 1, 8)
    before, _ = model.score(x)
    model.scorer()  # e.g. ebmad.export: export_onnx builds the scorer, then verify_onnx calls model.score
    after, _ = model.score(x)
    assert torch.equal(after["A_std_l2"], before["A_std_l2"])
    model.train().training_step({"image": x}, 0)


def test_spectral_norm_export_matches_autograd_in_float32():
    model = fitted(small(spectral_norm=True))
    x = images(2)
    e_ref, g_ref = energy_and_grad(model.scoring_net, x)
    e, g = model.scorer().energy_and_grad(x)
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()))


def test_spectral_norm_trains_the_original_weights():
    model = small(in_channels=1, image_size=8, base_width=4, sgld_steps=2, spectral_norm=True).train()
    loss = model.training_step({"image": images(2, 1, 8)}, 0)
    loss.backward()
    grads = [p.grad for n, p in model.net.named_parameters() if n.endswith("original")]
    assert len(grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads)  # 8x8: three convs


# ---------------------------------------------------------------- EMA of the weights
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_update_ema_is_decay_times_old_plus_one_minus_decay_times_net(spectral_norm):
    decay = 0.9
    model = small(ema_decay=decay, spectral_norm=spectral_norm)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p))
        for b in model.net.buffers():
            b.add_(1.0)
    old = {k: v.clone() for k, v in model.net_ema.named_parameters()}
    net = dict(model.net.named_parameters())
    model.update_ema()
    for k, v in model.net_ema.named_parameters():
        torch.testing.assert_close(v, decay * old[k] + (1 - decay) * net[k].detach(), rtol=1e-6, atol=1e-6)
    for (k, b_ema), (_, b) in zip(model.net_ema.named_buffers(), model.net.named_buffers(), strict=True):
        assert torch.equal(b_ema, b), k  # spectral norm's u, v: copied


def test_ema_scores_with_a_frozen_copy_outside_the_optimizer_and_travels_in_the_state_dict():
    model = small(ema_decay=0.5)
    plain = small()
    assert plain.net_ema is None and plain.scoring_net is plain.net  # off by default
    assert model.scoring_net is model.net_ema and model.net_ema is not model.net
    assert not any(p.requires_grad for p in model.net_ema.parameters())
    assert all(p.requires_grad for p in model.net.parameters())
    opt = model.configure_optimizers()
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.net.parameters()}
    assert not in_opt & {id(p) for p in model.net_ema.parameters()}
    with torch.no_grad():  # let the two nets differ
        for p in model.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.update_ema()
    fitted(model)
    x = images(2)
    images_, maps = model.score(x)
    e_ema, g_ema = energy_and_grad(model.net_ema, x)
    assert torch.equal(images_["energy"], e_ema)
    assert not torch.allclose(images_["energy"], energy_and_grad(model.net, x)[0])
    ref_images, ref_maps = compute_scores(
        e_ema, g_ema, model.grad_mean, model.grad_std, model.hparams.score_eps
    )
    for k in ref_images:
        assert torch.equal(images_[k], ref_images[k]), k
    # the statistics are those of the EMA net
    g_all = torch.cat([energy_and_grad(model.net_ema, b)[1] for b in images(6, seed=2).split(3)]).double()
    torch.testing.assert_close(model.grad_mean.double(), g_all.mean(0), rtol=1e-5, atol=1e-7)
    # checkpoints: net_ema is in the state dict and a fresh module scores identically after loading it
    state = model.state_dict()
    assert any(k.startswith("net_ema.") for k in state)
    clone = EBMModule(**model.hparams).eval()
    clone.load_state_dict(state)
    after, _ = clone.score(x)
    for k in images_:
        assert torch.equal(after[k], images_[k]), k


class _EmaRecorder(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append([p.detach().clone() for p in pl_module.net_ema.parameters()])


def test_callbacks_at_batch_end_see_the_ema_of_that_step():
    model = EBMModule(in_channels=1, image_size=8, base_width=4, sgld_steps=1, ema_decay=0.5, lr=1e-2)
    rec = _EmaRecorder()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])  # fmt: skip
    data = [{"image": images(2, 1, 8, seed=s)} for s in range(2)]
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=None))
    # what a callback saw at the final batch end (statistics, last.ckpt) is the EMA the module ends with
    for seen, final in zip(rec.seen[-1], model.net_ema.parameters(), strict=True):
        assert torch.equal(seen, final.detach())


# ---------------------------------------------------------------- augmentation of the positives
def test_flips_with_probability_one_flip_every_positive_and_zero_leaves_them():
    x = images(5)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(small(aug_hflip=1.0).augment(x, gen()), x.flip(-1))
    assert torch.equal(small(aug_vflip=1.0).augment(x, gen()), x.flip(-2))
    assert torch.equal(small(aug_hflip=1.0, aug_vflip=1.0).augment(x, gen()), x.flip(-1).flip(-2))
    assert torch.equal(small().augment(x, gen()), x)
    # the training step trains on the augmented positives
    model = small(in_channels=1, image_size=8, base_width=4, sgld_steps=1, data_noise=0.0, aug_hflip=1.0)
    x1 = images(2, 1, 8)
    model.train().training_step({"image": x1}, 0)
    assert torch.equal(model.train_diagnostics["x_pos"], x1.flip(-1))


def test_flip_probability_half_flips_some_and_each_either_flipped_or_not():
    x = images(64, 1, 8)
    out = small(in_channels=1, image_size=8, base_width=4, aug_hflip=0.5).augment(
        x, torch.Generator().manual_seed(0)
    )
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert bool((flipped | kept).all()) and 16 < int(flipped.sum()) < 48


def test_brightness_gain_is_per_image_within_bounds_on_unit_intensities():
    b = 0.3
    g = torch.Generator().manual_seed(3)
    intens = 0.1 + 0.6 * torch.rand(200, 1, 4, 4, generator=g, dtype=torch.float64)  # [0.1, 0.7]: no clamping
    x = intens * 2 - 1
    model = small(in_channels=1, image_size=8, base_width=4, aug_brightness=b)
    out = model.augment(x, torch.Generator().manual_seed(0))
    gain = ((out + 1) / 2) / intens
    per_image = gain.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image), rtol=1e-12, atol=0)
    gains = per_image[:, 0]
    assert float(gains.min()) >= 1 - b - 1e-12 and float(gains.max()) <= 1 + b + 1e-12
    assert float(gains.min()) < 1 - b / 2 and float(gains.max()) > 1 + b / 2  # the whole range is used
    # bright pixels are clamped to the data range
    bright = model.augment(
        torch.full((50, 1, 4, 4), 0.9, dtype=torch.float64), torch.Generator().manual_seed(0)
    )
    assert float(bright.max()) <= 1.0 and float(bright.max()) == 1.0


def test_augmentation_is_deterministic_for_the_same_generator_seed():
    model = small(aug_hflip=0.5, aug_vflip=0.5, aug_brightness=0.2)
    x = images(16)
    a = model.augment(x, torch.Generator().manual_seed(7))
    b = model.augment(x, torch.Generator().manual_seed(7))
    c = model.augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == x.dtype and a.shape == x.shape


# ---------------------------------------------------------------- per-image input normalization
def test_instance_normalize_equals_per_image_standardization():
    x = images(4, dtype=torch.float64)
    arr = x.numpy()
    want = np.stack([(im - im.mean()) / (im.std() + 1e-3) for im in arr])  # numpy std: population
    torch.testing.assert_close(instance_normalize(x), torch.from_numpy(want), rtol=1e-12, atol=1e-12)
    # a x + c (a > 0) changes it only through eps: (x - m) / (s + eps / a)
    a, c = 1.1, -0.07
    want_ac = np.stack([(im - im.mean()) / (im.std() + 1e-3 / a) for im in arr])
    torch.testing.assert_close(
        instance_normalize(a * x + c), torch.from_numpy(want_ac), rtol=1e-12, atol=1e-12
    )


def brightness(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """A gain a and offset b on the [0, 1] intensities of images in [-1, 1] (no clamping)."""
    return ((x + 1) / 2 * a + b) * 2 - 1


@pytest.mark.parametrize("a,b", [(0.9, 0.05), (1.1, -0.05), (1.05, 0.0)])
def test_input_norm_instance_makes_energy_and_maps_invariant_to_brightness(a, b):
    x = images(3)
    # eps = 1e-3 in the standardization: the residual is about eps / std * |1 - 1/a| ~ 3e-4 here
    tol = 2e-3
    model = fitted(small(input_norm="instance"))
    assert torch.equal(model(x), model.net(instance_normalize(x)))
    i0, m0 = model.score(x)
    i1, m1 = model.score(brightness(x, a, b))
    for k in i0:
        torch.testing.assert_close(i1[k], i0[k], rtol=tol, atol=tol * float(i0[k].abs().max()), msg=k)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=tol, atol=tol * float(m0[k].abs().max()), msg=k)
    # sanity: the paper's setting (no input normalization) is not invariant
    paper = fitted(small())
    p0, q0 = paper.score(x)
    p1, q1 = paper.score(brightness(x, a, b))
    rel = lambda u, v: float((u - v).abs().max() / v.abs().max())  # noqa: E731
    assert rel(p1["A_std_l2"], p0["A_std_l2"]) > 10 * tol
    assert rel(q1["a_std_l2"], q0["a_std_l2"]) > 10 * tol


# ---------------------------------------------------------------- fixed scoring noise
@pytest.mark.parametrize("samples,std", [(4, 0.0), (0, 0.1), (-1, 0.1), (2, -0.1)])
def test_score_noise_needs_both_settings(samples, std):
    with pytest.raises(ValueError, match=r"model\.score_noise_samples.*model\.score_noise_std"):
        small(score_noise_samples=samples, score_noise_std=std)


def test_score_noise_gradient_is_the_mean_over_fixed_noisy_copies():
    n, std = 3, 0.05
    model = small(score_noise_samples=n, score_noise_std=std, seed=4)
    assert not hasattr(small(), "score_noise")
    noise = model.score_noise
    assert noise.shape == (n, 3, 16, 16) and "score_noise" in model.state_dict()
    torch.testing.assert_close(noise.std(), torch.tensor(std), rtol=0.1, atol=0)
    assert torch.equal(noise, small(score_noise_samples=n, score_noise_std=std, seed=4).score_noise)
    assert not torch.equal(noise, small(score_noise_samples=n, score_noise_std=std, seed=5).score_noise)
    x = images(2)
    e, g, patch = model.gradient(x)
    assert patch is None
    parts = [energy_and_grad(model.net, x + noise[i]) for i in range(n)]
    torch.testing.assert_close(e, torch.stack([p[0] for p in parts]).mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, torch.stack([p[1] for p in parts]).mean(0), rtol=1e-5, atol=1e-7)
    # deterministic scores across calls
    fitted(model)
    s1, m1 = model.score(x)
    s2, m2 = model.score(x)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k


# ---------------------------------------------------------------- multi-scale map
def scipy_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Independent Gaussian blur of maps (B, H, W): scipy, mode 'mirror' (= torch's reflect), radius ceil(3 sigma)."""
    if sigma == 0:
        return maps
    r = max(1, math.ceil(3 * sigma))
    return np.stack([gaussian_filter(m, sigma, mode="mirror", truncate=r / sigma) for m in maps])


@pytest.mark.parametrize("sigma", [0.4, 1.0, 1.7, 2.5])
def test_gaussian_blur_equals_scipy_with_mirror_boundary(sigma):
    """torch's reflect padding (d c b | a b c d | c b a) is scipy's mode 'mirror'; radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma))
    k = gaussian_kernel(sigma)
    assert len(k) == 2 * r + 1 and float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    t = np.arange(-r, r + 1)
    want_k = np.exp(-0.5 * (t / sigma) ** 2)
    np.testing.assert_allclose(k.numpy(), want_k / want_k.sum(), rtol=1e-6, atol=1e-7)
    maps = torch.rand(2, 12, 16, generator=torch.Generator().manual_seed(0))
    got = gaussian_blur(maps, sigma).numpy()
    np.testing.assert_allclose(got, scipy_blur(maps.double().numpy(), sigma), rtol=0, atol=2e-6)
    # the boundary rule matters: scipy's 'reflect' (d c b a | a b c d) gives other border values
    edge_repeat = np.stack(
        [gaussian_filter(m, sigma, mode="reflect", truncate=r / sigma) for m in maps.numpy()]
    )
    assert np.abs(got - edge_repeat).max() > 1e-4
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


def test_map_sigmas_add_the_multiscale_map_and_its_max():
    sigmas = [0.0, 1.0, 2.0]
    model = fitted(small(map_sigmas=sigmas))
    assert "a_ms" not in small().PIXEL_MAPS and "A_ms_max" not in small().IMAGE_SCORES
    assert model.PIXEL_MAPS == (*PIXEL_MAPS, "a_ms") and model.IMAGE_SCORES == (*IMAGE_SCORES, "A_ms_max")
    assert set(model.pixel_auroc) == set(model.PIXEL_MAPS)  # the test loop evaluates the new map
    x = images(3)
    imgs, maps = model.score(x)
    base = maps["a_std_l2"].double().numpy()
    want = np.mean([scipy_blur(base, s) for s in sigmas], axis=0)
    np.testing.assert_allclose(maps["a_ms"].numpy(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert torch.equal(imgs["A_ms_max"], maps["a_ms"].amax(dim=(1, 2)))
    # the paper's maps are untouched by the option
    ref_images, ref_maps = compute_scores(*energy_and_grad(model.net, x), model.grad_mean, model.grad_std)
    for k in PIXEL_MAPS:
        assert torch.equal(maps[k], ref_maps[k]), k
    # sigma 0 alone: the map itself
    only0 = fitted(small(map_sigmas=[0]))
    _, m0 = only0.score(x)
    assert torch.equal(m0["a_ms"], m0["a_std_l2"])


def test_negative_map_sigma_is_refused():
    with pytest.raises(ValueError, match=r"model\.map_sigmas"):
        small(map_sigmas=[1.0, -0.5])


def test_map_sigma_too_large_for_the_image_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"model\.map_sigmas"):
        small(map_sigmas=[0.0, 6.0])  # radius 18 on a 16x16 map


# ---------------------------------------------------------------- patch energies
def test_patch_contributions_plus_bias_sum_to_the_energy_exactly():
    torch.manual_seed(0)
    net = EnergyNet(3, 16, 8).double()
    x = images(3, dtype=torch.float64)
    h = net.features(x)
    assert h.shape[-2:] == (4, 4)
    contrib = net.patch_contributions(h)
    weight, bias = net.body[-1].weight[0], net.body[-1].bias[0]
    want = torch.einsum("bchw,chw->bhw", h, weight)  # independent: the head's weight per position
    torch.testing.assert_close(contrib, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net(x), bias + contrib.sum((1, 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.head(h), net(x), rtol=0, atol=0)


def test_patch_energy_statistics_and_scores():
    model = fitted(small(patch_energy=True, spectral_norm=True), n=6, seed=2)
    assert "e_patch" not in small().PIXEL_MAPS and "E_patch_max" not in small().IMAGE_SCORES
    assert "patch_mean" not in small().state_dict()
    assert model.PIXEL_MAPS[-1] == "e_patch" and model.IMAGE_SCORES[-1] == "E_patch_max"
    net = model.scoring_net

    def contributions(x):
        with torch.no_grad():
            h = net.body[:-1](x)
            return torch.einsum("bchw,chw->bhw", h.double(), net.body[-1].weight[0].double())

    train = contributions(images(6, seed=2))
    torch.testing.assert_close(model.patch_mean.double(), train.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.patch_std.double(), train.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
    x = images(3, seed=9)
    imgs, maps = model.score(x)
    z = (contributions(x) - model.patch_mean.double()) / model.patch_std.double()
    torch.testing.assert_close(imgs["E_patch_max"].double(), z.amax(dim=(1, 2)), rtol=1e-4, atol=1e-4)
    e_patch = maps["e_patch"]
    assert e_patch.shape == (3, 16, 16)
    # bilinear upsampling: corners keep the grid's corner values, and never exceed the grid's max
    torch.testing.assert_close(e_patch[:, 0, 0].double(), z[:, 0, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(e_patch[:, -1, -1].double(), z[:, -1, -1], rtol=1e-4, atol=1e-4)
    assert bool((e_patch.amax(dim=(1, 2)) <= imgs["E_patch_max"] + 1e-5).all())


# ---------------------------------------------------------------- headline score and map
def test_default_image_score_and_pixel_map_pick_the_headline():
    assert (small().DEFAULT_IMAGE_SCORE, small().DEFAULT_PIXEL_MAP) == ("A_std_l2", "a_std_l2")
    model = fitted(small(default_image_score="energy", default_pixel_map="a_raw_l1"))
    assert (model.DEFAULT_IMAGE_SCORE, model.DEFAULT_PIXEL_MAP) == ("energy", "a_raw_l1")
    x = images(8, seed=5)
    thr = model.fit_thresholds([{"image": x}], image_quantile=1.0, pixel_quantile=1.0)
    imgs, maps = model.score(x)
    assert thr["image_threshold"] == pytest.approx(float(imgs["energy"].max()), rel=1e-6)
    assert thr["pixel_threshold"] == pytest.approx(float(maps["a_raw_l1"].max()), rel=1e-6)
    ms = small(map_sigmas=[1.0], default_image_score="A_ms_max", default_pixel_map="a_ms")
    assert (ms.DEFAULT_IMAGE_SCORE, ms.DEFAULT_PIXEL_MAP) == ("A_ms_max", "a_ms")


@pytest.mark.parametrize(
    "kw,setting",
    [
        (dict(default_image_score="nope"), "model.default_image_score"),
        (dict(default_image_score="A_ms_max"), "model.default_image_score"),  # needs map_sigmas
        (dict(default_image_score="E_patch_max"), "model.default_image_score"),  # needs patch_energy
        (dict(default_pixel_map="nope"), "model.default_pixel_map"),
        (dict(default_pixel_map="e_patch"), "model.default_pixel_map"),
    ],
)
def test_unknown_default_is_refused_naming_the_setting(kw, setting):
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        small(**kw)


# ---------------------------------------------------------------- export of the options
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_scorer_equals_score_with_instance_norm_noise_and_multiscale_defaults(dtype, tol):
    model = small(input_norm="instance", score_noise_samples=2, score_noise_std=0.05, map_sigmas=[0, 1, 2],
                  default_image_score="A_ms_max", default_pixel_map="a_ms", spectral_norm=True, ema_decay=0.9)  # fmt: skip
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.update_ema()
    model = fitted(model.to(dtype))
    x = images(3, seed=6, dtype=dtype)
    imgs, maps = model.score(x)
    scorer = model.scorer().eval()
    pixel_map, image_score, energy = scorer(x)
    ref_map, ref_score = maps["a_ms"], imgs["A_ms_max"]
    torch.testing.assert_close(pixel_map, ref_map, rtol=tol, atol=tol * float(ref_map.abs().max()))
    torch.testing.assert_close(image_score, ref_score, rtol=tol, atol=tol * float(ref_score.abs().max()))
    torch.testing.assert_close(energy, imgs["energy"], rtol=tol, atol=tol * float(imgs["energy"].abs().max()))
    assert not torch.equal(maps["a_ms"], maps["a_std_l2"])  # the default really is the multi-scale map


@pytest.mark.parametrize(
    "kw,setting",
    [
        (dict(patch_energy=True, default_pixel_map="e_patch"), "model.default_pixel_map"),
        (dict(patch_energy=True, default_image_score="E_patch_max"), "model.default_image_score"),
        (dict(default_pixel_map="a_raw_l1"), "model.default_pixel_map"),
    ],
)
def test_scorer_refuses_a_non_exportable_default(kw, setting):
    model = fitted(small(**kw))
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        model.scorer()


# ---------------------------------------------------------------- the paper setting, unchanged
def test_all_defaults_score_exactly_as_the_paper():
    model = fitted(small())
    assert model.IMAGE_SCORES == IMAGE_SCORES and model.PIXEL_MAPS == PIXEL_MAPS
    expected = {"grad_mean", "grad_std", "stats_count", "image_threshold", "pixel_threshold"}
    assert {k for k in model.state_dict() if not k.startswith("net.")} == expected
    assert {k for k, _ in model.named_parameters()} == {
        k for k, _ in EnergyNet(3, 16, 8).named_parameters(prefix="net")
    }
    x = images(3, seed=8)
    imgs, maps = model.score(x)
    energy, grad = energy_and_grad(model.net, x)
    ref_images, ref_maps = compute_scores(
        energy, grad, model.grad_mean, model.grad_std, model.hparams.score_eps
    )
    assert imgs.keys() == ref_images.keys() and maps.keys() == ref_maps.keys()
    for k in ref_images:
        assert torch.equal(imgs[k], ref_images[k]), k
    for k in ref_maps:
        assert torch.equal(maps[k], ref_maps[k]), k
    # the export is the paper's scorer
    pm, sc, e = model.scorer()(x)
    pm0, sc0, e0 = EBMScorer(model.net, model.grad_mean, model.grad_std, model.hparams.score_eps)(x)
    assert torch.equal(pm, pm0) and torch.equal(sc, sc0) and torch.equal(e, e0)


def test_all_defaults_train_exactly_as_the_paper():
    """One training step: E(x + data_noise) minus E(short-run SGLD from uniform noise), same random stream."""
    model = small(in_channels=1, image_size=8, base_width=4, sgld_steps=3, data_noise=0.03).train()
    x = images(4, 1, 8)
    loss = model.training_step({"image": x}, 0)
    gen = torch.Generator().manual_seed((0 * 1_000_003 + 0) * 1009 + 0)  # seed 0, step 0, rank 0
    x_pos = x + 0.03 * torch.randn(x.shape, generator=gen)
    x0 = torch.rand(x.shape, generator=gen) * 2 - 1
    net = copy.deepcopy(model.net).requires_grad_(False)
    x_neg = x0
    for _ in range(3):
        x_neg = x_neg.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(net(x_neg).sum(), x_neg)
        x_neg = (x_neg.detach() - 1.0 * g + 0.01 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    want = net(x_pos).mean() - net(x_neg).mean()
    assert torch.equal(model.train_diagnostics["x_neg"], x_neg)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6, abs=1e-6)


def test_checkpoint_without_the_new_hyperparameters_loads_with_the_paper_setting(tmp_path):
    model = fitted(small())
    old = {k: v for k, v in dict(model.hparams).items() if k not in NEW_HPARAMS}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": old, "pytorch-lightning_version": pl.__version__},
               path)  # fmt: skip
    loaded = EBMModule.load_from_checkpoint(path, map_location="cpu").eval()
    assert loaded.net_ema is None and loaded.hparams.get("input_norm", "none") == "none"
    x = images(2)
    a, _ = loaded.score(x)
    b, _ = model.score(x)
    for k in b:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- persistent chains
def test_reset_chains_redraws_the_replay_buffer_uniformly():
    model = small(in_channels=1, image_size=8, base_width=4, persistent=True, buffer_size=64)
    model.reset_chains()  # no buffer yet: nothing to do
    assert model.replay.numel() == 0
    model.replay = torch.zeros(64, 1, 8, 8)
    model.reset_chains()
    assert model.replay.shape == (64, 1, 8, 8)
    step_stream = uniform_init((64, 1, 8, 8), (-1.0, 1.0), "cpu", model.step_generator())
    assert not torch.equal(model.replay, step_stream)  # not the random numbers this step's chains used
    again = torch.zeros(64, 1, 8, 8)
    model.replay = again.clone()
    model.reset_chains()
    reset_once = model.replay.clone()
    model.replay = again
    model.reset_chains()
    assert torch.equal(model.replay, reset_once)  # deterministic: exact resume keeps working
    assert (
        float(model.replay.min()) >= -1 and float(model.replay.max()) <= 1 and float(model.replay.std()) > 0.4
    )


def test_apply_spectral_norm_wraps_every_conv_of_the_body():
    net = apply_spectral_norm(EnergyNet(1, 8, 4))
    convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    x = images(2, 1, 8)
    net.eval()  # no power iteration: every weight access gives the same normalized weight
    torch.testing.assert_close(net(x), net.head(net.features(x)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "spectral_norm",
    [
        False,
        True,
    ],
)  # fmt: skip
def test_onnx_export_of_the_options_defaults_matches_score_at_batch_1_and_5(tmp_path, spectral_norm):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from ebmad.deploy.onnx import export_onnx, verify_onnx

    model = fitted(small(input_norm="instance", score_noise_samples=2, score_noise_std=0.05, map_sigmas=[0, 1, 2],
                         default_image_score="A_ms_max", default_pixel_map="a_ms", ema_decay=0.9,
                         spectral_norm=spectral_norm))  # fmt: skip
    path = tmp_path / "m.onnx"
    names = export_onnx(model, path)
    assert names == ["pixel_map", "image_score", "energy"]
    assert verify_onnx(model, path) < 1e-4  # what `python -m ebmad.export` does right after exporting
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(5, seed=11)
    for batch in (1, 5):
        imgs, maps = model.score(x[:batch])
        got = dict(zip(names, session.run(None, {"image": x[:batch].numpy()}), strict=True))
        np.testing.assert_allclose(got["pixel_map"], maps["a_ms"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["image_score"], imgs["A_ms_max"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["energy"], imgs["energy"].numpy(), rtol=1e-5, atol=1e-5)
