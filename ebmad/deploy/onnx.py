"""ONNX export of a trained module and its checks: load a checkpoint, write the ONNX model with its
metadata, verify it against PyTorch, carry a calibrated thresholds file along; also the ONNX session
that ``ebmad.predict backend=onnx`` scores with. The command is :mod:`ebmad.export`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ebmad.deploy.calibration import (
    file_sha256,
    read_thresholds_file,
    thresholds_file_for,
    write_thresholds_file,
)
from ebmad.models import AnomalyModule, model_class
from ebmad.reliability.checkpointing import load_module_checkpoint, validate_checkpoint

INPUT_NAME = "image"
OUTPUT_NAMES = ("pixel_map", "image_score")


def require_export_extra(name: str) -> Any:
    """Import onnx / onnxruntime, or explain how to install them."""
    try:
        return __import__(name)
    except ImportError as exc:
        raise ImportError(f"{name} is not installed: pip install -e '.[export]'") from exc


def load_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> AnomalyModule:
    """The trained module of a checkpoint of any model type, in eval mode; errors name the file."""
    path = Path(ckpt_path) if ckpt_path else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist (give the checkpoint written after fit, "
                                "e.g. <run>/checkpoints/last.ckpt)")  # fmt: skip
    kind = str(validate_checkpoint(path).get("ebmad_model_type", "ebm"))  # names the file and the problem
    module = load_module_checkpoint(model_class(kind), path, map_location=map_location)
    if not module.stats_ready:
        raise ValueError(f"checkpoint {path} ({kind}) has no fitted scoring statistics; use the checkpoint "
                         "written after fit (checkpoints/last.ckpt of a finished run)")  # fmt: skip
    return module.eval()


def output_names(scorer: nn.Module, n_outputs: int) -> list[str]:
    names = list(getattr(scorer, "output_names", OUTPUT_NAMES))
    names += [f"extra_{i}" for i in range(len(names), n_outputs)]
    return names[:n_outputs]


def export_onnx(module: AnomalyModule, path: str | Path, opset: int = 17, checkpoint: str = "") -> list[str]:
    """Write the module's scorer as ONNX with dynamic batch and ebmad metadata; returns the output names."""
    onnx = require_export_extra("onnx")
    hp = module.hparams
    scorer = module.scorer().cpu().eval()
    dummy = torch.rand(2, hp.in_channels, hp.image_size, hp.image_size) * 2 - 1
    with torch.no_grad():
        outputs = scorer(dummy)
    names = output_names(scorer, len(outputs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the TorchScript exporter: no onnxscript dependency, deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # strided slices
        torch.onnx.export(
            scorer, (dummy,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *names)}, opset_version=opset,
        )  # fmt: skip
    model = onnx.load(str(path))
    meta = {
        "ebmad_model_type": module.MODEL_TYPE,
        "image_size": hp.image_size,
        "in_channels": hp.in_channels,
        "image_score": module.DEFAULT_IMAGE_SCORE,
        "pixel_map": module.DEFAULT_PIXEL_MAP,
        "image_threshold": float(module.image_threshold),
        "pixel_threshold": float(module.pixel_threshold),
        "threshold_fit": json.dumps(module.threshold_fit),
        "checkpoint": checkpoint,
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return names


def onnx_session(path: str | Path) -> Any:
    """An onnxruntime session on the CPU for an exported model."""
    ort = require_export_extra("onnxruntime")
    if not Path(path).is_file():
        raise FileNotFoundError(f"onnx_path={path} does not exist (write it with python -m ebmad.export)")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def verify_onnx(module: AnomalyModule, path: str | Path, batch: int = 3, rtol: float = 1e-4,
                atol: float = 1e-4) -> float:  # fmt: skip
    """Max abs difference of onnxruntime's map and score from ``module.score`` on a random batch."""
    hp = module.hparams
    x = torch.rand(
        batch, hp.in_channels, hp.image_size, hp.image_size, generator=torch.Generator().manual_seed(0)
    )
    x = x * 2 - 1
    images, maps = module.cpu().score(x)
    pixel_map, image_score = onnx_session(path).run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    worst = 0.0
    for name, ref, got in (("pixel_map", maps[module.DEFAULT_PIXEL_MAP], pixel_map),
                           ("image_score", images[module.DEFAULT_IMAGE_SCORE], image_score)):  # fmt: skip
        ref = ref.detach().numpy()
        if got.shape != ref.shape or not np.allclose(got, ref, rtol=rtol, atol=atol):
            diff = np.abs(got - ref).max() if got.shape == ref.shape else math.inf
            raise RuntimeError(f"ONNX export {path}: {name} differs from PyTorch (max abs diff {diff:.3g}, "
                               f"shapes {got.shape} vs {ref.shape})")  # fmt: skip
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def copy_thresholds_file(ckpt_path: str | Path, onnx_path: Path, image_score: str) -> Path | None:
    """The checkpoint's calibrated thresholds file, checked and re-keyed to the ONNX model beside it."""
    source = thresholds_file_for(ckpt_path)
    if not source.is_file():
        return None
    record = read_thresholds_file(source, ckpt_path, image_score)
    record.update(model=str(onnx_path), model_sha256=file_sha256(onnx_path), calibrated_for=str(ckpt_path))
    target = thresholds_file_for(onnx_path)
    write_thresholds_file(target, record)
    return target
