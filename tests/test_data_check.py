"""``python -m ebmad.data.check``: counts, sizes, modes, channels and every problem at once, exit status 1."""

import subprocess
import sys

import numpy as np
from PIL import Image

from ebmad.data.check import main
from ebmad.data.synthetic import generate_category

from conftest import REPO, SMALL


def test_check_prints_counts_sizes_modes_and_channels(tmp_path, capsys):
    generate_category(tmp_path / "ad2", "tex_a", seed=0, layout="mvtec_ad2", **SMALL)
    rc = main(["data=mvtec_ad2", f"data.root={tmp_path / 'ad2'}", "data.category=tex_a", "data.batch_size=8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "train 16 | validation 4 (validation images) | test good 6 | test defective 8 | masks 8" in out
    assert "unlabelled test_private_mixed: 3 images" in out
    assert "image sizes: 32x32 x34" in out and "image modes: RGB x34" in out and "channels: 3" in out
    assert "no problems" in out and "all 1 category(ies) OK" in out


def test_check_lists_every_problem_at_once_and_exits_1(tmp_path, capsys):
    root = tmp_path / "visa"
    generate_category(root, "tex_a", seed=0, layout="visa", **SMALL)
    images = root / "tex_a" / "Data" / "Images"
    (images / "Normal" / "0002.png").unlink()  # a CSV row naming a missing file
    (images / "Normal" / "0003.png").write_bytes(b"")  # an empty file
    Image.fromarray(np.ones((16, 32), np.uint8)).save(
        root / "tex_a" / "Data" / "Masks" / "Anomaly" / "007.png"
    )
    rc = main(["data=visa", f"data.root={root}", "data.category=tex_a", "data.batch_size=64"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "4 problem(s):" in out and "4 problem(s) in 1 of 1 category(ies)" in out
    assert "line 4: image file" in out and "Normal/0002.png does not exist" in out
    assert "Normal/0003.png is empty (0 bytes)" in out
    assert "mask " in out and "Anomaly/007.png is 32x16 but its image" in out
    assert "data.batch_size=64 exceeds the 15 training images" in out
    assert "train 15 | validation 0" in out  # the counts are printed all the same


def test_check_folder_without_defects_and_console_script(tmp_path, capsys):
    generate_category(tmp_path, "mine", seed=0, layout="folder", **SMALL)
    p = subprocess.run([sys.executable, "-m", "ebmad.data.check", "data=folder",
                        f"data.normal_dir={tmp_path / 'mine' / 'normal'}", "data.batch_size=4"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "train 13 | validation 0" in p.stdout and "test good 3 | test defective 0 | masks 0" in p.stdout
    assert "the test set is defect free: the run reports the false-alarm rate, no defect AUROC" in p.stdout
    assert main(["data=folder"]) == 1 and "data=folder needs data.normal_dir" in capsys.readouterr().out
