"""Build a run's parts from its config: datamodule, model, callbacks, loggers; and the config checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from ebmad.data import AnomalyDataModule
from ebmad.data.synthetic import generate_category
from ebmad.models import AnomalyModule
from ebmad.run.jobs import wandb_run_id
from ebmad.run.metadata import PROJECT_ROOT
from ebmad.run.quiet import quiet_wandb_logger

DataModule = AnomalyDataModule  # one datamodule for every dataset layout (ebmad.data)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising our own configuration errors unwrapped (they name the key)."""
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, ValueError | OSError):
            raise exc.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig) -> DataModule:
    """Instantiate the datamodule; writes the synthetic category first when ``data.synthetic`` is set."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    synth = data_cfg.pop("synthetic", None)
    if synth:
        generate_category(data_cfg["root"], data_cfg["category"], **synth)
    return instantiate(data_cfg)


def build_model(cfg: DictConfig, dm: DataModule) -> AnomalyModule:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if model_cfg.get("in_channels") in (None, "auto"):
        model_cfg["in_channels"] = dm.num_channels
    return instantiate(model_cfg)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]


def build_loggers(cfg: DictConfig, out: Path, model_type: str = "ebm") -> list[Any]:
    """The configured loggers; a W&B run is named ``<name>-<model>`` and tagged with the model type, so the
    models of one sweep (one W&B group) can be told apart and compared."""
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c or "_target_" not in c:
            continue
        if c._target_.endswith("WandbLogger"):
            tags = [*(c.get("tags") or []), f"model:{model_type}"]
            loggers.append(quiet_wandb_logger(instantiate(c, id=wandb_run_id(out), resume="allow",
                                                          name=f"{c.name}-{model_type}", tags=tags)))  # fmt: skip
        else:
            loggers.append(instantiate(c))
    return loggers


def check_config(cfg: DictConfig) -> None:
    """Reject settings that would give silently wrong numbers."""
    if cfg.trainer.get("inference_mode", True):
        raise ValueError(
            "trainer.inference_mode must be false: gradient-map scores need autograd at test time"
        )
    if not cfg.train and cfg.test and not cfg.get("ckpt_path"):
        raise ValueError("train=false test=true needs ckpt_path=<path to a checkpoint written after fit>")
    # an existing ckpt_path was validated (and the config aligned with it) by
    # ebmad.run.restore.adopt_checkpoint_settings before this check
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")


def config_model_type(cfg: DictConfig) -> str:
    """The model type the config selects (``model=...``)."""
    target = str(cfg.model.get("_target_", ""))
    module, _, cls = target.rpartition(".")
    try:
        return hydra.utils.get_class(target).MODEL_TYPE
    except Exception as exc:
        raise ValueError(f"model._target_={target!r} is not an ebmad model ({module}.{cls})") from exc


def compose_config(output_dir: Path, overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed as ``python -m ebmad.train`` would, with the run folder ``output_dir``: for
    tests and benchmarks that call :func:`ebmad.train.run` in this process."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(PROJECT_ROOT)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(PROJECT_ROOT)
        del cfg["hydra"]
    return cfg
