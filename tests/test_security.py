"""Files from others are data, never code: a checkpoint whose pickle would run a command is refused by
every entry point (naming the file) and the command never runs; untrusted images in predict."""

from __future__ import annotations

import csv
import os
import resource
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ebmad.export import export
from ebmad.predict import predict
from ebmad.reliability.checkpointing import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint_file,
    pick_resume_checkpoint,
    validate_checkpoint,
)
from ebmad.report import main as report_main
from ebmad.train import CONF_DIR, run

from conftest import compose_cfg, tiny_overrides


class RunsCommand:
    """Unpickling this runs a shell command (the attack: ``os.system`` named in the pickle)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_root) -> Path:
    """A finished tiny EBM run (checkpoint with statistics and thresholds)."""
    out = tmp_path_factory.mktemp("trusted")
    run(compose_cfg(out, [*tiny_overrides(synth_root), "logger=none"]))
    return out


def evil_copy(ckpt: Path, target: Path, marker: Path) -> Path:
    """A real checkpoint plus one entry whose unpickling would create ``marker``."""
    state = load_checkpoint_file(ckpt)
    state["payload"] = RunsCommand(f"touch {marker}")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


@pytest.fixture
def evil(trained, tmp_path):
    marker = tmp_path / "PWNED"
    path = evil_copy(trained / "checkpoints" / "last.ckpt", tmp_path / "evil" / "evil.ckpt", marker)
    return path, marker


def cfg_of(name: str, **kw):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[f"{k}={v}" for k, v in kw.items()])


def test_the_attack_is_real(evil):
    """Guard against a vacuous test: a plain unpickling of the file does run the command."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_loader_refuses_it_naming_file_and_type(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=rf"{path}.*(posix|os)\.system"):
        load_checkpoint_file(path)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        validate_checkpoint(path, "ebm")
    assert not marker.exists()


@pytest.mark.parametrize("extra", [["train=true"], ["train=false", "test=true"]], ids=["train", "evaluate"])
def test_train_with_ckpt_path_refuses_it(evil, make_cfg, tmp_path, extra):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        run(make_cfg(*extra, f"ckpt_path={path}", out=tmp_path / "job"))
    assert not marker.exists()


def test_auto_resume_refuses_it_instead_of_setting_it_aside(trained, make_cfg, tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "job"
    run(make_cfg("test=false", out=out))  # a job folder with job.json and checkpoints, not completed
    last = out / "checkpoints" / "last.ckpt"
    evil_copy(last, last, marker)
    with pytest.raises(UnsafeCheckpointError, match=str(last)):
        run(make_cfg(out=out))
    with pytest.raises(UnsafeCheckpointError):
        pick_resume_checkpoint(out / "checkpoints", "ebm")
    assert last.exists() and not marker.exists()  # refused, not renamed aside as "damaged"


def test_predict_and_export_refuse_it(evil, tmp_path):
    path, marker = evil
    img = tmp_path / "in" / "part.png"
    img.parent.mkdir()
    Image.new("RGB", (40, 40), (90, 120, 60)).save(img)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        predict(
            cfg_of("predict", ckpt_path=path, input=img.parent, output=tmp_path / "pred", progress_bar=False)
        )
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        export(cfg_of("export", ckpt_path=path, output=tmp_path / "m.onnx"))
    assert not marker.exists()


def test_report_on_a_folder_holding_it_never_opens_it(evil, trained, tmp_path):
    """The report reads results.json / CSV / npz (no pickles): it completes and the command never runs."""
    path, marker = evil
    sweep = tmp_path / "sweep"
    job = sweep / "data.category=tex_a"
    (job / "checkpoints").mkdir(parents=True)
    (job / "results.json").write_bytes((trained / "results.json").read_bytes())
    path.replace(job / "checkpoints" / "last.ckpt")
    assert report_main([str(sweep)]) == 0
    assert not marker.exists()


def test_current_checkpoints_and_statistics_load_weights_only(trained):
    """What ebmad writes holds only tensors and plain containers: nothing needs an allowlist."""
    for path in (trained / "checkpoints" / "last.ckpt", trained / "statistics.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        assert isinstance(load_checkpoint_file(path), dict)


def test_a_legacy_pickle_with_a_class_is_refused(tmp_path):
    """The non-zip (legacy) format has no global scan: the weights-only unpickler refuses it."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "old.ckpt"
    torch.save(
        {"state_dict": {}, "x": RunsCommand(f"touch {marker}")}, path, _use_new_zipfile_serialization=False
    )
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint_file(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- images
def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid 8-bit RGB PNG of ``width`` x ``height`` black pixels (2.7 GB decoded) in about 2.6 MB.

    Its pixel stream is all zero bytes (filter byte 0, black pixels); deflate blocks ending in a full flush
    do not depend on what came before, so one compressed block of whole rows is repeated, and the zlib
    checksum of n zero bytes is known (adler32: a = 1, b = n mod 65521). Built in milliseconds.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = 1 + 3 * width
    rows_per_block = 100
    assert height % rows_per_block == 0
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate
    block = comp.compress(bytes(row * rows_per_block)) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    n = row * height
    stream = (
        b"\x78\xda" + block * (height // rows_per_block) + tail + struct.pack(">I", ((n % 65521) << 16) | 1)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
    )
    return path


def test_the_bomb_is_a_real_png(tmp_path):
    """Guard against a vacuous bomb: a smaller one built the same way decodes fully to the declared pixels."""
    with Image.open(bomb_png(tmp_path / "small.png", 700, 300)) as img:
        img.load()
        assert img.size == (700, 300) and img.mode == "RGB" and img.getextrema() == ((0, 0),) * 3


@pytest.fixture(scope="module")
def untrusted_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("untrusted")
    bomb_png(folder / "bomb.png")
    Image.new("RGB", (400, 300), (10, 200, 30)).save(folder / "large.png")  # 120,000 px: above the test limit
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file with an image's name\n")
    for i in range(2):
        Image.new("RGB", (64, 48), (100 + 40 * i, 90, 80)).save(folder / f"ok{i}.png")
    return folder


EXPECTED_FAILURES = {
    "bomb.png": "decompression bomb",
    "large.png": "max_image_pixels=100,000",
    "empty.png": "empty (0 bytes)",
    "notes.png": "cannot read image file",
}


def test_predict_lists_untrusted_images_as_failures_and_scores_the_rest(trained, untrusted_folder, tmp_path):
    out = tmp_path / "pred"
    summary = predict(cfg_of("predict", ckpt_path=trained / "checkpoints" / "last.ckpt", input=untrusted_folder,
                             output=out, progress_bar=False, max_image_pixels=100000))  # fmt: skip
    assert summary["scored"] == 2 and summary["failed"] == 4
    with open(out / "predictions.csv") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    for name, reason in EXPECTED_FAILURES.items():
        assert reason in rows[name]["error"], (name, rows[name]["error"])
        assert name in rows[name]["error"]
    for name in ("ok0.png", "ok1.png"):
        assert rows[name]["error"] == "" and rows[name]["decision"] in ("good", "defective")
        assert (out / "overlays" / name).exists()


def test_predict_memory_stays_bounded_on_a_bomb(trained, untrusted_folder, tmp_path):
    """Decoding the bomb would take 2.7 GB: the process's peak resident memory does not move."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = predict(cfg_of("predict", ckpt_path=trained / "checkpoints" / "last.ckpt",
                             input=untrusted_folder / "bomb.png", output=tmp_path / "p", progress_bar=False))  # fmt: skip
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert summary["failed"] == 1 and summary["scored"] == 0
    assert grown_mb < 500, f"peak resident memory grew by {grown_mb:.0f} MB"
