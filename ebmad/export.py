"""ONNX export of a trained scorer: ``python -m ebmad.export ckpt_path=... output=model.onnx``.

The ONNX model maps an image batch ``image`` (B, C, S, S) in [-1, 1] (dynamic B) to ``pixel_map``
(B, S, S) and ``image_score`` (B,) -- the model's default map and score -- plus extras (the EBM's
``energy``). The model type, input size, score names and the checkpoint's decision thresholds (with how
the label-free image threshold was fitted) are stored as ONNX metadata, so ``python -m ebmad.predict
backend=onnx onnx_path=...`` needs nothing else; a calibrated thresholds file beside the checkpoint
(``<ckpt>.threshold.json``) is copied beside the ONNX model (``<onnx>.threshold.json``), re-keyed to it.
After writing, the export is checked against PyTorch's own scoring on a random batch. The export itself and
its checks are in :mod:`ebmad.deploy.onnx`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ebmad.deploy.onnx import INPUT_NAME, copy_thresholds_file, export_onnx, load_module, verify_onnx
from ebmad.run.cli import USER_ERRORS, front_door, full_traceback, report_error
from ebmad.train import CONF_DIR


def export(cfg: DictConfig) -> Path:
    """Load ``cfg.ckpt_path``, write ``cfg.output`` (default: beside the checkpoint), verify it."""
    module = load_module(cfg.ckpt_path)
    out = Path(cfg.output) if cfg.get("output") else Path(cfg.ckpt_path).with_suffix(".onnx")
    names = export_onnx(module, out, opset=cfg.opset, checkpoint=str(cfg.ckpt_path))
    copied = copy_thresholds_file(cfg.ckpt_path, out, module.DEFAULT_IMAGE_SCORE)
    diff = verify_onnx(module, out) if cfg.verify else float("nan")
    hp = module.hparams
    print(f"EXPORT model={module.MODEL_TYPE} input={INPUT_NAME}:(B,{hp.in_channels},{hp.image_size},"
          f"{hp.image_size}) outputs={','.join(names)} max_abs_diff={diff:.3g} out={out}"
          + (f" thresholds_file={copied}" if copied else ""), flush=True)  # fmt: skip
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except USER_ERRORS as exc:  # ebmad's own errors (checkpoint, config): one line
        if full_traceback():
            raise
        report_error(exc, cfg.get("output"))
        raise SystemExit(1) from None


def main() -> None:
    """``python -m ebmad.export`` / ``ebmad-export``: settings checked first (did you mean ...), then Hydra."""
    front_door(sys.argv[1:], CONF_DIR, "export")
    hydra_main()


if __name__ == "__main__":
    main()
