"""Threshold provenance end to end: results.json and the RESULT line, calibration on labelled shots, the
thresholds file read by predict and by ONNX predict, and checkpoints written before provenance existed."""

import contextlib
import csv
import io
import json
import math
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ebmad.data.io import list_images, load_image
from ebmad.deploy.calibration import thresholds_file_for
from ebmad.deploy.onnx import load_module
from ebmad.deploy.overlays import _font, legend, wrap
from ebmad.evaluation.thresholds import calibrate_threshold, false_alarm_estimate
from ebmad.predict import predict
from ebmad.train import CONF_DIR, run

from conftest import compose_cfg, tiny_overrides


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synth_root):
    """A tiny EBM run with a held-out quarter of the training images for the thresholds; its stdout."""
    out = tmp_path_factory.mktemp("fit")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run(compose_cfg(out, [*tiny_overrides(synth_root), "logger=none", "data.val_fraction=0.25"]))
    return out, buf.getvalue()


@pytest.fixture
def ckpt(fitted, tmp_path):
    """A private copy of the checkpoint (a thresholds file is written beside it)."""
    path = tmp_path / "model.ckpt"
    shutil.copy(fitted[0] / "checkpoints" / "last.ckpt", path)
    return path


@pytest.fixture(scope="module")
def shots(synth_root, tmp_path_factory):
    """3 good and 4 defective labelled shots in good/ and defective/ (nested), from the synthetic test set."""
    folder = tmp_path_factory.mktemp("shots")
    test = synth_root / "tex_a" / "test"
    defective = [p for d in sorted(test.iterdir()) if d.name != "good" for p in list_images(d)][:4]
    for p in list_images(test / "good")[:3]:
        (folder / "good").mkdir(exist_ok=True)
        shutil.copy(p, folder / "good" / p.name)
    for p in defective:
        (folder / "defective" / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / "defective" / p.parent.name / p.name)
    return folder


def cfg_of(name, **kw):
    """conf/<name>.yaml with ``key=value`` overrides (predict: without a progress bar)."""
    kw = {"progress_bar": "false", **kw} if name == "predict" else kw
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[f"{k}={v}" for k, v in kw.items()])


def read_csv_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def shot_scores(ckpt, shots):
    module = load_module(ckpt)
    files = [(p, 0) for p in sorted((shots / "good").rglob("*.png"))]
    files += [(p, 1) for p in sorted((shots / "defective").rglob("*.png"))]
    x = torch.stack([load_image(p, 32, 3)[0] for p, _ in files])
    with torch.no_grad():
        scores = module.score(x)[0][module.DEFAULT_IMAGE_SCORE]
    return scores.tolist(), [y for _, y in files], module


def test_a_run_reports_how_its_threshold_was_fitted_and_warns_when_n_is_small(fitted):
    out, stdout = fitted
    res = json.loads((out / "results.json").read_text())
    fit = res["thresholds"]["image_fit"]
    n_val = fit["sources"][0]["n"]
    assert [s["source"] for s in fit["sources"]] == ["held_out"] and fit["n"] == n_val > 0
    assert fit["k"] == 1 and not fit["enough"] and fit["expected_rate"] == pytest.approx(1 / (n_val + 1))
    assert fit["upper_bound"] == pytest.approx(1 - 0.05 ** (1 / n_val))
    assert res["thresholds"]["image"] == pytest.approx(fit["threshold"]) and "scores" not in fit
    measured = res["thresholds"]["measured_on_test_good"]
    assert measured["n"] == sum(r["label"] == "0" for r in read_csv_rows(out / "scores.csv"))
    assert measured["within_fit_bound"] == (measured["rate"] <= fit["upper_bound"])
    assert measured["consistent_with_fit_bound"] == (measured["lower_bound"] <= fit["upper_bound"])
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("RESULT") and f"n_fit={n_val}({n_val}_held_out)" in line
    assert "false_alarm_expected=" in line and "false_alarm_bound95=" in line
    assert f"WARNING: {n_val} defect-free images cannot fit a 1 % false-alarm rate (needs >= 99)" in line
    assert line.split()[-1].startswith("out=")


def test_calibration_picks_the_goal_threshold_writes_the_file_and_predict_uses_it(ckpt, shots, synth_root,
                                                                                tmp_path):  # fmt: skip
    scores, labels, module = shot_scores(ckpt, shots)
    summary = predict(cfg_of("predict", ckpt_path=ckpt, calibrate=shots, calibrate_goal="'recall>=1'",
                             output=tmp_path / "cal"))  # fmt: skip
    record = summary["calibration"]
    expected = calibrate_threshold(scores, labels, "recall>=1")
    assert record["image_threshold"] == pytest.approx(expected["threshold"], rel=1e-5)
    assert record["confusion"]["tp"] == 4 and record["confusion"]["fn"] == 0
    assert (record["n_good"], record["n_defective"], record["goal"]) == (3, 4, "recall>=1")
    saved = json.loads(thresholds_file_for(ckpt).read_text())
    assert saved["image_threshold"] == record["image_threshold"] and saved["source"] == "calibrated"
    assert saved["label_free"]["n"] == module.threshold_fit["n"] and "scores" not in saved["label_free"]
    est = false_alarm_estimate(module.threshold_fit["scores"], record["image_threshold"])
    assert saved["false_alarm_estimate"] == pytest.approx(est)
    assert len(read_csv_rows(tmp_path / "cal" / "calibration.csv")) == 7

    # predict reads the file beside the checkpoint: rows and summary carry the source and the expected rate
    img = f"'{synth_root}/tex_a/test/*/*.png'"
    s = predict(cfg_of("predict", ckpt_path=ckpt, input=img, output=tmp_path / "p"))
    rows = read_csv_rows(tmp_path / "p" / "predictions.csv")
    assert (
        s["image_threshold"] == pytest.approx(record["image_threshold"])
        and s["threshold_source"] == "calibrated"
    )
    assert "calibrated on 3 good + 4 defective shots, goal recall>=1" in s["threshold_provenance"]
    assert {r["threshold_source"] for r in rows} == {"calibrated"}
    assert float(rows[0]["expected_false_alarm_rate"]) == pytest.approx(est["rate"])
    assert float(rows[0]["false_alarm_upper_bound"]) == pytest.approx(est["upper_bound"])
    # the command line still wins
    s = predict(cfg_of("predict", ckpt_path=ckpt, input=img, output=tmp_path / "q", image_threshold=1.0))
    assert s["threshold_source"] == "command line" and s["image_threshold"] == 1.0
    # without the file: the label-free threshold with its own expected rate and bound
    thresholds_file_for(ckpt).unlink()
    s = predict(cfg_of("predict", ckpt_path=ckpt, input=img, output=tmp_path / "r"))
    assert s["threshold_source"] == "label-free" and s["image_threshold"] == pytest.approx(
        float(module.image_threshold)
    )
    assert s["expected_false_alarm_rate"] == pytest.approx(module.threshold_fit["expected_rate"])
    assert s["false_alarm_upper_bound"] == pytest.approx(module.threshold_fit["upper_bound"])


def test_calibration_from_a_csv_equals_the_folder_and_bad_inputs_are_named(ckpt, shots, tmp_path):
    lines = ["path,label"] + [f"{p.relative_to(shots)},{'good' if p.parts[-2] == 'good' else 'defective'}"
                              for p in sorted(shots.rglob("*.png"))]  # fmt: skip
    (shots / "shots.csv").write_text("\n".join(lines) + "\n")
    try:
        a = predict(cfg_of("predict", ckpt_path=ckpt, calibrate=shots / "shots.csv", output=tmp_path / "a"))
    finally:
        (shots / "shots.csv").unlink()
    b = predict(cfg_of("predict", ckpt_path=ckpt, calibrate=shots, output=tmp_path / "b"))
    assert a["calibration"]["image_threshold"] == b["calibration"]["image_threshold"]
    assert a["calibration"]["goal"] == "recall>=0.95"  # the default goal
    with pytest.raises(FileNotFoundError, match="has no good/ and no defective/ folder"):
        predict(cfg_of("predict", ckpt_path=ckpt, calibrate=shots / "good", output=tmp_path / "c"))
    with pytest.raises(ValueError, match="calibrate_goal="):
        predict(
            cfg_of(
                "predict", ckpt_path=ckpt, calibrate=shots, calibrate_goal="precision", output=tmp_path / "c"
            )
        )
    with pytest.raises(FileNotFoundError, match="thresholds_file=.*nope.json does not exist"):
        predict(cfg_of("predict", ckpt_path=ckpt, input=shots / "good", output=tmp_path / "c",
                       thresholds_file=tmp_path / "nope.json"))  # fmt: skip


def test_a_file_calibrated_for_another_model_is_refused(ckpt, shots, tmp_path):
    predict(cfg_of("predict", ckpt_path=ckpt, calibrate=shots, output=tmp_path / "a"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["state_dict"]["image_threshold"] = torch.tensor(123.0)  # a retrained / edited model file
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="calibrated for another version of .*model.ckpt"):
        predict(cfg_of("predict", ckpt_path=ckpt, input=shots / "good", output=tmp_path / "b"))


def test_provenance_travels_to_onnx_predict(ckpt, shots, synth_root, tmp_path):
    pytest.importorskip("onnxruntime")
    from ebmad.export import export

    cal = predict(cfg_of("predict", ckpt_path=ckpt, calibrate=shots, output=tmp_path / "cal"))["calibration"]
    onnx_path = export(cfg_of("export", ckpt_path=ckpt, output=tmp_path / "m.onnx"))
    copied = json.loads(thresholds_file_for(onnx_path).read_text())
    assert copied["image_threshold"] == cal["image_threshold"] and copied["calibrated_for"] == str(ckpt)
    img = f"'{synth_root}/tex_a/test/*/*.png'"
    by_torch = predict(cfg_of("predict", ckpt_path=ckpt, input=img, output=tmp_path / "t"))
    by_onnx = predict(
        cfg_of("predict", backend="onnx", onnx_path=onnx_path, input=img, output=tmp_path / "o")
    )
    for key in ("image_threshold", "threshold_source", "threshold_provenance"):
        assert by_onnx[key] == by_torch[key], key
    assert by_onnx["expected_false_alarm_rate"] == pytest.approx(by_torch["expected_false_alarm_rate"])
    # without the file, ONNX predict falls back to the label-free threshold and its fit from the metadata
    thresholds_file_for(onnx_path).unlink()
    thresholds_file_for(ckpt).unlink()
    by_torch = predict(cfg_of("predict", ckpt_path=ckpt, input=img, output=tmp_path / "t2"))
    by_onnx = predict(
        cfg_of("predict", backend="onnx", onnx_path=onnx_path, input=img, output=tmp_path / "o2")
    )
    assert (
        by_onnx["threshold_source"] == "label-free"
        and by_onnx["threshold_provenance"] == by_torch["threshold_provenance"]
    )
    assert by_onnx["expected_false_alarm_rate"] == pytest.approx(by_torch["expected_false_alarm_rate"])


def test_a_checkpoint_written_before_provenance_still_predicts(ckpt, shots, tmp_path):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["ebmad_threshold_fit"]
    torch.save(state, ckpt)
    s = predict(cfg_of("predict", ckpt_path=ckpt, input=shots / "good", output=tmp_path / "p"))
    assert s["threshold_source"] == "label-free" and math.isnan(s["expected_false_alarm_rate"])
    assert "no record" in s["threshold_provenance"] and s["scored"] == 3
    # and it can still be calibrated (no label-free scores to estimate the false-alarm rate from)
    cal = predict(cfg_of("predict", ckpt_path=ckpt, calibrate=shots, output=tmp_path / "c"))["calibration"]
    assert "false_alarm_estimate" not in cal and math.isfinite(cal["image_threshold"])


def test_the_legend_wraps_the_threshold_source_to_the_overlay_width():
    text = "image threshold: calibrated on 6 good + 6 defective shots, goal recall>=0.9; expected false alarms 4.55 %"
    font = _font(13)
    lines = wrap(text, font, 200)
    assert " ".join(lines) == text and len(lines) > 1
    assert all(font.getlength(line) <= 200 for line in lines)
    image = Image.new("RGB", (256, 256))
    short, long = legend(image, 1.0, 2.0, 0, 1.0, "command line"), legend(image, 1.0, 2.0, 0, 1.0, text)
    assert short.width == long.width == 420 and long.height > short.height
