"""SSAE: network shapes, corruption invariants, loss and score definitions, texture folder errors, framework runs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from ebmad.models.ssae import SSAEModule, SSAENet
from ebmad.models.ssae.corruption import StructuredCorruption
from ebmad.models.ssae.lightning_model import GaussianSmoothing
from ebmad.models.ssae.loss import restoration_loss
from ebmad.models.ssae.textures import FolderTextures
from ebmad.train import run

from conftest import assert_same_training_state, ckpt_state, read_scores

SMALL_NET = ("model.widths=[4,8]", "model.sdc_blocks=1", "model.dilations=[1,2]")


@pytest.fixture
def ssae_cfg(make_cfg):
    """conftest's make_cfg with ``model=ssae`` and a tiny network."""

    def _make(*extra: str, out):
        return make_cfg("model=ssae", *SMALL_NET, *extra, out=out)

    return _make


# ------------------------------------------------------------------ network
@pytest.mark.parametrize("skip", ["ccm", "none"])
def test_network_shapes_at_256_and_32(skip):
    torch.manual_seed(0)
    net = SSAENet(3, widths=(4, 8, 8, 16), sdc_blocks=1, dilations=(1, 2, 4), skip=skip)
    assert net(torch.rand(1, 3, 256, 256)).shape == (1, 3, 256, 256)
    assert net(torch.rand(3, 3, 32, 32)).shape == (3, 3, 32, 32)
    gray = SSAENet(1, widths=(4, 8), sdc_blocks=2, dilations=(1, 2, 4, 8, 16, 32), skip=skip)
    assert gray(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_bad_network_settings_are_named():
    with pytest.raises(ValueError, match="data.image_size=36"):
        SSAEModule(image_size=36, widths=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="model.skip"):
        SSAENet(3, widths=(4, 8), skip="concat")
    with pytest.raises(ValueError, match="model.in_channels"):
        SSAENet(2, widths=(4, 8))
    with pytest.raises(ValueError, match="model.region_min"):
        SSAEModule(image_size=32, widths=(4, 8), region_min=0.5, region_max=0.1)


# --------------------------------------------------------------- corruption
def images(n=6, c=3, size=32, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1, 0, 0), (0, 1, 0), (0, 0, 1)],
                         ids=["mixed", "texture", "elastic", "color"])  # fmt: skip
def test_corruption_changes_only_masked_pixels_and_is_seeded(weights):
    x = images()
    corr = StructuredCorruption(fill_weights=weights, opacity_min=0.5)
    y, m = corr.corrupt(x, torch.Generator().manual_seed(3))
    assert y.shape == x.shape and m.shape == (6, 32, 32) and m.dtype == torch.bool
    changed = (y != x).any(dim=1)
    assert not (changed & ~m).any(), "a pixel outside the mask changed"
    assert torch.equal(y[~m[:, None].expand_as(y)], x[~m[:, None].expand_as(x)])
    assert changed.any(dim=(1, 2)).all(), "every image should be corrupted somewhere"
    assert m.any(dim=(1, 2)).all() and float(m.float().mean()) < 0.9
    assert 0 <= float(y.min()) and float(y.max()) <= 1
    y2, m2 = corr.corrupt(x, torch.Generator().manual_seed(3))
    assert torch.equal(y, y2) and torch.equal(m, m2)
    y3, m3 = corr.corrupt(x, torch.Generator().manual_seed(4))
    assert not torch.equal(m, m3)


def test_clean_prob_leaves_images_untouched():
    x = images(n=64)
    y, m = StructuredCorruption(clean_prob=0.5).corrupt(x, torch.Generator().manual_seed(0))
    untouched = ~m.any(dim=(1, 2))
    assert 10 < int(untouched.sum()) < 54
    assert torch.equal(y[untouched], x[untouched])


def write_png(path, value, size=40, mode="RGB"):
    arr = np.full((size, size, 3), value, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def test_folder_textures_are_used_and_seeded(tmp_path):
    (tmp_path / "tex" / "sub").mkdir(parents=True)
    write_png(tmp_path / "tex" / "a.png", 255)
    write_png(tmp_path / "tex" / "sub" / "b.jpg", 255, mode="L")
    tex = FolderTextures(tmp_path / "tex", size=32, channels=3)
    assert len(tex) == 2 and tex.data.shape == (2, 3, 32, 32) and tex.data.dtype == torch.uint8
    x = torch.zeros(4, 3, 32, 32)
    corr = StructuredCorruption(fill_weights=(1, 0, 0), opacity_min=1.0, textures=tex)
    y, m = corr.corrupt(x, torch.Generator().manual_seed(0))
    inside = y[m[:, None].expand_as(y)]
    assert m.any() and torch.allclose(inside, torch.ones_like(inside), atol=1e-6)  # white textures, opaque
    assert torch.equal(y, corr.corrupt(x, torch.Generator().manual_seed(0))[0])


def test_bad_anomaly_source_dir_is_named(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        _ = SSAEModule(image_size=32, widths=(4, 8), anomaly_source_dir=str(missing)).corruption
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*contains no images"):
        _ = SSAEModule(image_size=32, widths=(4, 8), anomaly_source_dir=str(tmp_path / "empty")).corruption
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        _ = SSAEModule(image_size=32, widths=(4, 8), anomaly_source_dir=str(tmp_path / "bad")).corruption


# ----------------------------------------------------------- loss and score
def test_loss_on_a_hand_case():
    restored = torch.zeros(1, 1, 2, 2)
    clean = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
    mask = torch.tensor([[[True, False], [False, False]]])
    assert float(restoration_loss(restored, clean, mask)) == pytest.approx((1 + 4 + 9 + 0) / 4)
    assert float(restoration_loss(restored, clean, mask, masked_weight=3.0)) == pytest.approx((3 + 4 + 9) / 4)


class Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_score_map_and_image_score_on_a_hand_case():
    model = SSAEModule(in_channels=3, image_size=32, widths=(4, 8), smooth_sigma=2.0).eval()
    model.net = Zero()  # reconstruction 0 => error = mean over channels of x01^2
    x01 = torch.zeros(2, 3, 32, 32)
    x01[0, :, 10, 12] = 1.0  # one white pixel: raw error 1 there, 0 elsewhere
    x01[1, 0] = 0.5  # red channel 0.5 everywhere: error 0.25 / 3 everywhere
    images, maps = model.score(x01 * 2 - 1)
    err = maps["error"]
    assert err[0, 10, 12] == 1.0 and float(err[0].sum()) == 1.0
    assert torch.allclose(err[1], torch.full((32, 32), 0.25 / 3))
    expected = gaussian_filter(err[0].numpy().astype(np.float64), sigma=2.0, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(maps["error_smooth"][0].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(maps["error_smooth"][1], err[1])  # smoothing keeps a constant map
    assert float(images["max_smooth"][0]) == pytest.approx(expected.max(), rel=1e-5)
    assert torch.allclose(images["mean_error"], torch.tensor([1 / 1024, 0.25 / 3]))
    assert torch.equal(GaussianSmoothing(0.0)(err), err)


def test_scorer_matches_score_and_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = SSAEModule(in_channels=3, image_size=32, widths=(4, 8), sdc_blocks=1, dilations=(1, 2)).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    images, maps = model.score(x)
    scorer = model.scorer()
    with torch.no_grad():
        pmap, score = scorer(x)
    torch.testing.assert_close(pmap, maps[model.DEFAULT_PIXEL_MAP])
    torch.testing.assert_close(score, images[model.DEFAULT_IMAGE_SCORE])
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "ssae.onnx"
    torch.onnx.export(scorer, (x[:2],), str(path), input_names=["image"], output_names=["map", "score"],
                      dynamic_axes={"image": {0: "b"}, "map": {0: "b"}, "score": {0: "b"}}, dynamo=False)  # fmt: skip
    out_map, out_score = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})
    np.testing.assert_allclose(out_map, pmap.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out_score, score.numpy(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------- framework runs
def test_run_and_checkpoint_round_trip(ssae_cfg, tmp_path):
    res = run(ssae_cfg(out=tmp_path / "fit"))
    saved = json.loads((tmp_path / "fit" / "results.json").read_text())
    assert saved["status"] == "completed" and saved["model"] == "ssae" and saved["global_step"] == 6
    assert saved["image_score"] == "max_smooth" and saved["pixel_map"] == "error_smooth"
    for key in (
        "image_auroc/max_smooth",
        "image_auroc/mean_error",
        "pixel_auroc/error_smooth",
        "pixel_auroc/error",
    ):
        assert 0.0 <= saved["metrics"][key] <= 1.0
    assert len(read_scores(tmp_path / "fit" / "scores.csv")) == 14
    assert len(list((tmp_path / "fit" / "maps").glob("*.png"))) == 8
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    assert ckpt_state(ckpt)["ebmad_model_type"] == "ssae"
    again = run(ssae_cfg("train=false", f"ckpt_path={ckpt}", out=tmp_path / "eval"))
    assert read_scores(tmp_path / "fit" / "scores.csv") == read_scores(tmp_path / "eval" / "scores.csv")
    assert again["metrics"] == res["metrics"]


@pytest.mark.parametrize("batch,stop", [(8, 2), (4, 3)], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_exact(ssae_cfg, tmp_path, batch, stop):
    """4 steps in one go == `stop` steps, then resumed from last.ckpt to 4: identical weights and Adam state."""
    common = ("test=false", f"data.batch_size={batch}")
    run(ssae_cfg(*common, "trainer.max_steps=4", out=tmp_path / "full"))
    run(ssae_cfg(*common, f"trainer.max_steps={stop}", out=tmp_path / "part"))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert ckpt_state(part)["global_step"] == stop
    run(ssae_cfg(*common, "trainer.max_steps=4", f"ckpt_path={part}", out=tmp_path / "resumed"))
    a = ckpt_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = ckpt_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert_same_training_state(a, b)
