"""Every kind of image file a user may drop into a dataset is handled or refused naming the file.

All images are written here, tiny; expected values are computed by hand from what was written.
"""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ebmad.data import DatasetError, MVTecDataModule
from ebmad.data.io import list_images, load_image, load_mask


def unit(v):
    """An 8-bit value as the loader scales it: [0, 255] -> [-1, 1]."""
    return np.float32(v) / np.float32(127.5) - np.float32(1.0)


def save(path, arr, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr, mode)
    img.save(path, **kw)
    return path


def category(root, train, test_good=(), defects=None, masks=None):
    """<root>/cat with the given {name: PIL image or array} per folder."""
    cat = root / "cat"
    for folder, files in (("train/good", train), ("test/good", test_good), *((defects or {}).items())):
        (cat / folder).mkdir(parents=True, exist_ok=True)
        for name, arr in dict(files).items():
            save(cat / folder / name, arr)
    for folder, files in (masks or {}).items():
        for name, arr in files.items():
            save(cat / "ground_truth" / folder / name, arr)
    return cat


def rgb(h, w, color):
    return np.broadcast_to(np.array(color, np.uint8), (h, w, 3)).copy()


# --------------------------------------------------------------------------- colour modes


def test_rgba_is_composited_on_black(tmp_path):
    arr = rgb(4, 4, (200, 100, 50))
    alpha = np.full((4, 4), 255, np.uint8)
    alpha[:, 2] = 51  # 20 % opaque: 200*0.2=40, 100*0.2=20, 50*0.2=10
    alpha[:, 3] = 0
    path = save(tmp_path / "a.png", np.dstack([arr, alpha]), "RGBA")
    x, size = load_image(path, 4, 3)
    assert size == (4, 4) and x.shape == (3, 4, 4)
    for col, expect in ((0, (200, 100, 50)), (2, (40, 20, 10)), (3, (0, 0, 0))):
        assert torch.allclose(x[:, :, col], torch.tensor(unit(expect))[:, None].expand(3, 4))


def test_gray_with_alpha_stays_gray(tmp_path):
    la = np.dstack([np.full((2, 2), 200, np.uint8), np.array([[255, 0], [51, 255]], np.uint8)])
    path = save(tmp_path / "la.png", la, "LA")
    x, _ = load_image(path, 2, 1)
    assert torch.allclose(x[0], torch.tensor(unit([[200, 0], [40, 200]])))


def test_palette_pngs(tmp_path):
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    colour = Image.fromarray(idx, "P")
    colour.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    x, _ = load_image(save(tmp_path / "p.png", colour), 2, 3)
    assert torch.allclose(x[:, 0, 0], torch.tensor(unit([255, 0, 0])))
    assert torch.allclose(x[:, 0, 1], torch.tensor(unit([0, 0, 255])))
    # a transparent palette entry is black, like any transparency
    transparent = colour.copy()
    transparent.info["transparency"] = 1
    x, _ = load_image(save(tmp_path / "pt.png", transparent), 2, 3)
    assert torch.allclose(x[:, 0, 1], torch.full((3,), -1.0))
    # a palette of gray entries only makes a grayscale category
    gray = Image.fromarray(idx, "P")
    gray.putpalette([v for g in range(256) for v in (g, g, g)])
    cat = category(tmp_path / "g", {"000.png": gray}, {"000.png": gray})
    assert MVTecDataModule(str(cat.parent), "cat", image_size=8).num_channels == 1


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000], [32768, 65535]], np.uint16)
    path = save(tmp_path / "16.png", values)
    assert Image.open(path).mode == "I;16"
    x, _ = load_image(path, 2, 1)
    expect = torch.tensor(values.astype(np.float64) / 65535 * 2 - 1, dtype=torch.float32)
    assert torch.allclose(x[0], expect, atol=1e-6)  # 1000 -> -0.969, not 255 -> +1 as convert("L") gives
    x3, _ = load_image(path, 2, 3)  # in a colour category the gray values are replicated
    assert torch.equal(x3, x.expand(3, 2, 2))
    small, _ = load_image(path, 1, 1)  # resized in float: 2x2 -> 1x1 bilinear (antialiased) is the mean
    assert abs(float(small) - (values.mean() / 65535 * 2 - 1)) < 1e-5
    # 16-bit masks: defective above half of full scale
    m = load_mask(save(tmp_path / "m16.png", np.array([[32767, 32768]], np.uint16)), 2, (2, 1), path)
    assert m[:, 0].tolist() == [False, False] and m[:, 1].tolist() == [True, True]


def test_32_bit_and_float_images_outside_the_range_are_refused(tmp_path):
    big = save(tmp_path / "i32.tif", np.array([[0, 70000]], np.int32))
    with pytest.raises(DatasetError, match=r"i32\.tif holds 32-bit integers in 0\.\.70000"):
        load_image(big, 2, 1)
    ok = save(tmp_path / "f.tif", np.array([[0.0, 0.5]], np.float32))
    assert torch.allclose(load_image(ok, 2, 1)[0][0, 0], torch.tensor([-1.0, 0.0]))
    bad = save(tmp_path / "f2.tif", np.array([[0.0, 2.0]], np.float32))
    with pytest.raises(DatasetError, match=r"f2\.tif is a float image with values outside \[0, 1\]"):
        load_image(bad, 2, 1)


@pytest.mark.parametrize(
    "suffix,tol", [(".jpg", 4 / 127.5), (".bmp", 0), (".tif", 0), (".tiff", 0), (".JPEG", 4 / 127.5)]
)
def test_jpeg_bmp_tiff(tmp_path, suffix, tol):
    path = save(tmp_path / f"img{suffix}", rgb(8, 8, (10, 120, 240)))
    x, size = load_image(path, 8, 3)
    assert size == (8, 8)
    assert (x - torch.tensor(unit([10, 120, 240]))[:, None, None]).abs().max() <= tol + 1e-6
    assert list_images(tmp_path) == [path]


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = save(tmp_path / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))  # pure red
    x, _ = load_image(path, 8, 3)
    assert (x - torch.tensor(unit([255, 0, 0]))[:, None, None]).abs().max() <= 4 / 127.5


def test_exif_rotation_is_applied_to_pixels_and_sizes(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high: left half white
    stored[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = save(tmp_path / "rot.jpg", stored, exif=exif.tobytes(), quality=95)
    x, size = load_image(path, 8, 1)
    assert size == (8, 16)  # displayed width x height
    shown = np.rot90(stored[..., 0], k=-1)  # independent: rotate clockwise by hand
    assert shown.shape == (16, 8) and shown[:8].min() == 255 and shown[8:].max() == 0
    assert x[0, :3].min() > 0.9 and x[0, 5:].max() < -0.9  # white on top after the stretch to 8x8
    # the mask check uses the displayed size: 8x16 fits, 16x8 (the stored size) does not
    assert load_mask(save(tmp_path / "m.png", np.zeros((16, 8), np.uint8)), 8, size, path).shape == (8, 8)
    with pytest.raises(DatasetError, match=r"m2\.png is 16x8 but its image .*rot\.jpg is 8x16"):
        load_mask(save(tmp_path / "m2.png", np.zeros((8, 16), np.uint8)), 8, size, path)


# ---------------------------------------------------------------------------------- masks


def test_non_binary_masks_use_threshold_127(tmp_path):
    img = tmp_path / "i.png"
    values = np.array([[0, 100, 127, 128, 200, 255]], np.uint8)
    m = load_mask(save(tmp_path / "m.png", np.repeat(values, 6, axis=0)), 6, (6, 6), img)
    assert m.dtype == torch.bool
    assert m[0].tolist() == [False, False, False, True, True, True]
    # colour masks: any channel on; transparent pixels are not defective
    colour = np.zeros((2, 2, 4), np.uint8)
    colour[0, 0] = (255, 0, 0, 255)
    colour[0, 1] = (255, 255, 255, 0)
    colour[1, 0] = (0, 0, 200, 255)
    m = load_mask(save(tmp_path / "c.png", colour, "RGBA"), 2, (2, 2), img)
    assert m.tolist() == [[True, False], [True, False]]


def test_mask_of_another_size_with_the_same_aspect_ratio_is_resized(tmp_path):
    img = save(tmp_path / "i.png", rgb(20, 40, (0, 0, 0)))
    half = np.zeros((10, 20), np.uint8)
    half[:, :10] = 255  # left half defective, at half resolution
    m = load_mask(save(tmp_path / "m.png", half), 8, (40, 20), img)
    assert m[:, :4].all() and not m[:, 4:].any()
    with pytest.raises(
        DatasetError, match=r"mask .*m2\.png is 20x20 but its image .*i\.png is 40x20 \(different aspect"
    ):
        load_mask(save(tmp_path / "m2.png", np.zeros((20, 20), np.uint8)), 8, (40, 20), img)


def test_mask_names_other_than_mvtec(tmp_path):
    img = rgb(8, 8, (0, 0, 0))
    on = np.full((8, 8), 255, np.uint8)
    category(tmp_path, {"000.png": img}, {"000.png": img},
             defects={"test/a": {"000.png": img, "001.png": img}},
             masks={"a": {"000.png": on, "001_mask.bmp": on}})  # fmt: skip
    dm = MVTecDataModule(str(tmp_path), "cat", image_size=8)
    dm.load_test()
    items = {it.image.name: it.mask.name for it in dm.test_meta if it.mask}
    assert items == {"000.png": "000.png", "001.png": "001_mask.bmp"}
    labels = dm.test_data["label"].bool()
    assert dm.test_data["mask"][labels].all() and not dm.test_data["mask"][~labels].any()


# --------------------------------------------------------------------------- geometry


def test_non_square_image_is_stretched(tmp_path):
    arr = np.zeros((8, 32, 3), np.uint8)
    arr[:, 16:] = 255  # right half white
    x, size = load_image(save(tmp_path / "wide.png", arr), 8, 3)
    assert size == (32, 8) and x.shape == (3, 8, 8)
    assert torch.all(x[:, :, :3] == -1) and torch.all(x[:, :, 5:] == 1)  # halves stay halves: stretched
    assert torch.equal(x[:, 0], x[:, 7])  # every row the same, nothing cropped or padded


def test_category_with_images_of_different_sizes(tmp_path):
    category(tmp_path, {"000.png": rgb(20, 20, (9, 9, 9)), "001.png": rgb(24, 30, (9, 9, 9)),
                        "002.jpg": rgb(64, 48, (9, 9, 9))}, {"000.png": rgb(50, 50, (9, 9, 9))})  # fmt: skip
    dm = MVTecDataModule(str(tmp_path), "cat", image_size=16)
    dm.setup()
    assert dm.train_data["image"].shape == (3, 3, 16, 16) and dm.test_data["image"].shape == (1, 3, 16, 16)
    assert (dm.train_data["image"] - unit(9)).abs().max() <= 2 / 127.5


def test_gray_and_rgb_mixed_in_a_category(tmp_path, caplog):
    gray = np.full((8, 8), 100, np.uint8)
    colour = rgb(8, 8, (255, 0, 0))
    category(tmp_path / "mix", {"000.png": gray, "001.png": colour}, {"000.png": gray})
    dm = MVTecDataModule(str(tmp_path / "mix"), "cat", image_size=8)
    with caplog.at_level(logging.WARNING):
        assert dm.num_channels == 3
    assert "mixes 1 grayscale and 1 colour images" in caplog.text
    imgs = dm.load_train()["image"]
    assert torch.allclose(imgs[0], torch.full((3, 8, 8), float(unit(100))))  # gray replicated
    assert torch.allclose(imgs[1][:, 0, 0], torch.tensor(unit([255, 0, 0])))
    # an all-gray training set is grayscale; a colour test image is converted with ITU-R 601-2 luma
    category(tmp_path / "gray", {"000.png": gray}, {"000.png": colour})
    dm = MVTecDataModule(str(tmp_path / "gray"), "cat", image_size=8)
    assert dm.num_channels == 1
    luma = round(255 * 299 / 1000)  # 76
    assert torch.allclose(dm.load_test()["image"][0], torch.full((1, 8, 8), float(unit(luma))))


# ------------------------------------------------------------------------------ broken


def test_empty_file_is_refused_naming_it(tmp_path):
    cat = category(tmp_path, {"000.png": rgb(8, 8, (0, 0, 0))}, {"000.png": rgb(8, 8, (0, 0, 0))})
    (cat / "train" / "good" / "001.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"image file .*train/good/001\.png is empty \(0 bytes\)"):
        MVTecDataModule(str(tmp_path), "cat", image_size=8).setup("fit")


def test_empty_mask_is_refused_naming_it(tmp_path):
    img = rgb(8, 8, (0, 0, 0))
    cat = category(tmp_path, {"000.png": img}, {"000.png": img}, defects={"test/a": {"000.png": img}})
    (cat / "ground_truth" / "a").mkdir(parents=True)
    (cat / "ground_truth" / "a" / "000_mask.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"ground_truth/a/000_mask\.png is empty"):
        MVTecDataModule(str(tmp_path), "cat", image_size=8).setup("test")


def test_hidden_and_system_files_are_ignored(tmp_path):
    img = rgb(8, 8, (0, 0, 0))
    cat = category(tmp_path, {"000.png": img}, {"000.png": img},
                   defects={"test/a": {"000.png": img}}, masks={"a": {"000_mask.png": img[..., 0]}})  # fmt: skip
    junk = b"\x00\x05\x16\x07AppleDouble junk"
    for folder in ("train/good", "test/good", "test/a", "ground_truth/a"):
        (cat / folder / ".DS_Store").write_bytes(junk)
        (cat / folder / "._000.png").write_bytes(junk)
        (cat / folder / "Thumbs.db").write_bytes(junk)
    (cat / "test" / ".ipynb_checkpoints").mkdir()
    (cat / "test" / ".ipynb_checkpoints" / "000.png").write_bytes(junk)
    (tmp_path / ".hidden_category").mkdir()
    dm = MVTecDataModule(str(tmp_path), "cat", image_size=8)
    dm.setup()
    assert len(dm.train_data["image"]) == 1 and len(dm.test_meta) == 2
    assert {it.defect for it in dm.test_meta} == {"good", "a"}
    with pytest.raises(DatasetError, match=r"folders there: \['cat'\]"):
        MVTecDataModule(str(tmp_path), "other").setup()


def test_missing_ground_truth_folder_names_it(tmp_path):
    img = rgb(8, 8, (0, 0, 0))
    cat = category(tmp_path, {"000.png": img}, {"000.png": img}, defects={"test/crack": {"000.png": img}})
    with pytest.raises(DatasetError, match=r"ground-truth folder .*ground_truth/crack does not exist") as err:
        MVTecDataModule(str(tmp_path), "cat", image_size=8).setup("test")
    assert str(cat / "test" / "crack") in str(err.value)


def test_truncated_image_names_the_file(tmp_path):
    path = save(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"cannot read image file .*cut\.png"):
        load_image(cut, 8, 3)
