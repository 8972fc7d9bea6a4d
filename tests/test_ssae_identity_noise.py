"""SSAE's identity-anchored Gaussian noise (``model.identity_noise_std``, Bauer & Mueller 2025).

std = 0 is today's training step bit for bit; with std > 0 the same noise is on input and target, so their
difference is the corruption alone (exactly 0 outside the corrupted regions); everything is fixed by the seed.
"""

import copy

import pytest
import torch

from ebmad.models.ssae import SSAEModule
from ebmad.models.ssae.corruption import StructuredCorruption, identity_noise
from ebmad.models.ssae.loss import restoration_loss
from ebmad.train import run

from conftest import assert_same_training_state, ckpt_state

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def small_module(std: float = 0.0, seed: int = 0) -> SSAEModule:
    torch.manual_seed(0)
    return SSAEModule(
        image_size=32, widths=(4, 8), sdc_blocks=1, dilations=(1, 2), identity_noise_std=std, seed=seed
    )


def batch(n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"image": torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1}


def test_std0_is_todays_training_step_exactly():
    """Today's path (corrupt with the step generator, restore, plain MSE) against training_step at std = 0."""
    model = small_module(std=0.0)
    ref = copy.deepcopy(model)
    b = batch()
    clean = (b["image"] + 1) / 2
    corrupted, mask = ref.corruption.corrupt(clean, ref.step_generator())
    ref_out = ref.net(corrupted)
    ref_loss = restoration_loss(ref_out, clean, mask)
    loss = model.training_step(b, 0)
    assert torch.equal(loss, ref_loss)
    inputs, target, mask2 = model.training_pair(clean, model.step_generator())
    assert torch.equal(inputs, corrupted) and torch.equal(target, clean) and torch.equal(mask2, mask)
    assert torch.equal(model.net(inputs), ref_out)
    noisy = small_module(std=0.05)
    assert not torch.equal(noisy.training_step(b, 0), ref_loss)


def test_noise_cancels_in_the_residual_on_a_hand_case():
    """Flat grey image, a known square corrupted to +0.2: input - target is 0.2 there and exactly 0 elsewhere."""
    clean = torch.full((2, 3, 16, 16), 0.5)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:9, 6:12] = True
    corrupted = torch.where(mask[:, None], clean + 0.2, clean)
    inputs, target = identity_noise(corrupted, clean, 0.02, torch.Generator().manual_seed(0))
    residual = inputs - target
    assert torch.equal(residual[~mask[:, None].expand_as(residual)], torch.zeros(2 * 3 * (256 - 30)))
    torch.testing.assert_close(residual[mask[:, None].expand_as(residual)], torch.full((2 * 3 * 30,), 0.2))
    noise = target - clean  # the noise is kept in the target (not a denoising target)
    assert 0.015 < float(noise.std()) < 0.025
    assert not torch.equal(inputs, corrupted)


def test_clipping_keeps_the_cancellation_outside_the_regions():
    """Near the bounds both sides clip with the same noise: outside the mask input == target still."""
    clean = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clean[:, :, :8] = 1.0  # saturated rows clip on both sides
    clean[:, :, 8:16] = 0.0
    corrupted, mask = StructuredCorruption().corrupt(clean, torch.Generator().manual_seed(1))
    inputs, target = identity_noise(corrupted, clean, 0.3, torch.Generator().manual_seed(2))
    outside = ~mask[:, None].expand_as(inputs)
    assert torch.equal(inputs[outside], target[outside])
    assert 0 <= float(inputs.min()) and float(inputs.max()) <= 1 and 0 <= float(target.min())
    assert float(target.max()) <= 1 and not torch.equal(target, clean)


def test_noise_is_drawn_after_the_corruption_and_seeded():
    """std > 0 keeps the corruption draws of std = 0 (same mask, same residual); same seed, same pair."""
    clean = 0.3 + 0.4 * (batch()["image"] + 1) / 2  # in [0.3, 0.7]: nothing clips at std 0.01
    plain = small_module(std=0.0)
    noisy = small_module(std=0.01)
    c0, t0, m0 = plain.training_pair(clean, plain.step_generator())
    c1, t1, m1 = noisy.training_pair(clean, noisy.step_generator())
    assert torch.equal(m0, m1) and not torch.equal(c0, c1)
    torch.testing.assert_close(c1 - t1, c0 - t0, rtol=0, atol=1e-6)
    again = noisy.training_pair(clean, noisy.step_generator())
    assert all(torch.equal(x, y) for x, y in zip((c1, t1, m1), again, strict=True))
    other = small_module(std=0.01, seed=1)
    assert not torch.equal(other.training_pair(clean, other.step_generator())[0], c1)


def test_negative_std_is_named():
    with pytest.raises(ValueError, match="model.identity_noise_std"):
        small_module(std=-0.1)
    with pytest.raises(ValueError, match="model.identity_noise_std"):
        identity_noise(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), -1.0, torch.Generator())


def test_training_with_noise_is_seeded(make_cfg, tmp_path):
    """Two runs with the same seed and std write identical weights; std = 0 trains differently."""
    net = ("model=ssae", "model.widths=[4,8]", "model.sdc_blocks=1", "model.dilations=[1,2]", "test=false")
    states = {}
    for name, std in (("a", 0.05), ("b", 0.05), ("zero", 0.0)):
        run(make_cfg(*net, "trainer.max_steps=3", f"model.identity_noise_std={std}", out=tmp_path / name))
        states[name] = ckpt_state(tmp_path / name / "checkpoints" / "last.ckpt")
    assert states["a"]["hyper_parameters"]["identity_noise_std"] == 0.05
    assert_same_training_state(states["a"], states["b"])
    head = "net.head.weight"
    assert not torch.equal(states["a"]["state_dict"][head], states["zero"]["state_dict"][head])
