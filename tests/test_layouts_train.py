"""Layout equivalence through training: the same images in each layout train to bit-identical scores."""

import hashlib
import json
from pathlib import Path

import pytest

from ebmad.data.layout import LAYOUTS
from ebmad.data.synthetic import generate_category
from ebmad.train import run

from conftest import SMALL, compose_cfg, read_scores, tiny_overrides

FAST = ["logger=none", "eval.figures=false", "eval.untrained_reference=false"]


def data_overrides(root: Path, layout: str) -> list[str]:
    base = root / layout
    if layout == "folder":
        c = base / "tex_a"
        return ["data=folder", f"data.normal_dir={c / 'normal'}", f"data.normal_test_dir={c / 'normal_test'}",
                f"data.abnormal_dir={c / 'abnormal'}", f"data.mask_dir={c / 'masks'}", "data.category=tex_a"]  # fmt: skip
    return [f"data={layout}", f"data.root={base}", "data.category=tex_a"]


def train_in(root: Path, layout: str, out: Path) -> dict:
    rest = [o for o in tiny_overrides(root) if not o.startswith(("data=", "data.root=", "data.category="))]
    run(compose_cfg(out, [*data_overrides(root, layout), *rest, *FAST]))
    return json.loads((out / "results.json").read_text())


def scores_by_image(out: Path) -> dict[str, dict[str, str]]:
    """scores.csv rows keyed by the image file's content (paths differ between layouts)."""
    rows = read_scores(out / "scores.csv")
    return {hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest(): {k: v for k, v in r.items()
            if k not in ("index", "path", "defect")} for r in rows}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts_train")
    for layout in LAYOUTS:
        generate_category(root / layout, "tex_a", seed=0, layout=layout, **SMALL)
    return {
        layout: (train_in(root, layout, root / f"run_{layout}"), root / f"run_{layout}") for layout in LAYOUTS
    }


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_same_images_in_any_layout_train_to_bit_identical_scores(runs, layout):
    ref, ref_out = runs["mvtec"]
    res, out = runs[layout]
    assert res["status"] == "completed" and res["n_train"] == ref["n_train"] == 16
    assert res["n_test"] == ref["n_test"] == 14
    assert scores_by_image(out) == scores_by_image(ref_out)  # every score, as written (full float repr)
    m, r = res["metrics"], ref["metrics"]
    # thresholded metrics: MVTec AD 2 fits its thresholds on validation/good (the others on the training images)
    thresholded = ("image_threshold", "pixel_threshold") if layout == "mvtec_ad2" else ()
    shared = [
        k for k in r if not k.startswith("per_defect/") and not k.startswith(thresholded) and "@thr" not in k
    ]
    assert {k: m[k] for k in shared} == {k: r[k] for k in shared}  # AUROC, AP, AUPRO, F1-max: equal floats
    if layout == "folder":  # same thresholds, same defect types: every metric
        assert m == r and res["thresholds"] == ref["thresholds"]
    elif layout == "visa":  # VisA has no defect types
        assert res["thresholds"] == ref["thresholds"] and "per_defect/anomaly/image_auroc" in m
    else:
        assert res["thresholds"]["image"] != ref["thresholds"]["image"] and "per_defect/bad/image_auroc" in m


def test_folder_with_normal_images_only_fits_thresholds_and_reports_false_alarms(tmp_path):
    """No defect images: the run fits and stores thresholds; the held-out good images give a false-alarm rate."""
    import torch

    from ebmad.data import AnomalyDataModule, false_alarm_summary
    from ebmad.models.ebm import EBMModule

    generate_category(tmp_path / "data", "tex_a", seed=0, layout="folder", **SMALL)
    normal = tmp_path / "data" / "tex_a" / "normal"
    rest = [
        o for o in tiny_overrides(tmp_path) if not o.startswith(("data=", "data.root=", "data.category="))
    ]
    opts = [f"data.normal_dir={normal}", "data.normal_test_fraction=0.25", "data.val_fraction=0.25"]
    out = tmp_path / "run"
    run(compose_cfg(out, ["data=folder", *opts, *rest, *FAST, "test=false"]))
    model = EBMModule.load_from_checkpoint(out / "checkpoints" / "last.ckpt", map_location="cpu")
    assert torch.isfinite(model.image_threshold) and torch.isfinite(model.pixel_threshold)
    dm = AnomalyDataModule(layout="folder", normal_dir=str(normal), normal_test_fraction=0.25, image_size=32)
    assert not dm.has_defects and len(dm.index.test) == 4
    scores = [
        float(s) for b in dm.test_dataloader() for s in model.score(b["image"])[0][model.DEFAULT_IMAGE_SCORE]
    ]
    summary = false_alarm_summary(scores, float(model.image_threshold))
    assert summary["n_test_good"] == 4
    assert summary["n_false_alarms"] == sum(s >= float(model.image_threshold) for s in scores)


def test_folder_of_normal_images_only_reports_false_alarms_not_auroc(tmp_path, capsys):
    """`data=folder data.normal_dir=...` alone: thresholds fitted and stored, the false-alarm rate on the
    held-out defect-free images reported, and plainly no defect AUROC."""
    root = tmp_path / "data"
    generate_category(root, "tex_a", seed=0, layout="folder", **SMALL)
    rest = [o for o in tiny_overrides(root) if not o.startswith(("data=", "data.root=", "data.category="))]
    out = tmp_path / "run"
    res = run(compose_cfg(out, ["data=folder", f"data.normal_dir={root / 'tex_a' / 'normal'}",
                                "data.normal_test_fraction=0.25", *rest, *FAST]))  # fmt: skip
    assert res["status"] == "completed" and res["image_auroc"] is None and res["pixel_auroc"] is None
    assert res["metrics"] == {}
    fa = res["false_alarms"]
    assert fa["n_test_good"] == 4 and 0 <= fa["false_alarm_rate"] <= 1 and "no defect AUROC" in fa["note"]
    assert fa["image_threshold"] == res["thresholds"]["image"]
    last = [line for line in capsys.readouterr().out.splitlines() if line.strip()][-1]
    assert last.startswith("RESULT") and "false_alarm_rate=" in last and "no defect AUROC" in last


def test_folder_with_defects_but_no_masks_gives_image_metrics_only(tmp_path):
    root = tmp_path / "data"
    generate_category(root, "tex_a", seed=0, layout="folder", **SMALL)
    c = root / "tex_a"
    rest = [o for o in tiny_overrides(root) if not o.startswith(("data=", "data.root=", "data.category="))]
    res = run(compose_cfg(tmp_path / "run", ["data=folder", f"data.normal_dir={c / 'normal'}",
                                             f"data.normal_test_dir={c / 'normal_test'}",
                                             f"data.abnormal_dir={c / 'abnormal'}", *rest, *FAST]))  # fmt: skip
    assert res["status"] == "completed" and 0 <= res["image_auroc"] <= 1
    assert res["pixel_auroc"] is None and res["aupro"] is None
    assert not [k for k in res["metrics"] if k.startswith("pixel_") or "aupro" in k]
