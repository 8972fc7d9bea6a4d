"""DRAEM: networks, Perlin masks, augmentations, synthesis, loss, scoring, textures, framework runs."""

from __future__ import annotations

import json
import math
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from ebmad.models.draem import DraemModule, DraemNet
from ebmad.models.draem.loss import draem_loss
from ebmad.models.draem.perlin import perlin_noise, rand_perlin_mask
from ebmad.models.draem.synthesis import blend, synthesize  # the shared implementation, re-exported
from ebmad.models.draem.textures import FolderTextures, ProceduralTextures
from ebmad.synthesis import augment as A
from ebmad.train import Preempted, run

from conftest import assert_same_training_state, ckpt_state, compose_cfg, read_scores

TINY = ("model=draem", "model.recon_base_width=8", "model.disc_base_width=8")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 256])
def test_network_output_shapes(size, channels):
    net = DraemNet(channels, recon_base_width=8, disc_base_width=8).eval()
    with torch.no_grad():
        rec, logits = net(torch.rand(2, channels, size, size))
    assert rec.shape == (2, channels, size, size)
    assert logits.shape == (2, 2, size, size)


def conv_bn(cin, cout):  # 3x3 conv with bias + BatchNorm (weight, bias)
    return 9 * cin * cout + cout + 2 * cout


def test_official_widths_parameter_count_and_init():
    """Counted layer by layer from the official model_unet.py (in 3, base 128 / in 6, base 64)."""
    w = 128
    rec = [(3, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w), (4 * w, 8 * w),
           (8 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w),  # encoder blocks 1-5
           (8 * w, 8 * w), (8 * w, 8 * w), (8 * w, 4 * w), (4 * w, 4 * w), (4 * w, 4 * w), (4 * w, 2 * w),
           (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, w), (w, w), (w, w), (w, w)]  # decoder up/db 1-4  # fmt: skip
    w = 64
    disc = [(6, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w), (4 * w, 8 * w),
            (8 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w),  # blocks 1-6
            (8 * w, 8 * w), (16 * w, 8 * w), (8 * w, 8 * w), (8 * w, 4 * w), (12 * w, 4 * w), (4 * w, 4 * w),
            (4 * w, 2 * w), (6 * w, 2 * w), (2 * w, 2 * w), (2 * w, w), (3 * w, w), (w, w),
            (w, w), (2 * w, w), (w, w)]  # up_b, db_b, up/db 1-4  # fmt: skip
    expected = sum(conv_bn(a, b) for a, b in rec + disc)
    expected += 9 * 128 * 3 + 3 + 9 * 64 * 2 + 2  # the two fin_out convs (no BN)
    net = DraemNet(3, 128, 64)
    assert sum(p.numel() for p in net.parameters()) == expected == 97_422_725
    convs = torch.cat([m.weight.detach().flatten() for m in net.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(float(convs.mean())) < 1e-4 and float(convs.std()) == pytest.approx(0.02, rel=0.01)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_w = torch.cat([m.weight.detach() for m in bns])
    assert float(bn_w.mean()) == pytest.approx(1.0, abs=2e-3) and float(bn_w.std()) == pytest.approx(
        0.02, rel=0.05
    )
    assert all(float(m.bias.abs().max()) == 0 for m in bns)


# ------------------------------------------------------------------------------------- Perlin
def official_perlin(shape, res, angles):
    """The official rand_perlin_2d_np (perlin.py) with the gradient angles given instead of drawn."""
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    lerp = lambda x, y, w: (y - x) * w + x  # noqa: E731
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile_grads(s1, s2):
        return np.repeat(np.repeat(gradients[s1[0] : s1[1], s2[0] : s2[1]], d[0], axis=0), d[1], axis=1)

    def dot(grad, shift):
        g = np.stack(
            (grid[: shape[0], : shape[1], 0] + shift[0], grid[: shape[0], : shape[1], 1] + shift[1]), -1
        )
        return (g * grad[: shape[0], : shape[1]]).sum(axis=-1)

    n00 = dot(tile_grads([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile_grads([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile_grads([0, -1], [1, None]), [0, -1])
    n11 = dot(tile_grads([1, None], [1, None]), [-1, -1])
    t = fade(grid[: shape[0], : shape[1]])
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


@pytest.mark.parametrize("size", [32, 64])
def test_perlin_noise_equals_official_formula(size):
    res_list = [(1, 1), (2, 8), (32, 4), (16, 32)]
    rng = np.random.default_rng(0)
    angles = 2 * np.pi * rng.random((len(res_list), 33, 33))
    ours = perlin_noise(torch.from_numpy(angles), torch.tensor(res_list), (size, size))
    for i, res in enumerate(res_list):
        ref = official_perlin((size, size), res, angles[i, : res[0] + 1, : res[1] + 1])
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-12)


def test_perlin_masks_deterministic_and_binary():
    a, b = rand_perlin_mask(16, 32, gen(3)), rand_perlin_mask(16, 32, gen(3))
    assert a.shape == (16, 1, 32, 32) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert 0 < float(a.mean()) < 0.5 and not torch.equal(a, rand_perlin_mask(16, 32, gen(4)))


# -------------------------------------------------------------------------------- augmentations
def u8_image(seed: int, lo: int = 0, hi: int = 256, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (size, size, 3), dtype=np.uint8)


def to_t(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255


def to_u8(t: torch.Tensor) -> np.ndarray:
    return (t[0].permute(1, 2, 0) * 255).round().byte().numpy()


def test_histogram_operations_equal_pil():
    img = u8_image(0, 40, 170)
    pil = Image.fromarray(img)
    np.testing.assert_array_equal(to_u8(A.equalize(to_t(img))), np.asarray(ImageOps.equalize(pil)))
    for cutoff in (0, 5, 20):
        ours = A.autocontrast(to_t(img), torch.tensor([cutoff]))
        np.testing.assert_array_equal(to_u8(ours), np.asarray(ImageOps.autocontrast(pil, cutoff=cutoff)))
    for bits in range(1, 9):
        ours = A.posterize(to_t(img), torch.tensor([bits]))
        np.testing.assert_array_equal(to_u8(ours), np.asarray(ImageOps.posterize(pil, bits)))
    for threshold in (32, 100, 128):
        ours = A.solarize(to_t(img), torch.tensor([threshold / 255]), torch.tensor([True]))
        np.testing.assert_array_equal(to_u8(ours), np.asarray(ImageOps.solarize(pil, threshold)))
    assert torch.equal(A.solarize(to_t(img), torch.tensor([0.0]), torch.tensor([False])), to_t(img))


def test_sharpness_matches_pil_within_rounding():
    img = u8_image(1)
    for factor in (0.0, 0.5, 1.7):
        ours = to_u8(A.quantize(A.enhance_sharpness(to_t(img), torch.tensor([factor])))).astype(int)
        ref = np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor)).astype(int)
        assert np.abs(ours - ref).max() <= 1


def test_colour_operations_identity_and_shift():
    x = to_t(u8_image(2, 30, 220))
    for space in range(len(A.BRIGHTNESS_SPACES)):
        same = A.multiply_add_brightness(x, torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([True]),
                                         torch.tensor([space]))  # fmt: skip
        assert float((same - x).abs().max()) < 1e-3, space
    grey = torch.full((1, 3, 8, 8), 0.5)
    brighter = A.multiply_add_brightness(grey, torch.tensor([1.0]), torch.tensor([30.0]), torch.tensor([True]),
                                         torch.tensor([0]))  # fmt: skip
    assert torch.allclose(brighter, grey + 30 / 255, atol=1e-5)  # Y + 30 on a grey image
    assert float((A.add_hue_saturation(x, torch.tensor([0]), torch.tensor([0])) - x).abs().max()) < 1e-4
    full_turn = A.add_hue_saturation(x, torch.tensor([255]), torch.tensor([0]))  # 255 = 360 degrees
    assert float((full_turn - x).abs().max()) < 1e-4
    assert torch.allclose(A.gamma_contrast(x, torch.tensor([[2.0, 1.0, 0.5]])),
                          torch.stack([x[:, 0] ** 2, x[:, 1], x[:, 2].sqrt()], 1))  # fmt: skip


def test_rand_augment_three_distinct_operations_deterministic():
    ops = A.choose_operations(500, gen(0))
    assert ops.shape == (500, 3) and all(len(set(r)) == 3 for r in ops.tolist())
    assert set(ops.flatten().tolist()) == set(range(len(A.OP_NAMES))) and len(A.OP_NAMES) == 10
    tex = ProceduralTextures(32).sample(12, gen(1))
    a, b = A.rand_augment(tex, gen(2)), A.rand_augment(tex, gen(2))
    assert torch.equal(a, b) and not torch.equal(a, A.quantize(tex))
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and torch.equal(a, A.quantize(a))


def test_rotate_normal_probability_extremes():
    x = torch.rand(4, 3, 32, 32) * 0.5 + 0.5
    assert torch.equal(A.rotate_normal(x, gen(0), p=0.0), x)
    rotated = A.rotate_normal(x, gen(0), p=1.0)
    assert all(not torch.equal(r, o) for r, o in zip(rotated, x, strict=True))


# ------------------------------------------------------------------------------------ synthesis
def test_blend_hand_case():
    image = torch.tensor([[[[0.2, 0.4]]], [[[0.6, 0.8]]]])
    texture = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    out = blend(image, texture, mask, torch.tensor([0.25, 0.5]))
    # masked: (1 - b) A + b I; unmasked: I
    expected = torch.tensor(
        [[[[0.75 * 1 + 0.25 * 0.2, 0.4]]], [[[0.5 * 0 + 0.5 * 0.6, 0.5 * 1 + 0.5 * 0.8]]]]
    )
    assert torch.allclose(out, expected)


class WhiteTextures:
    def sample(self, n, generator):
        return torch.ones(n, 3, 32, 32)


def test_synthesis_invariants():
    x = torch.zeros(64, 3, 32, 32)
    aug, mask, has = synthesize(x, WhiteTextures(), gen(5), augment=False)
    assert aug.shape == x.shape and mask.shape == (64, 1, 32, 32)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(has, (mask.flatten(1).amax(1) > 0).float())
    assert 16 <= int((has == 0).sum()) <= 48  # half left clean (p=0.5), plus empty Perlin masks
    assert torch.equal(aug * (1 - mask), torch.zeros_like(aug))  # outside the mask: the image
    for a, m, h in zip(aug, mask[:, 0], has, strict=True):
        if h:  # inside: (1 - beta) * 1 + beta * 0, one beta per image in [0, 0.8)
            vals = a[:, m > 0]
            assert float(vals.max() - vals.min()) < 1e-6 and 0.2 < float(vals[0, 0]) <= 1.0
    gray, _, _ = synthesize(torch.zeros(4, 1, 32, 32), ProceduralTextures(32), gen(5))
    assert gray.shape == (4, 1, 32, 32)
    tex = ProceduralTextures(32)
    one = synthesize(torch.rand(8, 3, 32, 32, generator=gen(1)), tex, gen(9))
    two = synthesize(torch.rand(8, 3, 32, 32, generator=gen(1)), tex, gen(9))
    assert all(torch.equal(p, q) for p, q in zip(one, two, strict=True))


def test_procedural_textures_deterministic_in_range():
    a, b = ProceduralTextures(32).sample(16, gen(0)), ProceduralTextures(32).sample(16, gen(0))
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert float(a.flatten(1).std(1).min()) > 0.01  # every texture has structure
    assert not torch.equal(a, ProceduralTextures(32).sample(16, gen(1)))


# --------------------------------------------------------------------------------------- loss
def official_ssim(img1, img2, window_size=11):
    """loss.py ssim(val_range=None) as written in the official code."""
    max_val = 255 if torch.max(img1) > 128 else 1
    min_val = -1 if torch.min(img1) < -0.5 else 0
    L = max_val - min_val
    gauss = torch.Tensor(
        [math.exp(-((x - window_size // 2) ** 2) / float(2 * 1.5**2)) for x in range(window_size)]
    )
    w1 = (gauss / gauss.sum()).unsqueeze(1)
    channel = img1.shape[1]
    window = w1.mm(w1.t()).float().unsqueeze(0).unsqueeze(0).expand(channel, 1, window_size, window_size)
    pad = window_size // 2
    mu1 = F.conv2d(img1, window, padding=pad, groups=channel)
    mu2 = F.conv2d(img2, window, padding=pad, groups=channel)
    s1 = F.conv2d(img1 * img1, window, padding=pad, groups=channel) - mu1.pow(2)
    s2 = F.conv2d(img2 * img2, window, padding=pad, groups=channel) - mu2.pow(2)
    s12 = F.conv2d(img1 * img2, window, padding=pad, groups=channel) - mu1 * mu2
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    v1, v2 = 2.0 * s12 + c2, s1 + s2 + c2
    return (((2 * mu1 * mu2 + c1) * v1) / ((mu1.pow(2) + mu2.pow(2) + c1) * v2)).mean()


def official_focal(logit, target, gamma=2, smooth=1e-5):
    """loss.py FocalLoss() (alpha=None) as written in the official code, input already softmaxed."""
    num_class = logit.shape[1]
    logit = logit.view(logit.size(0), num_class, -1).permute(0, 2, 1).contiguous().view(-1, num_class)
    target = torch.squeeze(target, 1).reshape(-1, 1)
    idx = target.long()
    one_hot = torch.zeros(target.size(0), num_class).scatter_(1, idx, 1)
    one_hot = torch.clamp(one_hot, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    alpha = torch.squeeze(torch.ones(num_class, 1)[idx])
    return (-1 * alpha * torch.pow((1 - pt), gamma) * pt.log()).mean()


@pytest.mark.parametrize("signed", [False, True], ids=["range01", "range-11"])
def test_loss_equals_official_terms(signed):
    g = gen(0)
    rec, target = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    if signed:  # min < -0.5: the official SSIM switches to data range 2
        rec = rec * 2 - 1
    logits = torch.randn(2, 2, 32, 32, generator=g)
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.7).float()
    out = draem_loss(rec, target, logits, mask)
    sm = torch.softmax(logits, 1)
    expected = F.mse_loss(rec, target) + (1 - official_ssim(rec, target)) + official_focal(sm, mask)
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    assert torch.allclose(out["focal"], official_focal(sm, mask), atol=1e-7)


def test_loss_hand_values():
    img = torch.rand(1, 3, 32, 32, generator=gen(1))
    mask = torch.zeros(1, 1, 32, 32)
    out = draem_loss(img, img, torch.zeros(1, 2, 32, 32), mask)  # perfect reconstruction, p = 0.5
    assert float(out["l2"]) == 0 and float(out["ssim"]) == pytest.approx(0, abs=1e-6)
    pt = 0.5 * (1 - 1e-5) + 0.5 * 1e-5 + 1e-5  # clamped one-hot . p + smooth
    assert float(out["focal"]) == pytest.approx(-((1 - pt) ** 2) * math.log(pt), rel=1e-6)


# ------------------------------------------------------------------------------------ scoring
def tiny_model(**kw) -> DraemModule:
    return DraemModule(in_channels=3, image_size=32, recon_base_width=8, disc_base_width=8, **kw).eval()


def test_scores_are_softmax_map_and_max_of_21x21_mean():
    model = tiny_model()
    x = torch.rand(3, 3, 32, 32, generator=gen(0)) * 2 - 1
    images, maps = model.score(x)
    with torch.no_grad():
        prob = torch.softmax(model.net((x + 1) / 2)[1], dim=1)[:, 1]
    assert torch.allclose(maps["mask_prob"], prob, atol=1e-6)
    windows = F.pad(prob, (10, 10, 10, 10)).unfold(1, 21, 1).unfold(2, 21, 1)  # (B, 32, 32, 21, 21)
    expected = (windows.sum((-1, -2)) / 441).flatten(1).amax(1)  # zero padding counts, as avg_pool2d
    assert torch.allclose(images["max_pool21"], expected, atol=1e-6)
    assert torch.allclose(images["mask_max"], prob.flatten(1).amax(1))
    assert torch.allclose(images["mask_mean"], prob.flatten(1).mean(1))
    pixel, score = model.scorer()(x)
    assert torch.allclose(pixel, prob, atol=1e-6) and torch.allclose(score, expected, atol=1e-6)


def test_scorer_exports_to_onnx_with_dynamic_batch(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    scorer = tiny_model().scorer()
    path = tmp_path / "draem.onnx"
    torch.onnx.export(scorer, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=False, input_names=["image"],
                      output_names=["pixel_map", "image_score"],
                      dynamic_axes={"image": {0: "batch"}, "pixel_map": {0: "batch"}, "image_score": {0: "batch"}})  # fmt: skip
    x = torch.rand(3, 3, 32, 32, generator=gen(1)) * 2 - 1
    pixel, score = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})
    ref_pixel, ref_score = scorer(x)
    np.testing.assert_allclose(pixel, ref_pixel.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(score, ref_score.detach().numpy(), atol=1e-5)


def test_schedules_and_invalid_settings():
    model = tiny_model(schedule="paper")
    model._trainer = SimpleNamespace(estimated_stepping_batches=700)
    sched = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert dict(sched.milestones) == {400: 1, 600: 1} and sched.gamma == 0.1
    model = tiny_model(schedule="code")
    model._trainer = SimpleNamespace(estimated_stepping_batches=18200)  # 700 epochs x 26 steps
    sched = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert dict(sched.milestones) == {14560: 1, 16380: 1} and sched.gamma == 0.2
    with pytest.raises(ValueError, match="multiple of 32"):
        DraemModule(image_size=48)
    with pytest.raises(ValueError, match="model.schedule"):
        DraemModule(image_size=32, schedule="cosine")


# ----------------------------------------------------------------------------------- textures
def test_folder_textures_load_nested_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(u8_image(0, size=50)).save(tmp_path / "a" / "x.jpg")
    Image.fromarray(u8_image(1, size=20)[..., 0]).save(tmp_path / "a" / "b" / "y.png")  # grayscale
    Image.fromarray(u8_image(2, size=40)).convert("RGBA").save(tmp_path / "z.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "._x.jpg").write_bytes(b"AppleDouble junk")  # hidden files are skipped
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "x.jpg").write_bytes(b"junk")
    tex = FolderTextures(tmp_path, 32)
    assert len(tex) == 3 and tex.bank.shape == (3, 3, 32, 32) and tex.bank.dtype == torch.uint8
    a, b = tex.sample(10, gen(0)), tex.sample(10, gen(0))
    assert a.shape == (10, 3, 32, 32) and torch.equal(a, b) and 0 <= float(a.min()) <= float(a.max()) <= 1


def test_bad_anomaly_source_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nope.*model\.anomaly_source_dir"):
        FolderTextures(tmp_path / "nope", 32)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty.*model\.anomaly_source_dir.*no image files"):
        FolderTextures(empty, 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(u8_image(0)).save(bad / "ok.png")
    (bad / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg.*model\.anomaly_source_dir"):
        FolderTextures(bad, 32)


# ---------------------------------------------------------------------- runs through the framework
def test_tiny_training_run_and_checkpoint_round_trip(make_cfg, tmp_path):
    res = run(make_cfg(*TINY, out=tmp_path / "x"))
    saved = json.loads((tmp_path / "x" / "results.json").read_text())
    assert saved["status"] == "completed" and saved["model"] == "draem"
    assert saved["image_score"] == "max_pool21" and saved["pixel_map"] == "mask_prob"
    for key in DraemModule.IMAGE_SCORES:
        assert 0.0 <= saved["metrics"][f"image_auroc/{key}"] <= 1.0
    assert 0.0 <= saved["pixel_auroc"] <= 1.0 and saved["metrics"] == pytest.approx(res["metrics"])
    rows = read_scores(tmp_path / "x" / "scores.csv")
    assert len(rows) == 14 and all(0 <= float(r["max_pool21"]) <= float(r["mask_max"]) <= 1 for r in rows)
    assert len(list((tmp_path / "x" / "maps").glob("*.png"))) == 8
    ckpt_path = tmp_path / "x" / "checkpoints" / "last.ckpt"
    ckpt = ckpt_state(ckpt_path)
    assert ckpt["ebmad_model_type"] == "draem" and ckpt["global_step"] == 6
    assert dict(ckpt["lr_schedulers"][0]["milestones"]) == {4: 1, 5: 1}  # 80% / 90% of 6 steps
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.2 * 0.2)
    # evaluating the checkpoint (train=false) reproduces every score
    again = run(make_cfg(*TINY, "train=false", f"ckpt_path={ckpt_path}", out=tmp_path / "eval"))
    assert read_scores(tmp_path / "eval" / "scores.csv") == rows
    assert again["metrics"] == saved["metrics"]


def test_bad_anomaly_source_dir_fails_the_run(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="model.anomaly_source_dir"):
        run(
            make_cfg(
                *TINY, f"model.anomaly_source_dir={tmp_path / 'missing'}", "test=false", out=tmp_path / "r"
            )
        )


class SignalAtStep(pl.Callback):
    """Sends this process SIGUSR1 during optimizer step ``step``, as a preemption would: ebmad's
    PreemptionCheckpoint then writes last.ckpt at the end of that batch and stops training."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_resume_is_exact(make_cfg, tmp_path):
    """4 steps in one go == 2 steps (mid-epoch: 4 batches per epoch) + resume to 4, with the lr drop at step 3."""
    common = (*TINY, "test=false", "data.batch_size=4", "trainer.max_steps=4")
    run(make_cfg(*common, out=tmp_path / "full"))
    stop = ("+callbacks.stop._target_=test_draem.SignalAtStep", "+callbacks.stop.step=2")
    with pytest.raises(Preempted):
        run(make_cfg(*common, *stop, out=tmp_path / "part"))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert ckpt_state(part)["global_step"] == 2
    run(make_cfg(*common, f"ckpt_path={part}", out=tmp_path / "resumed"))
    a = ckpt_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = ckpt_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4 and a["epoch"] == b["epoch"]
    assert_same_training_state(a, b)
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"][0]["lr"] == opt_b["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.04)


def test_paper_experiment_composes(tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=draem_paper"])
    assert cfg.model._target_ == "ebmad.models.draem.DraemModule"
    assert cfg.data.image_size == cfg.model.image_size == 256 and cfg.data.batch_size == 8
    assert cfg.data.channels == 3 and cfg.trainer.max_epochs == 700 and cfg.trainer.max_steps == -1
    assert cfg.trainer.accelerator == "gpu" and cfg.model.schedule == "code" and cfg.model.lr == 1e-4
