import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from ebmad.data import DatasetError, MVTecDataModule
from ebmad.data.loader import DeviceBatchLoader
from ebmad.data.synthetic import DEFECTS, generate_category
from ebmad.data.synthetic import main as synth_main


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_generator_is_deterministic_and_has_mvtec_layout(tmp_path):
    a = generate_category(tmp_path / "a", "tex", seed=3, size=32, n_train=4, n_test_good=2, n_test_defect=2)
    b = generate_category(tmp_path / "b", "tex", seed=3, size=32, n_train=4, n_test_good=2, n_test_defect=2)
    c = generate_category(tmp_path / "c", "tex", seed=4, size=32, n_train=4, n_test_good=2, n_test_defect=2)
    assert digest(a) == digest(b) != digest(c)
    assert len(list((a / "train" / "good").glob("*.png"))) == 4
    for d in DEFECTS:
        imgs = sorted((a / "test" / d).glob("*.png"))
        assert len(imgs) == 2
        for img in imgs:
            mask = np.asarray(Image.open(a / "ground_truth" / d / f"{img.stem}_mask.png"))
            assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255  # every defect is planted


def test_synthetic_cli(tmp_path, capsys):
    synth_main(["--root", str(tmp_path), "--categories", "x", "y", "--size", "16", "--n-train", "2",
                "--n-test-good", "1", "--n-test-defect", "1"])  # fmt: skip
    assert (tmp_path / "x" / "train" / "good" / "001.png").is_file()
    assert (tmp_path / "y" / "ground_truth" / "spot" / "000_mask.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_datamodule_decodes_once_into_tensors(synth_root):
    dm = MVTecDataModule(str(synth_root), "tex_a", image_size=32, batch_size=8, test_batch_size=5)
    dm.setup()
    train, test = dm.train_data, dm.test_data
    assert train["image"].shape == (16, 3, 32, 32) and train["image"].dtype == torch.float32
    assert -1.0 <= float(train["image"].min()) and float(train["image"].max()) <= 1.0
    assert test["image"].shape == (14, 3, 32, 32) and test["mask"].shape == (14, 32, 32)
    assert test["label"].sum() == 8  # 2 defect types x 4
    good = test["label"] == 0
    assert not test["mask"][good].any() and all(m.any() for m in test["mask"][~good])
    assert {it.defect for it in dm.test_meta} == {"good", "spot", "scratch"}
    batches = list(dm.test_dataloader())
    assert [len(b["image"]) for b in batches] == [5, 5, 4]
    assert len(list(dm.train_dataloader())) == 2


def test_masks_use_nearest_neighbour(synth_root):
    dm = MVTecDataModule(str(synth_root), "tex_a", image_size=16)
    m = dm.load_test()["mask"]
    assert m.dtype == torch.bool  # binary after resizing


def test_grayscale_category_is_detected(tmp_path):
    root = tmp_path / "gray"
    for sub in ("train/good", "test/good"):
        (root / "cat" / sub).mkdir(parents=True)
        Image.fromarray(np.full((20, 20), 128, np.uint8)).save(root / "cat" / sub / "000.png")
    dm = MVTecDataModule(str(root), "cat", image_size=16)
    assert dm.num_channels == 1
    assert dm.load_train()["image"].shape == (1, 1, 16, 16)


def test_loader_shards_reshuffles_and_resumes_mid_epoch():
    data = {"x": torch.arange(10)}
    epoch = [0]
    full = DeviceBatchLoader(data, 2, shuffle=True, drop_last=True, seed=1, epoch_fn=lambda: epoch[0])
    e0 = torch.cat([b["x"] for b in full])
    assert sorted(e0.tolist()) == list(range(10))
    epoch[0] = 1
    assert not torch.equal(torch.cat([b["x"] for b in full]), e0)  # new order each epoch
    epoch[0] = 0
    # stop after 2 batches, restore into a fresh loader: it yields exactly the remaining batches
    it = iter(full)
    seen = [next(it)["x"], next(it)["x"]]
    state = full.state_dict()
    fresh = DeviceBatchLoader(data, 2, shuffle=True, drop_last=True, seed=1, epoch_fn=lambda: epoch[0])
    fresh.load_state_dict(state)
    assert torch.equal(torch.cat(seen + [b["x"] for b in fresh]), e0)
    # two ranks see disjoint halves
    r0 = DeviceBatchLoader(data, 10, rank=0, world_size=2)
    r1 = DeviceBatchLoader(data, 10, rank=1, world_size=2)
    assert sorted(next(iter(r0))["x"].tolist() + next(iter(r1))["x"].tolist()) == list(range(10))


# ----------------------------------------------------------------------------- bad input


def make_tree(root, n_train=2, defect=True, mask=True, mask_size=(20, 20)):
    cat = root / "cat"
    for sub in ("train/good", "test/good") + (("test/crack",) if defect else ()):
        (cat / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(cat / "train" / "good" / f"{i:03d}.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(cat / "test" / "good" / "000.png")
    if defect:
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(cat / "test" / "crack" / "000.png")
        if mask:
            (cat / "ground_truth" / "crack").mkdir(parents=True)
            Image.fromarray(np.zeros(mask_size[::-1], np.uint8)).save(
                cat / "ground_truth" / "crack" / "000_mask.png"
            )
    return cat


def dm_for(root, **kw):
    return MVTecDataModule(str(root), "cat", image_size=16, batch_size=1, **kw)


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset root .*nowhere.*data\.root"):
        dm_for(tmp_path / "nowhere").setup()


def test_missing_category_names_it_and_lists_what_exists(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(DatasetError, match=r"category 'cable'.*\['cat'\]"):
        MVTecDataModule(str(tmp_path), "cable").setup()


def test_empty_train_folder(tmp_path):
    make_tree(tmp_path, n_train=0)
    with pytest.raises(DatasetError, match=r"train/good contains no images"):
        dm_for(tmp_path).setup("fit")


def test_unreadable_image_names_the_file(tmp_path):
    cat = make_tree(tmp_path)
    bad = cat / "train" / "good" / "001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image file .*001\.png"):
        dm_for(tmp_path).setup("fit")


def test_defective_image_without_mask(tmp_path):
    make_tree(tmp_path, mask=False)
    with pytest.raises(DatasetError, match=r"test/crack/000\.png has no mask; expected .*000_mask\.png"):
        dm_for(tmp_path).setup("test")


def test_mask_size_mismatch(tmp_path):
    make_tree(tmp_path, mask_size=(10, 20))
    with pytest.raises(
        DatasetError, match=r"mask .*000_mask\.png is 10x20 but its image .*000\.png is 20x20"
    ):
        dm_for(tmp_path).setup("test")


def test_batch_larger_than_train_set(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(DatasetError, match="data.batch_size=4 exceeds the 2 training images"):
        MVTecDataModule(str(tmp_path), "cat", image_size=16, batch_size=4).train_dataloader()


@pytest.mark.parametrize("kw,match", [({"image_size": 4}, "data.image_size"), ({"channels": 2}, "data.channels"),
                                      ({"batch_size": 0}, "data.batch_size")])  # fmt: skip
def test_invalid_data_settings(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        MVTecDataModule(str(tmp_path), "cat", **kw)
