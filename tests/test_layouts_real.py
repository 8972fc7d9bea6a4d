"""Slow checks of the data layer: real bottle in every layout (experiments/layouts_bottle.py) and bounded memory
on multi-megapixel images (experiments/bench_data_memory.py)."""

import json
import subprocess
import sys

import pytest

from ebmad.data.synthetic import generate_category

from conftest import BOTTLE_ROOT, REPO

pytestmark = pytest.mark.slow


def test_bottle_in_every_layout_gives_the_mvtec_layout_metrics(tmp_path):
    if not (BOTTLE_ROOT / "bottle").is_dir():
        pytest.skip(f"real MVTec AD bottle not found at {BOTTLE_ROOT / 'bottle'}")
    p = subprocess.run([sys.executable, "experiments/layouts_bottle.py", "--work", str(tmp_path / "work"),
                        "--steps", "4"], cwd=REPO, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "all layouts agree with the MVTec layout" in p.stdout
    for layout in ("folder", "visa", "mvtec_ad2"):
        assert f"{layout:10s} scores identical to mvtec: True; thresholds identical: True" in p.stdout


def test_loading_megapixel_images_keeps_one_decoded_image_at_a_time(tmp_path):
    generate_category(tmp_path, "big", size=1536, n_train=12, n_test_good=2, n_test_defect=2, layout="mvtec_ad2",
                      n_validation=2)  # fmt: skip
    p = subprocess.run([sys.executable, "experiments/bench_data_memory.py", "--child", "--layout", "mvtec_ad2",
                        "--root", str(tmp_path), "--category", "big", "--image-size", "64", "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["n_images"] == 20
    # far below the category decoded at full size (8-bit: 20 x 6.75 MiB), about one decoded image + tensors
    assert r["growth_mb"] < r["tensors_mb"] + 2 * r["largest_decoded_mb"] < r["all_decoded_mb"]
