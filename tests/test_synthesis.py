"""Shared anomaly synthesis (ebmad/synthesis): one implementation for DRAEM, SSAE and the validation kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ebmad.models.draem.synthesis as draem_synthesis
import ebmad.models.ssae.corruption as ssae_corruption
from ebmad.data.corruption import plant_defects
from ebmad.models.draem import perlin as draem_perlin
from ebmad.models.draem import textures as draem_textures
from ebmad.models.ssae import textures as ssae_textures
from ebmad.synthesis import (
    KINDS,
    blend,
    describe,
    favoured,
    layout,
    neutral_kinds,
    perlin,
    textures,
    validation_anomalies,
)
from ebmad.synthesis.textures import texture_source

DTD = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dtd" / "images"
ALL = tuple(KINDS)
S = (0.3, 0.6, 1.0)


def images(n=6, c=3, size=32, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_one_implementation_shared_by_draem_ssae_and_the_ebm():
    assert (
        draem_synthesis.blend is blend.blend and draem_synthesis.rand_perlin_mask is perlin.rand_perlin_mask
    )
    from ebmad.models.draem import lightning_model as draem_module
    from ebmad.models.ebm import lightning_model as ebm_module
    from ebmad.synthesis import perlin_anomalies

    # DRAEM's training and the EBM's energy-margin term call the same synthesis
    assert draem_module.synthesize is ebm_module.synthesize is perlin_anomalies.synthesize
    assert draem_synthesis.synthesize is perlin_anomalies.synthesize
    assert draem_perlin.perlin_noise is perlin.perlin_noise
    assert draem_textures.FolderTextures is textures.FolderTextures
    assert draem_textures.ProceduralTextures is textures.ProceduralTextures
    assert issubclass(ssae_textures.FolderTextures, textures.FolderTextures)
    assert ssae_corruption.value_noise is textures.value_noise


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ALL)
def test_kind_is_seeded_changes_only_masked_pixels_and_mask_is_the_label(kind, channels):
    x = images(c=channels)
    y, m, k = validation_anomalies(x, [kind], seed=1, strengths=S)
    assert y.shape == (3 * 6, channels, 32, 32) and m.shape == (18, 32, 32) and m.dtype == torch.bool
    assert torch.equal(k, torch.zeros(18, dtype=torch.long))
    xs = x.repeat(3, 1, 1, 1)
    outside = ~m[:, None].expand_as(y)
    assert torch.equal(y[outside], xs[outside]), "a pixel outside the mask changed"
    changed = (y != xs).any(1)
    assert m.flatten(1).any(1).all() and float(m.float().mean()) < 0.5
    assert float((changed & m).sum() / m.sum()) > 0.9  # on random images nearly every masked pixel changes
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    y2, m2, _ = validation_anomalies(x, [kind], seed=1, strengths=S)
    assert torch.equal(y, y2) and torch.equal(m, m2)
    y3, m3, _ = validation_anomalies(x, [kind], seed=2, strengths=S)
    assert not torch.equal(y, y3)
    # one mask per image for every strength; a larger strength changes the masked pixels more
    assert torch.equal(m[:6], m[6:12]) and torch.equal(m[:6], m[12:])
    change = [float((y[i * 6 : (i + 1) * 6] - x).abs()[m[:6, None].expand_as(x)].mean()) for i in range(3)]
    assert change[0] < change[1] < change[2]


def test_several_kinds_keep_their_order_and_do_not_disturb_each_other():
    x = images()
    y, m, k = validation_anomalies(x, ["warp", "color"], seed=3, strengths=S)
    assert torch.equal(k, torch.tensor([0] * 18 + [1] * 18))
    kind, strength, image = layout(6, 2, 3)
    assert torch.equal(kind, k) and strength[6:12].eq(1).all() and torch.equal(image[:6], torch.arange(6))
    alone, _, _ = validation_anomalies(x, ["color"], seed=3, strengths=S)
    assert torch.equal(y[18:], alone)


def test_spots_scratches_at_full_strength_is_todays_validation():
    x = images(n=8)
    y, m, _ = validation_anomalies(x, ["spots_scratches"], seed=5, strengths=[1.0])
    ref, ref_mask = plant_defects(x, seed=5)
    assert torch.equal(y, ref) and torch.equal(m, ref_mask)


def test_perlin_patch_takes_the_same_region_of_another_image():
    x = torch.arange(4.0)[:, None, None, None].expand(4, 3, 16, 16) / 4  # image i is constant i/4
    y, m, _ = validation_anomalies(x, ["perlin_patch"], strengths=[1.0])
    for i in range(4):
        inside = y[i][:, m[i]].unique()
        assert len(inside) == 1 and float(inside) != i / 4 and float(inside) in {0.0, 0.25, 0.5, 0.75}
    with pytest.raises(ValueError, match="at least 2"):
        validation_anomalies(x[:1], ["perlin_patch"])


def test_perlin_texture_from_a_folder(tmp_path):
    (tmp_path / "tex" / "sub").mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 255, np.uint8)).save(tmp_path / "tex" / "sub" / "white.jpg")
    x = images(c=1)
    y, m, _ = validation_anomalies(x, ["perlin_texture"], texture_dir=tmp_path / "tex", strengths=[0.5, 1.0])
    assert torch.allclose(y[6:][m[6:, None]], torch.ones(1)) and torch.allclose(
        y[:6][m[:6, None]], (x[m[:6, None]] + 1) / 2
    )  # opaque white texture; half-way at opacity 0.5
    with pytest.raises(ValueError, match=r"nope.*data\.val_texture_dir"):
        validation_anomalies(x, ["perlin_texture"], texture_dir=tmp_path / "nope")


@pytest.mark.skipif(not DTD.is_dir(), reason=f"DTD subset not found at {DTD}")
def test_perlin_texture_with_dtd_decodes_only_the_drawn_files():
    src = texture_source(DTD, 32)
    assert len(src) >= 100
    a, b = src.sample(4, torch.Generator().manual_seed(0)), src.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32) and len(src._decoded) <= 4
    y, m, _ = validation_anomalies(images(n=4), ["perlin_texture"], texture_dir=DTD)
    assert y.shape == (12, 3, 32, 32) and m.any()


def test_bad_arguments_are_named():
    x = images()
    with pytest.raises(ValueError, match="unknown validation anomaly kind.*'blur'"):
        validation_anomalies(x, ["blur"])
    with pytest.raises(ValueError, match="strengths"):
        validation_anomalies(x, ["warp"], strengths=[0.0, 0.5])
    with pytest.raises(ValueError, match="twice"):
        validation_anomalies(x, ["warp", "warp"])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        validation_anomalies(x * 3, ["warp"])


def test_registry_marks_the_kinds_models_train_on():
    assert KINDS["perlin_texture"].trained_by == ("draem",) and KINDS["warp"].trained_by == ("ssae",)
    assert favoured(["perlin_texture", "color"], ["ebm", "draem"]) == {"ebm": [], "draem": ["perlin_texture"]}
    neutral = neutral_kinds(["ebm", "draem", "ssae"])
    assert "perlin_patch" in neutral and "color" in neutral and "perlin_texture" not in neutral
    assert "warp" not in neutral and neutral_kinds(["ebm"], strict=True) == list(KINDS)
    d = describe(["perlin_texture", "warp"], seed=0)
    assert d["kinds"] == ["perlin_texture", "warp"] and d["texture_source"] == "procedural"
    assert d["trained_by"] == {"perlin_texture": ["draem"], "warp": ["ssae"]}
