"""Pretrained backbone, PatchCore and PaDiM: weights, hand-checked scores, leave-out, checkpoints, ONNX, runs."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ebmad.data.loader import DeviceBatchLoader
from ebmad.models.backbones import Backbone, ImageNetClassifier, PatchFeatures, packaged_weights
from ebmad.models.padim import PadimModule
from ebmad.models.padim.network import GaussianSums
from ebmad.models.patchcore import PatchCoreModule
from ebmad.models.patchcore.memory import greedy_coreset, nearest
from ebmad.reliability.checkpointing import load_module_checkpoint, save_module_checkpoint
from ebmad.train import run

from conftest import read_scores

# ImageNet class indices (the standard 1000-class order)
EGYPTIAN_CAT, TIGER_CAT, TABBY = 285, 282, 281
ESPRESSO, CUP = 967, 968
MISSILE, PROJECTILE, SPACE_SHUTTLE = 657, 744, 812


def photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image sample photo, resized, as (1, 3, size, size) in [-1, 1]."""
    data = pytest.importorskip("skimage.data")
    img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


# ------------------------------------------------------------------ backbone
def test_backbone_classifies_sample_photos_as_imagenet_says():
    """A wrong key mapping, channel order or normalization would not give these top classes."""
    net = ImageNetClassifier("efficientnet_lite0")
    with torch.no_grad():
        top = {n: net(photo(n)).softmax(1)[0].topk(3) for n in ("chelsea", "coffee", "rocket")}
    cat = top["chelsea"].indices.tolist()
    assert cat[0] == EGYPTIAN_CAT and set(cat) == {EGYPTIAN_CAT, TIGER_CAT, TABBY}
    assert float(top["chelsea"].values[0]) > 0.5
    assert top["coffee"].indices.tolist()[:2] == [ESPRESSO, CUP]
    assert top["rocket"].indices.tolist()[0] == MISSILE and PROJECTILE in top["rocket"].indices.tolist()


def test_backbone_is_frozen_any_size_grey_and_passes_input_gradients():
    bb = Backbone("efficientnet_lite0", ("stage3", "stage5"))
    bb.train()
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    x = (torch.rand(2, 3, 100, 130) * 2 - 1).requires_grad_(True)
    out = bb(x)
    assert out["stage3"].shape == (2, 40, 13, 17) and out["stage5"].shape == (2, 112, 7, 9)
    out["stage5"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grey = torch.rand(1, 1, 64, 64) * 2 - 1
    torch.testing.assert_close(bb(grey)["stage3"], bb(grey.expand(-1, 3, -1, -1))["stage3"])
    f = PatchFeatures(bb)
    assert f(x).shape == (2, 152, 13, 17) and f.grid(224) == 28


def test_backbone_weights_file_is_used_and_unsafe_files_are_refused(tmp_path):
    state = torch.load(packaged_weights("efficientnet_lite0"), weights_only=True)
    state = {k: v * 0.5 if k == "_conv_stem.weight" else v for k, v in state.items()}
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    mine = Backbone("efficientnet_lite0", ("stage3",), weights=str(path))
    assert torch.equal(mine.stem[0].weight, state["_conv_stem.weight"])
    assert not torch.allclose(mine(x)["stage3"], Backbone("efficientnet_lite0", ("stage3",))(x)["stage3"])

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(ValueError, match="backbone_weights=.*evil.pth"):
        Backbone("efficientnet_lite0", ("stage3",), weights=str(bad))
    with pytest.raises(ValueError, match="model.layers"):
        Backbone("efficientnet_lite0", ("stage9",))
    with pytest.raises(ValueError, match="model.backbone"):
        Backbone("resnet50", ("stage3",))


# ------------------------------------------------------------------ memory bank
def brute_force_greedy(x: torch.Tensor, n: int, start: int) -> list[int]:
    d = torch.cdist(x.double(), x.double())
    chosen = [start]
    while len(chosen) < n:
        chosen.append(int(d[:, chosen].min(dim=1).values.argmax()))
    return chosen


@pytest.mark.parametrize("projection", [None, 4])
def test_greedy_coreset_equals_brute_force(projection):
    x = torch.randn(80, 12, generator=torch.Generator().manual_seed(1))
    got = greedy_coreset(x, 15, projection, seed=3).tolist()
    g = torch.Generator().manual_seed(3)  # the same draws as greedy_coreset: projection, then start
    z = x
    if projection is not None:
        z = x @ (torch.randn(12, projection, generator=g) / projection**0.5)
    start = int(torch.randint(len(x), (1,), generator=g))
    assert got == brute_force_greedy(z, 15, start)
    assert len(set(got)) == 15


def test_nearest_with_owners_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(30, 5, generator=g), torch.randn(50, 5, generator=g)
    q_owner, b_owner = torch.randint(0, 4, (30,), generator=g), torch.randint(0, 4, (50,), generator=g)
    d, i = nearest(q, bank, 3, q_owner, b_owner)
    full = torch.cdist(q.double(), bank.double())
    full[q_owner[:, None] == b_owner[None]] = float("inf")
    ref_d, ref_i = full.topk(3, dim=1, largest=False)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ hand computations
def test_patchcore_image_score_equals_the_papers_formula():
    model = PatchCoreModule(image_size=32, num_neighbors=3, smooth_sigma=0)
    net = model.net
    g = torch.Generator().manual_seed(0)
    net.memory_bank = torch.randn(6, net.features.dim, generator=g)
    net.bank_source = torch.arange(6)
    feats = torch.randn(2, 4, net.features.dim, generator=g)
    dist, idx = net.patch_scores(feats)
    score, s_star = net.image_scores(feats, dist, idx)
    bank = net.memory_bank.double().numpy()
    for b in range(2):
        f = feats[b].double().numpy()
        d = np.linalg.norm(f[:, None] - bank[None], axis=2)  # (patches, bank)
        j = d.min(1).argmax()
        m = d[j].argmin()
        s = d[j, m]
        support = np.argsort(np.linalg.norm(bank - bank[m], axis=1))[:3]  # N_b(m*), m* included
        w = 1 - np.exp(s) / np.exp(d[j, support]).sum()
        assert float(s_star[b]) == pytest.approx(s, rel=1e-5)
        assert float(score[b]) == pytest.approx(w * s, rel=1e-5)


def test_padim_mahalanobis_map_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 3, 4, generator=g)  # 7 images, 3 positions, 4 channels
    sums = GaussianSums(3, 4, torch.device("cpu"))
    sums.add(emb[:3])
    sums.add(emb[3:])
    mean, inv = sums.mean_and_inverse(0.01)
    model = PadimModule(image_size=32, n_features=4, smooth_sigma=0)
    test = torch.randn(2, 3, 4, generator=g)
    got = model.net.distances(test, mean, inv)
    e = emb.double().numpy()
    for p in range(3):
        cov = np.cov(e[:, p, :], rowvar=False, ddof=1) + 0.01 * np.eye(4)
        for b in range(2):
            delta = test[b, p].double().numpy() - e[:, p, :].mean(0)
            assert float(got[b, p]) == pytest.approx(np.sqrt(delta @ np.linalg.inv(cov) @ delta), rel=1e-4)


# ------------------------------------------------------------------ fitted on tiny data
def tiny_images(n: int = 5, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def loader(images: torch.Tensor, batch: int = 2) -> DeviceBatchLoader:
    return DeviceBatchLoader({"image": images}, batch)


MODELS = {
    # a coreset of half the patches: the leave-out refit chooses it again without the image
    "patchcore": lambda **kw: PatchCoreModule(image_size=32, coreset_ratio=0.5, leave_out_folds=8, **kw),
    # 4 channels and 8 images: well-conditioned covariances (otherwise epsilon I dominates and float32
    # rounding of the features is amplified beyond the tolerance)
    "padim": lambda **kw: PadimModule(image_size=32, n_features=4, leave_out_folds=8, **kw),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_leave_out_scores_equal_a_refit_without_the_image(kind):
    images = tiny_images(8)
    model = MODELS[kind]().eval()
    model.fit_statistics(loader(images))
    left_out = model.leave_out_scores(loader(images))
    for i in range(len(images)):
        other = MODELS[kind]().eval()
        other.fit_statistics(loader(torch.cat([images[:i], images[i + 1 :]])))
        ref = other.score(images[i : i + 1])[0][other.DEFAULT_IMAGE_SCORE]
        assert float(left_out[i]) == pytest.approx(float(ref), rel=1e-4), i


def test_patchcore_leave_out_folds_equal_refits_without_the_fold():
    """4 folds of 8 images: each image's score equals a PatchCore fitted (coreset included) on the other 6."""
    images = tiny_images(8)
    model = PatchCoreModule(image_size=32, coreset_ratio=0.3, leave_out_folds=4).eval()
    model.fit_statistics(loader(images))
    bank = model.net.memory_bank.clone()
    left_out = model.leave_out_scores(loader(images))
    assert torch.equal(model.net.memory_bank, bank)  # the fitted bank is restored
    for lo in range(0, 8, 2):
        other = PatchCoreModule(image_size=32, coreset_ratio=0.3).eval()
        other.fit_statistics(loader(torch.cat([images[:lo], images[lo + 2 :]])))
        ref = other.score(images[lo : lo + 2])[0]["reweighted"]
        assert left_out[lo : lo + 2].tolist() == pytest.approx(ref.tolist(), rel=1e-4), lo


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_checkpoint_round_trip_gives_identical_scores(kind, tmp_path):
    images, test = tiny_images(5), tiny_images(3, seed=1)
    model = MODELS[kind]().eval()
    model.fit_statistics(loader(images))
    save_module_checkpoint(model, tmp_path / "m.ckpt")
    again = load_module_checkpoint(type(model), tmp_path / "m.ckpt").eval()
    (s1, m1), (s2, m2) = model.score(test), again.score(test)
    for k in s1:
        assert torch.equal(s1[k], s2[k])
    for k in m1:
        assert torch.equal(m1[k], m2[k])


def test_own_backbone_weights_travel_in_the_checkpoint(tmp_path):
    state = torch.load(packaged_weights("efficientnet_lite0"), weights_only=True)
    path = tmp_path / "mine.pth"
    torch.save({k: v * 0.9 if k.endswith("_bn0.weight") else v for k, v in state.items()}, path)
    model = PatchCoreModule(image_size=32, coreset_ratio=1.0, backbone_weights=str(path)).eval()
    model.fit_statistics(loader(tiny_images(3)))
    save_module_checkpoint(model, tmp_path / "m.ckpt")
    path.unlink()  # the checkpoint holds the weights: the file is not needed any more
    again = load_module_checkpoint(PatchCoreModule, tmp_path / "m.ckpt").eval()
    x = tiny_images(2, seed=4)
    assert torch.equal(model.score(x)[0]["reweighted"], again.score(x)[0]["reweighted"])


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_onnx_export_equals_torch(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    from ebmad.deploy.onnx import export_onnx, verify_onnx

    model = MODELS[kind]().eval()
    model.fit_statistics(loader(tiny_images(4)))
    export_onnx(model, tmp_path / "m.onnx")
    assert verify_onnx(model, tmp_path / "m.onnx", batch=3) < 1e-3


# ------------------------------------------------------------------ framework runs
@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_end_to_end_run_on_the_synthetic_category(kind, make_cfg, tmp_path):
    out = tmp_path / kind
    res = run(make_cfg(f"model={kind}", out=out))  # 32 px
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "completed" and saved["model"] == kind
    assert res["metrics"]["image_auroc"] > 0.8  # the synthetic defects are obvious to pretrained features
    assert len(read_scores(out / "scores.csv")) == 14  # 6 good + 4 x 2 defect kinds (conftest SMALL)
    ckpt = out / "checkpoints" / "last.ckpt"
    again = run(make_cfg(f"model={kind}", "train=false", f"ckpt_path={ckpt}", out=tmp_path / "eval"))
    assert read_scores(out / "scores.csv") == read_scores(tmp_path / "eval" / "scores.csv")
    assert again["metrics"] == res["metrics"]
