"""Predicting on new images: mixed formats and sizes, a broken file, thresholds, errors, scores = evaluation's."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ebmad.data.io import load_image
from ebmad.deploy.overlays import display_rgb, heat_colors
from ebmad.models.ebm import EBMModule
from ebmad.predict import output_names, predict
from ebmad.train import CONF_DIR, run

from conftest import REPO, compose_cfg, tiny_overrides

# name -> (mode, width, height); the truncated PNG is added separately
MIXED = {"normal.png": ("RGB", 48, 40), "photo.jpg": ("RGB", 64, 64), "gray.png": ("L", 50, 30),
         "big.png": ("RGB", 1000, 700)}  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synth_root):
    """A tiny trained EBM run folder (checkpoint + scores.csv), shared by this module's tests."""
    out = tmp_path_factory.mktemp("fit")
    run(compose_cfg(out, [*tiny_overrides(synth_root), "logger=none"]))
    return out


@pytest.fixture(scope="module")
def ckpt(fitted):
    return fitted / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for name, (mode, w, h) in MIXED.items():
        small = rng.integers(0, 256, (h // 10 + 2, w // 10 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR).convert(mode)
        img.save(folder / name)
    good = (folder / "normal.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    return folder


def predict_cfg(**kw):
    """conf/predict.yaml composed with ``key=value`` overrides."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("predict", overrides=[f"{k}={v}" for k, v in {"progress_bar": "false", **kw}.items()])


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def reference(ckpt, files):
    """Image scores and maps straight from the module, with the training-time image loading."""
    model = EBMModule.load_from_checkpoint(ckpt, map_location="cpu")
    x = torch.stack([load_image(f, 32, 3)[0] for f in files])
    images, maps = model.score(x)
    return images["A_std_l2"], maps["a_std_l2"]


def test_cli_on_mixed_folder_keeps_going_past_a_truncated_file(ckpt, mixed_folder, tmp_path):
    files = [mixed_folder / n for n in MIXED]
    ref_scores, ref_maps = reference(ckpt, files)
    image_thr, pixel_thr = float(ref_scores.median()), float(ref_maps.median())
    out = tmp_path / "pred"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "ebmad.predict", f"ckpt_path={ckpt}", f"input={mixed_folder}",
                        f"output={out}", f"image_threshold={image_thr}", f"pixel_threshold={pixel_thr}",
                        "progress_bar=false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 1, p.stderr[-3000:]
    summary = p.stdout.strip().splitlines()[-1]
    assert "scored=4" in summary and "failed=1" in summary and "device=cpu" in summary
    assert f"image_threshold={image_thr:.6g} threshold_source=command_line" in summary
    assert "image threshold: command line" in p.stdout  # the provenance, printed before the summary
    assert f"FAILED {mixed_folder / 'truncated.png'}" in p.stdout

    rows = {Path(r["path"]).name: r for r in read_csv(out / "predictions.csv")}
    assert sorted(rows) == sorted([*MIXED, "truncated.png"])
    assert "truncated" in rows["truncated.png"]["error"] and rows["truncated.png"]["score"] == ""
    assert (
        not (out / "masks" / "truncated.png").exists() and not (out / "overlays" / "truncated.png").exists()
    )
    for (name, (_, w, h)), ref_score, ref_map in zip(MIXED.items(), ref_scores, ref_maps, strict=True):
        row = rows[name]
        assert row["error"] == ""
        assert float(row["score"]) == pytest.approx(float(ref_score), rel=1e-5)
        assert row["decision"] == ("defective" if float(row["score"]) >= image_thr else "good")
        stem = Path(name).stem
        overlay, mask = (
            Image.open(out / "overlays" / f"{stem}.png"),
            Image.open(out / "masks" / f"{stem}.png"),
        )
        assert mask.size == (w, h) and overlay.mode == "RGB"  # the overlay has its legend strip below
        assert overlay.width == max(w, 420) and overlay.height > h
        assert float(row["image_threshold"]) == image_thr and float(row["pixel_threshold"]) == pixel_thr
        assert row["threshold_source"] == "command line" and row["expected_false_alarm_rate"] != ""
        m = np.asarray(mask) > 0
        assert int(row["defect_area_px"]) == int(m.sum()) and (int(row["width"]), int(row["height"])) == (
            w,
            h,
        )
        # the mask is the checkpoint's map, upsampled bilinearly to the original size, at the threshold
        up = F.interpolate(ref_map[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        expected = (up >= pixel_thr).numpy()
        assert (m != expected).mean() < 1e-3  # only pixels within float noise of the threshold may differ
    assert 0 < sum(r["decision"] == "defective" for r in rows.values()) < 4


def test_scores_equal_the_evaluation_scores(fitted, ckpt, synth_root, tmp_path):
    pattern = f"{synth_root}/tex_a/test/*/*.png"
    summary = predict(predict_cfg(ckpt_path=ckpt, input=f"'{pattern}'", output=tmp_path / "p", image_threshold=1,
                                  pixel_threshold=1, batch_size=5))  # fmt: skip
    assert summary["failed"] == 0 and summary["scored"] == 14
    evaluated = {
        str(Path(r["path"]).resolve()): float(r["A_std_l2"]) for r in read_csv(fitted / "scores.csv")
    }
    predicted = {
        str(Path(r["path"]).resolve()): float(r["score"])
        for r in read_csv(tmp_path / "p" / "predictions.csv")
    }
    assert set(predicted) == set(evaluated)
    for path, value in evaluated.items():
        assert predicted[path] == pytest.approx(value, rel=1e-5), path
    # outputs mirror the defect folders, so equal file names in different folders do not collide
    n_overlays = len(list((tmp_path / "p" / "overlays").rglob("*.png")))
    assert n_overlays == 14 and (tmp_path / "p" / "masks" / "good").is_dir()


def with_state(ckpt, tmp_path, **values):
    """A copy of the checkpoint with some state_dict entries replaced."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for k, v in values.items():
        state["state_dict"][k] = torch.tensor(v, dtype=state["state_dict"][k].dtype)
    path = tmp_path / f"edited_{len(list(tmp_path.glob('edited_*')))}.ckpt"
    torch.save(state, path)
    return path


def test_stored_thresholds_are_used_and_the_command_line_overrides_them(ckpt, synth_root, tmp_path):
    img = synth_root / "tex_a" / "test" / "good" / "000.png"
    score = float(reference(ckpt, [img])[0][0])
    stored = with_state(ckpt, tmp_path, image_threshold=score * 2, pixel_threshold=1e9)
    s = predict(predict_cfg(ckpt_path=stored, input=img, output=tmp_path / "a"))
    row = read_csv(tmp_path / "a" / "predictions.csv")[0]
    assert (s["image_threshold"], s["pixel_threshold"]) == (pytest.approx(score * 2), pytest.approx(1e9))
    assert row["decision"] == "good" and row["defect_area_px"] == "0"
    s = predict(predict_cfg(ckpt_path=stored, input=img, output=tmp_path / "b", image_threshold=score / 2))
    assert s["image_threshold"] == score / 2 and s["defective"] == 1
    assert read_csv(tmp_path / "b" / "predictions.csv")[0]["decision"] == "defective"


def test_errors_name_what_is_wrong(ckpt, synth_root, tmp_path):
    img = synth_root / "tex_a" / "test" / "good" / "000.png"
    ok = {"image_threshold": 1, "pixel_threshold": 1, "output": tmp_path / "o"}
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nope.ckpt does not exist"):
        predict(predict_cfg(ckpt_path=tmp_path / "nope.ckpt", input=img, **ok))
    no_stats = with_state(ckpt, tmp_path, stats_count=0.0)
    with pytest.raises(ValueError, match=f"{re.escape(str(no_stats))}.*no fitted scoring statistics"):
        predict(predict_cfg(ckpt_path=no_stats, input=img, **ok))
    no_thr = with_state(ckpt, tmp_path, image_threshold=float("nan"), pixel_threshold=float("nan"))
    with pytest.raises(
        ValueError, match="image_threshold / pixel_threshold.*image_threshold=<value> pixel_threshold="
    ):
        predict(predict_cfg(ckpt_path=no_thr, input=img, output=tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=f"input={re.escape(str(empty))} matched no image"):
        predict(predict_cfg(ckpt_path=ckpt, input=empty, **ok))
    with pytest.raises(FileNotFoundError, match="input=.*missing.png does not exist"):
        predict(predict_cfg(ckpt_path=ckpt, input=tmp_path / "missing.png", **ok))
    with pytest.raises(FileNotFoundError, match="matched no image"):
        predict(predict_cfg(ckpt_path=ckpt, input=f"'{tmp_path}/*.jpg'", **ok))


def test_overlay_background_scales_16bit_instead_of_clipping(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 50000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    img = Image.open(tmp_path / "deep.png")
    assert img.mode.startswith("I")
    rgb = display_rgb(img)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], np.round(values / 257.0).astype(np.uint8))
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_heat_colors_use_a_fixed_scale_tied_to_the_threshold():
    thr = 0.25
    jet = matplotlib.colormaps["jet"]
    expected = (np.array([jet(0.0), jet(0.5), jet(1.0), jet(1.0)])[:, :3] * 255).round().astype(np.uint8)
    assert np.array_equal(heat_colors(np.array([0.0, thr, 2 * thr, 10 * thr]), thr), expected)
    # a value's colour does not depend on the other values of the map (no per-image min-max)
    assert np.array_equal(
        heat_colors(np.array([thr, 0.1]), thr)[0], heat_colors(np.array([thr, 90.0]), thr)[0]
    )


def test_output_names_mirror_folders_and_stay_unique(tmp_path):
    files = [tmp_path / "good" / "000.png", tmp_path / "crack" / "000.png", tmp_path / "crack" / "000.jpg",
             tmp_path / "crack" / "001.bmp"]  # fmt: skip
    names = output_names(files)
    assert [n.as_posix() for n in names] == ["good/000", "crack/000_png", "crack/000_jpg", "crack/001"]
    assert [n.as_posix() for n in output_names([tmp_path / "a.png"])] == ["a"]
