"""Dataset layouts (MVTec AD, VisA, MVTec AD 2, Folder): the same images give the same index; each bad input
is an error naming the file or setting; VisA's mask rule; the sweeps' category lists."""

import csv
import hashlib
import re
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ebmad.data import AnomalyDataModule, DatasetError, MVTecDataModule, categories, false_alarm_summary
from ebmad.data.io import load_mask
from ebmad.data.layout import LAYOUTS, Problems, build_index
from ebmad.data.synthetic import generate_category
from ebmad.data.synthetic import main as synth_main
from ebmad.train import CONF_DIR

from conftest import SMALL


def folder_opts(cdir, **kw):
    opts = dict(normal_dir=str(cdir / "normal"), normal_test_dir=str(cdir / "normal_test"),
                abnormal_dir=str(cdir / "abnormal"), mask_dir=str(cdir / "masks"))  # fmt: skip
    opts.update(kw)
    return {k: v for k, v in opts.items() if v is not None}


def layout_dm(root, layout, category="tex_a", **kw):
    """The datamodule of a synthetic category written in ``layout`` under ``root / layout``."""
    base = root / layout
    if layout == "folder":
        return AnomalyDataModule(layout="folder", category=category, **{**folder_opts(base / category), **kw})
    return AnomalyDataModule(root=str(base), category=category, layout=layout, **kw)


@pytest.fixture(scope="module")
def layouts_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    for layout in LAYOUTS:
        generate_category(root / layout, "tex_a", seed=0, layout=layout, **SMALL)
    return root


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------ equivalence


def test_every_layout_indexes_the_same_images(layouts_root):
    """Same training files, same test images with the same labels and masks (MVTec AD 2 lists bad before good)."""
    ref = layout_dm(layouts_root, "mvtec")
    ref.setup()
    want_train = [sha(p) for p in ref.index.train]
    want_test = sorted((sha(it.image), it.label, it.mask is not None) for it in ref.index.test)
    assert len(want_train) == 16 and len(want_test) == 14
    for layout in LAYOUTS[1:]:
        dm = layout_dm(layouts_root, layout)
        dm.setup()
        assert [sha(p) for p in dm.index.train] == want_train, layout
        assert sorted((sha(it.image), it.label, it.mask is not None) for it in dm.index.test) == want_test, (
            layout
        )
        assert torch.equal(dm.train_data["image"], ref.train_data["image"]), layout
        by_image = {sha(it.image): i for i, it in enumerate(dm.index.test)}
        order = torch.tensor([by_image[sha(it.image)] for it in ref.index.test])
        assert torch.equal(dm.test_data["image"][order], ref.test_data["image"]), layout
        assert torch.equal(dm.test_data["label"][order], ref.test_data["label"]), layout
        if layout != "visa":  # VisA binarizes resized masks at 0.5 (see the mask-rule tests)
            assert torch.equal(dm.test_data["mask"][order], ref.test_data["mask"]), layout
    visa = layout_dm(layouts_root, "visa", image_size=32)  # at the stored size the rules agree
    mvtec = layout_dm(layouts_root, "mvtec", image_size=32)
    assert torch.equal(visa.load_test()["mask"], mvtec.load_test()["mask"])
    assert [it.defect for it in layout_dm(layouts_root, "folder").index.test] == [
        it.defect for it in ref.index.test
    ]


def test_mvtec_datamodule_is_the_generic_one_with_the_mvtec_layout(layouts_root):
    a = MVTecDataModule(str(layouts_root / "mvtec"), "tex_a", image_size=16, val_fraction=0.25)
    b = AnomalyDataModule(
        root=str(layouts_root / "mvtec"), category="tex_a", image_size=16, val_fraction=0.25
    )
    assert isinstance(a, AnomalyDataModule) and a.layout == "mvtec"
    assert torch.equal(a.load_train()["image"], b.load_train()["image"])
    for key in ("image", "mask", "label"):
        assert torch.equal(a.val_data[key], b.val_data[key])
    with pytest.raises(ValueError, match="MVTecDataModule reads the MVTec AD layout only"):
        MVTecDataModule(str(layouts_root), "tex_a", layout="visa")


def test_mvtec_ad2_validation_images_are_the_validation_set(layouts_root):
    dm = layout_dm(layouts_root, "mvtec_ad2", image_size=16)
    train = dm.load_train()
    assert (
        len(train["image"]) == 16 and dm.has_validation and dm.val_fraction == 0
    )  # nothing taken from train
    val = dm.val_data
    assert val["label"].tolist() == [0] * 4 + [1] * 4 and val["mask"][4:].flatten(1).any(1).all()
    files = sorted((layouts_root / "mvtec_ad2" / "tex_a" / "validation" / "good").glob("*.png"))
    assert [sha(p) for p in dm.index.validation] == [sha(p) for p in files]
    assert dm.index.unlabelled["test_private_mixed"] and dm.unlabelled_images("test_private_mixed")
    with pytest.raises(DatasetError, match="no unlabelled split 'test_private'"):
        dm.unlabelled_images("test_private")
    with pytest.raises(ValueError, match=r"data.val_fraction=0.2: data.layout=mvtec_ad2 provides its own 4"):
        layout_dm(layouts_root, "mvtec_ad2", val_fraction=0.2).load_train()


def test_folder_with_normal_images_only_holds_out_a_defect_free_test_set(layouts_root):
    normal = layouts_root / "folder" / "tex_a" / "normal"
    dm = AnomalyDataModule(layout="folder", normal_dir=str(normal), normal_test_fraction=0.25, seed=3,
                           image_size=16, val_fraction=0.2)  # fmt: skip
    dm.setup()
    train, test = dm.index.train, [it.image for it in dm.index.test]
    assert len(train) == 12 and len(test) == 4 and not set(train) & set(test)
    assert sorted(train + test) == sorted(normal.glob("*.png"))
    assert not dm.has_defects and not dm.has_masks and dm.has_validation
    assert len(dm.train_data["image"]) == 12 - 2 and len(dm.val_data["image"]) == 2 * 2
    again = AnomalyDataModule(layout="folder", normal_dir=str(normal), normal_test_fraction=0.25, seed=3)
    assert [it.image for it in again.index.test] == test  # seeded: the same images every run
    summary = false_alarm_summary(torch.tensor([0.1, 0.25, 0.5, 2.0]), image_threshold=0.5)
    assert summary["n_false_alarms"] == 2 and summary["false_alarm_rate"] == 0.5  # score >= threshold
    assert "no defect AUROC" in summary["note"]
    with pytest.raises(ValueError, match="fit the thresholds"):
        false_alarm_summary([0.1], float("nan"))


def test_synth_cli_writes_each_layout(tmp_path, capsys):
    for layout in LAYOUTS:
        synth_main(["--root", str(tmp_path / layout), "--categories", "x", "y", "--size", "16", "--n-train", "2",
                    "--n-test-good", "1", "--n-test-defect", "1", "--layout", layout])  # fmt: skip
    assert (tmp_path / "visa" / "x" / "Data" / "Masks" / "Anomaly" / "001.png").is_file()
    rows = list(csv.DictReader(open(tmp_path / "visa" / "split_csv" / "1cls.csv")))
    assert {r["object"] for r in rows} == {"x", "y"} and len(rows) == 2 * (2 + 1 + 2)
    assert (
        np.asarray(Image.open(tmp_path / "visa" / "x" / "Data" / "Masks" / "Anomaly" / "001.png")).max() == 1
    )
    assert (
        tmp_path / "mvtec_ad2" / "y" / "test_public" / "ground_truth" / "bad" / "spot_000_mask.png"
    ).is_file()
    assert (tmp_path / "folder" / "x" / "masks" / "scratch" / "000_mask.png").is_file()
    assert capsys.readouterr().out.count("wrote") == 8


# ------------------------------------------------------------------------------ mask rules


def test_visa_masks_are_non_zero_and_binarized_at_half_after_resizing(tmp_path):
    img = png(tmp_path / "img.png", np.zeros((32, 32, 3)))
    arr = np.zeros((32, 32), np.uint8)
    arr[8:16, 8:16] = 1  # an 8x8 region stored as 1 (VisA's 0/1 masks)
    arr[30, 2] = 1  # one isolated pixel: a quarter of an output pixel at 16x16
    one = png(tmp_path / "m01.png", arr)
    full = png(tmp_path / "m255.png", arr * 255)
    native = load_mask(one, 32, (32, 32), img, rule="nonzero")
    assert torch.equal(native, torch.from_numpy(arr > 0))
    small = load_mask(one, 16, (32, 32), img, rule="nonzero")
    assert small.sum() == 16 and small[4:8, 4:8].all()  # the region, not grown by the isolated pixel
    assert torch.equal(small, load_mask(full, 16, (32, 32), img, rule="nonzero"))
    assert not load_mask(one, 16, (32, 32), img).any()  # MVTec's rule (> half of 255) keeps 0/1 masks empty
    with pytest.raises(ValueError, match="mask rule"):
        load_mask(one, 16, (32, 32), img, rule="any")


# ------------------------------------------------------------------------------ VisA errors


def visa_copy(layouts_root, tmp_path):
    root = tmp_path / "visa"
    shutil.copytree(layouts_root / "visa", root)
    return root, root / "split_csv" / "1cls.csv"


def edit_rows(path, fn):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = fn(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["object", "split", "label", "image", "mask"])
        w.writeheader()
        w.writerows(rows)


def visa_error(root, match, **kw):
    with pytest.raises(DatasetError, match=match):
        AnomalyDataModule(root=str(root), category="tex_a", layout="visa", image_size=16, **kw).setup()


def test_visa_csv_row_naming_a_missing_file(layouts_root, tmp_path):
    root, split = visa_copy(layouts_root, tmp_path)
    (root / "tex_a" / "Data" / "Images" / "Normal" / "0003.png").unlink()
    visa_error(root, r"1cls\.csv line 5: image file .*Normal/0003\.png does not exist")
    edit_rows(split, lambda rows: [{**r, "mask": r["mask"].replace("006.png", "999.png")} for r in rows])
    problems = Problems(strict=False)  # as the data check collects them: every problem, not the first only
    build_index("visa", root, "tex_a", problems)
    assert len(problems.messages) == 2 and "Normal/0003.png does not exist" in problems.messages[0]
    assert re.search(
        r"line 24: mask file .*Masks/Anomaly/999\.png of .*Anomaly/006\.png does not exist",
        problems.messages[1],
    )


def test_visa_mask_given_for_a_normal_image(layouts_root, tmp_path):
    root, split = visa_copy(layouts_root, tmp_path)
    edit_rows(split, lambda rows: [{**r, "mask": "tex_a/Data/Masks/Anomaly/006.png"} if i == 0 else r
                                   for i, r in enumerate(rows)])  # fmt: skip
    visa_error(root, r"line 2: normal image .*Normal/0000\.png is given a mask .*Anomaly/006\.png")


def test_visa_anomaly_without_mask_and_bad_values(layouts_root, tmp_path):
    root, split = visa_copy(layouts_root, tmp_path)
    edit_rows(split, lambda rows: [{**r, "mask": ""} if r["label"] == "anomaly" else r for r in rows])
    visa_error(root, r"line 24: anomalous test image .*Anomaly/006\.png has no mask \(empty mask column\)")
    edit_rows(split, lambda rows: [{**r, "split": "val"} for r in rows])
    visa_error(root, r"line 2: split 'val' is neither 'train' nor 'test'")


def test_visa_empty_split_missing_category_and_missing_csv(layouts_root, tmp_path):
    root, split = visa_copy(layouts_root, tmp_path)
    with pytest.raises(DatasetError, match=r"category 'tex_b' \(data.category\) has no rows .*\['tex_a'\]"):
        build_index("visa", root, "tex_b")
    edit_rows(split, lambda rows: [r for r in rows if r["split"] == "train"])
    visa_error(root, r"category 'tex_a' has no usable test rows in .*1cls\.csv: the test split is empty")
    visa_error(root, r"VisA split file .*nope\.csv \(data.split_csv\) does not exist", split_csv="nope.csv")
    split.write_text("object,split,image\n")
    visa_error(root, r"1cls\.csv lacks the column\(s\) label, mask")


def test_visa_mask_of_another_aspect_ratio(layouts_root, tmp_path):
    root, _ = visa_copy(layouts_root, tmp_path)
    png(root / "tex_a" / "Data" / "Masks" / "Anomaly" / "006.png", np.ones((32, 16)))
    visa_error(root, r"mask .*Anomaly/006\.png is 16x32 but its image .*Anomaly/006\.png is 32x32")


# ------------------------------------------------------------------------------ MVTec AD 2 errors


def test_mvtec_ad2_errors_name_the_folder_or_file(layouts_root, tmp_path):
    root = tmp_path / "ad2"
    shutil.copytree(layouts_root / "mvtec_ad2", root)
    cdir = root / "tex_a"
    (cdir / "test_public" / "bad" / "spot_001.png").unlink()
    with pytest.raises(DatasetError, match=r"mask .*ground_truth/bad/spot_001_mask\.png has no image"):
        build_index("mvtec_ad2", root, "tex_a")
    (cdir / "test_public" / "ground_truth" / "bad" / "spot_001_mask.png").unlink()
    (cdir / "test_public" / "ground_truth" / "bad" / "spot_002_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"defective test image .*bad/spot_002\.png has no mask"):
        build_index("mvtec_ad2", root, "tex_a")
    shutil.rmtree(cdir / "validation" / "good")
    (cdir / "validation" / "good").mkdir()
    with pytest.raises(DatasetError, match=r"validation folder .*tex_a/validation/good contains no images"):
        build_index("mvtec_ad2", root, "tex_a")


# ------------------------------------------------------------------------------ Folder errors


def test_folder_masks_match_by_relative_path_and_stem_not_sort_order(tmp_path):
    normal = tmp_path / "normal"
    for i in range(3):
        png(normal / f"{i}.png", np.zeros((8, 8)))
    png(tmp_path / "bad" / "b" / "x.png", np.zeros((8, 8)))
    png(tmp_path / "bad" / "a" / "x.jpg", np.zeros((8, 8)))
    png(tmp_path / "bad" / "a" / "deep" / "y.png", np.zeros((8, 8)))
    left, right, top = np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))
    left[:, :4], right[:, 4:], top[:4] = 255, 255, 255
    png(tmp_path / "masks" / "b" / "x.bmp", left)  # same stem, other format
    png(tmp_path / "masks" / "a" / "x_mask.png", right)
    png(tmp_path / "masks" / "a" / "deep" / "y.png", top)
    dm = AnomalyDataModule(root=str(tmp_path), layout="folder", normal_dir="normal", abnormal_dir="bad",
                           mask_dir="masks", normal_test_fraction=0.34, image_size=8)  # fmt: skip
    test = dm.load_test()
    by_name = {
        it.image.relative_to(tmp_path / "bad").as_posix(): i for i, it in enumerate(dm.test_meta) if it.label
    }
    assert [it.defect for it in dm.test_meta] == ["a", "a", "b", "good"]
    assert test["mask"][by_name["b/x.png"]][:, :4].all() and not test["mask"][by_name["b/x.png"]][:, 4:].any()
    assert test["mask"][by_name["a/x.jpg"]][:, 4:].all() and not test["mask"][by_name["a/x.jpg"]][:, :4].any()
    assert (
        test["mask"][by_name["a/deep/y.png"]][:4].all()
        and not test["mask"][by_name["a/deep/y.png"]][4:].any()
    )


def folder_tree(tmp_path):
    for i in range(3):
        png(tmp_path / "normal" / f"{i}.png", np.zeros((8, 8)))
    png(tmp_path / "bad" / "crack" / "x.png", np.zeros((8, 8)))
    png(tmp_path / "masks" / "crack" / "x_mask.png", np.full((8, 8), 255))
    return dict(root=str(tmp_path), layout="folder", normal_dir="normal", abnormal_dir="bad", mask_dir="masks",
                normal_test_fraction=0.34)  # fmt: skip


@pytest.mark.parametrize("case,match", [
    ("no_mask", r"defective image .*bad/crack/y\.png has no mask in data.mask_dir=.*; expected .*crack/y\.png"),
    ("orphan_mask", r"mask .*masks/crack/z\.png has no image in data.abnormal_dir="),
    ("same_stem", r"images .*bad/crack/x\.jpg and .*bad/crack/x\.png have one stem"),
    ("two_masks", r"masks .*crack/x\.png and .*crack/x_mask\.png have one stem"),
    ("empty", r"no defect-free test images: set data.normal_test_dir or data.normal_test_fraction > 0"),
    ("no_normal_dir", r"data=folder needs data.normal_dir"),
    ("missing_dir", r"data.abnormal_dir=nope: folder .*nope does not exist"),
])  # fmt: skip
def test_folder_bad_inputs_are_named(tmp_path, case, match):
    opts = folder_tree(tmp_path)
    if case == "no_mask":
        png(tmp_path / "bad" / "crack" / "y.png", np.zeros((8, 8)))
    elif case == "orphan_mask":
        png(tmp_path / "masks" / "crack" / "z.png", np.zeros((8, 8)))
    elif case == "same_stem":
        png(tmp_path / "bad" / "crack" / "x.jpg", np.zeros((8, 8)))
    elif case == "two_masks":
        png(tmp_path / "masks" / "crack" / "x.png", np.zeros((8, 8)))
    elif case == "empty":
        opts.update(abnormal_dir=None, mask_dir=None, normal_test_fraction=0.0)
    elif case == "no_normal_dir":
        opts.update(normal_dir=None)
    elif case == "missing_dir":
        opts.update(abnormal_dir="nope")
    with pytest.raises(DatasetError, match=match):
        AnomalyDataModule(**opts, image_size=8).setup()


def test_unknown_layout_and_setting_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"data.layout='coco' is not a dataset layout"):
        AnomalyDataModule(root=str(tmp_path), category="x", layout="coco")
    with pytest.raises(
        ValueError, match=r"data.normal_dir is not a setting of data.layout=mvtec \(options of data=folder\)"
    ):
        AnomalyDataModule(root=str(tmp_path), category="x", normal_dir="a")


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("layout", ["visa", "mvtec_ad2"])
def test_sweeps_take_their_categories_from_the_layout(layout):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[f"experiment={layout}_sweep"])
    assert cfg.data.layout == layout and cfg.data._target_ == "ebmad.data.AnomalyDataModule"
    assert cfg.hydra.sweeper.params["data.category"].split(",") == categories(layout)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.data.image_size == 128  # the paper recipe
    assert len(categories("visa")) == 12 and len(categories("mvtec_ad2")) == 8


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_data_config_instantiates_its_layout(layout, layouts_root):
    import hydra

    extra = {"visa": [f"data.root={layouts_root / 'visa'}"], "mvtec": [f"data.root={layouts_root / 'mvtec'}"],
             "mvtec_ad2": [f"data.root={layouts_root / 'mvtec_ad2'}"],
             "folder": [f"data.{k}={v}" for k, v in folder_opts(layouts_root / "folder" / "tex_a").items()]}  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"data={layout}", "data.category=tex_a", *extra[layout]]
        )
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.layout == layout and len(dm.index.train) == 16 and len(dm.index.test) == 14


@pytest.mark.parametrize("layout,test_dir", [("mvtec", "test"), ("mvtec_ad2", "test_public")])
def test_a_category_without_test_images_trains_when_the_run_does_not_test(
    layouts_root, tmp_path, layout, test_dir
):
    """test=false: the test split's problems are kept and only raised if the test split is read."""
    root = tmp_path / layout
    shutil.copytree(layouts_root / layout, root)
    shutil.rmtree(root / "tex_a" / test_dir)
    with pytest.raises(DatasetError, match=f"{test_dir} does not exist"):
        _ = AnomalyDataModule(
            root=str(root), category="tex_a", layout=layout
        ).index  # testing: an error at once
    dm = AnomalyDataModule(root=str(root), category="tex_a", layout=layout, batch_size=4)
    dm.test_needed = False
    assert len(dm.index.train) == SMALL["n_train"] and dm.index.test == []
    assert dm.load_train()["image"].shape[0] == SMALL["n_train"]
    with pytest.raises(DatasetError, match=f"{test_dir} does not exist"):
        dm.load_test()
