"""ONNX export: the EBM's explicit backward network against autograd, onnxruntime against PyTorch."""

import re
import types

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from ebmad.data.io import load_image
from ebmad.deploy.onnx import load_module, onnx_session
from ebmad.export import export
from ebmad.models import model_class
from ebmad.models.ebm.export import EBMScorer
from ebmad.models.ebm.network import EnergyNet
from ebmad.models.ebm.scoring import compute_scores, energy_and_grad
from ebmad.predict import predict
from ebmad.train import CONF_DIR, run

from conftest import compose_cfg, tiny_overrides

pytest.importorskip("onnxruntime")

# tiny networks per model type (one step is enough for parity); lr 1e-3 gives the 6-step EBM gradient maps that vary across images (with
# lr 1e-4 |mu|/sigma reaches ~120 and float32 cancellation in (g - mu) / sigma alone is ~6e-5)
TINY = {
    "ebm": ["model.lr=1e-3"],
    "draem": ["model=draem", "model.recon_base_width=8", "model.disc_base_width=8", "trainer.max_steps=1"],
    "ssae": [
        "model=ssae",
        "model.widths=[4,8]",
        "model.sdc_blocks=1",
        "model.dilations=[1,2]",
        "trainer.max_steps=1",
    ],
}
EXTRA = {"ebm": ["energy"], "draem": [], "ssae": []}


def cfg_of(name, **kw):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[f"{k}={v}" for k, v in kw.items()])


# ---------------------------------------------------------------- explicit backward network
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 16), (3, 8)])
def test_explicit_backward_equals_autograd_in_float64(channels, size):
    torch.manual_seed(0)
    net = EnergyNet(channels, size, base=8).double()
    mean = torch.randn(channels, size, size, dtype=torch.float64) * 1e-2
    std = torch.rand(channels, size, size, dtype=torch.float64) * 1e-2 + 1e-3
    scorer = EBMScorer(net, mean, std)
    x = torch.rand(4, channels, size, size, dtype=torch.float64) * 2 - 1
    pre = net.body[0](x)
    assert (pre > 0).any() and (pre < 0).any()  # both branches of ELU' are exercised
    energy, grad = energy_and_grad(net, x)
    e2, g2 = scorer.energy_and_grad(x)
    assert torch.allclose(e2, energy, rtol=1e-12, atol=0)
    assert torch.allclose(g2, grad, rtol=1e-10, atol=1e-14 * float(grad.abs().max()))
    images, maps = compute_scores(energy, grad, mean, std)
    pixel_map, image_score, e3 = scorer(x)
    assert torch.allclose(pixel_map, maps["a_std_l2"], rtol=1e-10, atol=0)
    assert torch.allclose(image_score, images["A_std_l2"], rtol=1e-10, atol=0)
    assert torch.equal(e3, e2)


def test_explicit_backward_restores_odd_sizes_with_output_padding():
    """A 9x9 input: the 4x4/s2/p1 conv gives 4x4 and its transpose needs output_padding=1 to give 9x9."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.ELU(), nn.Conv2d(4, 5, 4, 2, 1), nn.ELU(),
                         nn.Conv2d(5, 1, 4, 1, 0)).double()  # fmt: skip
    net = types.SimpleNamespace(body=body, image_size=9)
    scorer = EBMScorer(net, torch.zeros(2, 9, 9), torch.ones(2, 9, 9))
    assert scorer.output_padding == [0, 1, 0]
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    _, grad = energy_and_grad(lambda t: body(t).flatten(1).squeeze(1), x)
    assert torch.allclose(scorer.energy_and_grad(x)[1], grad, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- ONNX parity per model type
@pytest.fixture(scope="module", params=sorted(TINY))
def trained(request, tmp_path_factory, synth_root):
    """(model type, checkpoint) of a tiny run; skipped while the model type is not in the tree yet."""
    name = request.param
    try:
        model_class(name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"model type {name} is not available: {exc}")
    out = tmp_path_factory.mktemp(f"fit_{name}")
    base = [o for o in tiny_overrides(synth_root) if name == "ebm" or not o.startswith("model.")]
    run(compose_cfg(out, [*base, "logger=none", "test=false", *TINY[name]]))
    return name, out / "checkpoints" / "last.ckpt"


def test_onnx_matches_pytorch_at_batch_1_and_5(trained, synth_root, tmp_path):
    name, ckpt = trained
    path = export(cfg_of("export", ckpt_path=ckpt, output=tmp_path / "m.onnx", verify=False))
    module = load_module(ckpt)
    session = onnx_session(path)
    inputs = session.get_inputs()
    assert len(inputs) == 1 and inputs[0].name == "image" and isinstance(inputs[0].shape[0], str)
    assert [o.name for o in session.get_outputs()] == ["pixel_map", "image_score", *EXTRA[name]]
    meta = session.get_modelmeta().custom_metadata_map
    assert (
        meta["ebmad_model_type"] == name and int(meta["image_size"]) == 32 and int(meta["in_channels"]) == 3
    )
    assert meta["image_score"] == module.DEFAULT_IMAGE_SCORE and meta["pixel_map"] == module.DEFAULT_PIXEL_MAP
    files = sorted((synth_root / "tex_a" / "test").glob("*/*.png"))[:5]
    x = torch.stack([load_image(f, 32, 3)[0] for f in files])
    for batch in (1, 5):
        images, maps = module.score(x[:batch])
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x[:batch].numpy()}),
                       strict=True))  # fmt: skip
        ref_map, ref_score = (
            maps[module.DEFAULT_PIXEL_MAP].detach(),
            images[module.DEFAULT_IMAGE_SCORE].detach(),
        )
        assert got["pixel_map"].shape == (batch, 32, 32) and got["image_score"].shape == (batch,)
        np.testing.assert_allclose(got["pixel_map"], ref_map.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["image_score"], ref_score.numpy(), rtol=0, atol=1e-4)
        if name == "ebm":  # energies are O(100) after lr 1e-3: float32 resolution, relative
            np.testing.assert_allclose(got["energy"], images["energy"].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", ["ebm"], indirect=True)
def test_predict_with_onnx_backend_equals_torch_backend_and_reads_thresholds(trained, synth_root, tmp_path):
    _, ckpt = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["state_dict"]["image_threshold"] = torch.tensor(60.0)
    state["state_dict"]["pixel_threshold"] = torch.tensor(2.0)
    torch.save(state, tmp_path / "thr.ckpt")
    onnx_path = export(cfg_of("export", ckpt_path=tmp_path / "thr.ckpt", output=tmp_path / "m.onnx"))
    glob_input = f"'{synth_root}/tex_a/test/*/*.png'"
    common = {"input": glob_input, "progress_bar": "false", "batch_size": 4}
    by_torch = predict(cfg_of("predict", ckpt_path=tmp_path / "thr.ckpt", output=tmp_path / "t", **common))
    by_onnx = predict(cfg_of("predict", backend="onnx", onnx_path=onnx_path, output=tmp_path / "o", **common))
    assert by_onnx["image_threshold"] == 60.0 and by_onnx["pixel_threshold"] == 2.0
    assert by_onnx["scored"] == by_torch["scored"] == 14 and by_onnx["device"] == "cpu (onnxruntime)"
    rows = [(tmp_path / d / "predictions.csv").read_text().splitlines()[1:] for d in ("t", "o")]
    for a, b in zip(*rows, strict=True):
        pa, sa, *_ = a.split(",")
        pb, sb, *_ = b.split(",")
        assert pa == pb and float(sa) == pytest.approx(float(sb), abs=1e-4)


@pytest.mark.parametrize("trained", ["ebm"], indirect=True)
def test_export_refuses_a_checkpoint_without_statistics(trained, tmp_path):
    _, ckpt = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["state_dict"]["stats_count"] = torch.tensor(0.0, dtype=torch.float64)
    torch.save(state, tmp_path / "raw.ckpt")
    with pytest.raises(
        ValueError, match=re.escape(str(tmp_path / "raw.ckpt")) + ".*no fitted scoring statistics"
    ):
        export(cfg_of("export", ckpt_path=tmp_path / "raw.ckpt", output=tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()
