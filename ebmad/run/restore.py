"""Models from checkpoints: evaluation (``train=false test=true ckpt_path=...``) and resume (``ckpt_path=...``).

The checkpoint knows what it is: :func:`adopt_checkpoint_settings` takes the model type, its hyperparameters,
the image size and the channels from it, so none needs retyping; a setting given explicitly on the command
line that disagrees with it is an error naming both. At evaluation, scoring options that need no new weights
can be changed (``SCORING_KEYS``); other ``model.*`` settings given explicitly are noted (they are part of the
trained model or only used in training). Loading is weights-only
(:func:`ebmad.reliability.checkpointing.load_module_checkpoint`): a checkpoint never runs code.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ebmad.models import AnomalyModule, model_class
from ebmad.reliability.checkpointing import CheckpointError, load_module_checkpoint, validate_checkpoint
from ebmad.run.builders import DataModule, config_model_type
from ebmad.run.jobs import job_overrides
from ebmad.run.metadata import did_you_mean

log = logging.getLogger("ebmad")


def _explicit(overrides: list[str], key: str) -> str | None:
    """The value given on the command line for ``key`` (``key=v``, ``+key=v``, ``++key=v``), or None."""
    for o in overrides:
        k, sep, v = o.lstrip("+").partition("=")
        if sep and k == key:
            return v
    return None


def adopt_checkpoint_settings(cfg: DictConfig) -> None:
    """Set ``model`` (type and hyperparameters), ``data.image_size`` and ``data.channels`` from ``cfg.ckpt_path``.

    Explicit command-line ``model.<key>=`` overrides stay on top (scoring options, or a resumed run's
    settings); an explicit ``model=``, ``data.image_size=`` or ``data.channels=`` that disagrees with the
    checkpoint raises :class:`CheckpointError` naming both.
    """
    path = cfg.ckpt_path
    ckpt = validate_checkpoint(path)
    kind = str(ckpt.get("ebmad_model_type", "ebm"))
    hp = dict(ckpt["hyper_parameters"])
    overrides = job_overrides()
    asked = _explicit(overrides, "model")
    if asked is not None and config_model_type(cfg) != kind:
        raise CheckpointError(f"checkpoint {path} was written by model type '{kind}' but model={asked} was given; "
                              f"drop model= (the checkpoint's type is used) or give model={kind}", damaged=False)  # fmt: skip
    for key, hp_key in (("data.image_size", "image_size"), ("data.channels", "in_channels")):
        given = _explicit(overrides, key)
        if (
            given is not None
            and given != "null"
            and hp.get(hp_key) is not None
            and int(given) != int(hp[hp_key])
        ):
            raise CheckpointError(f"checkpoint {path} was trained with {hp_key}={hp[hp_key]} but {key}={given} was "
                                  f"given; drop {key} (the checkpoint's value is used)", damaged=False)  # fmt: skip
    cls = model_class(kind)
    model = {"_target_": f"{cls.__module__}.{cls.__qualname__}", **hp}
    for o in overrides:  # explicit model.<key>=... stay (scoring options; noted or refused later)
        k, sep, _ = o.lstrip("+").partition("=")
        key = k.removeprefix("model.")
        if not sep or not k.startswith("model.") or "." in key:
            continue
        if key not in hp:
            raise ValueError(f"{k} is not a setting of the checkpoint's model type '{kind}' ({path})"
                             f"{did_you_mean(key, list(hp), prefix='model.')}")  # fmt: skip
        model[key] = cfg.model[key]
    with open_dict(cfg):
        cfg.model = OmegaConf.create(model)
        if hp.get("image_size") is not None:
            cfg.data.image_size = int(hp["image_size"])
        if hp.get("in_channels") is not None:
            cfg.data.channels = int(hp["in_channels"])
    log.info("checkpoint %s: model=%s at %sx%sx%s (taken from the checkpoint)", path, kind, hp.get("in_channels"),
             hp.get("image_size"), hp.get("image_size"))  # fmt: skip


def load_for_test(cfg: DictConfig, dm: DataModule) -> AnomalyModule:
    """A module from a checkpoint with its own architecture; test-time options from the config.

    The checkpoint was validated and the config aligned with it by :func:`adopt_checkpoint_settings`.
    """
    kind = config_model_type(cfg)
    load = dict(
        pixel_auroc_thresholds=cfg.model.get("pixel_auroc_thresholds"),
        n_examples=cfg.model.get("n_examples", 8),
    )
    model = load_module_checkpoint(model_class(kind), cfg.ckpt_path, **load)
    scoring = scoring_overrides(cfg, model.hparams)
    if scoring:  # built again with them: they decide the module's scores and buffers
        model = load_module_checkpoint(model_class(kind), cfg.ckpt_path, **load, **scoring)
        log.info("checkpoint %s scored with %s (scoring options; the weights are the checkpoint's)", cfg.ckpt_path,
                 ", ".join(f"model.{k}={v!r}" for k, v in scoring.items()))  # fmt: skip
    hp = model.hparams
    if hp.image_size != dm.image_size or hp.in_channels != dm.num_channels:
        raise ValueError(
            f"checkpoint {cfg.ckpt_path} was trained at {hp.in_channels}x{hp.image_size}x{hp.image_size} but "
            f"data.image_size={dm.image_size} with {dm.num_channels} channels"
        )
    ignored = {k: v for k, v in ignored_model_settings(cfg, hp).items() if k not in scoring}
    if ignored:  # explicit model.* overrides that evaluation cannot use: training-only or part of the weights
        log.info("not used at evaluation (training settings or part of the trained model): %s",
                 ", ".join(f"model.{k}={v!r} (checkpoint: {hp[k]!r})" for k, v in ignored.items()))  # fmt: skip
    return model


TEST_TIME_KEYS = ("_target_", "pixel_auroc_thresholds", "n_examples", "in_channels", "image_size", "seed")
# scoring options a trained checkpoint can be scored with (no new weights or buffers); those that change the
# fitted statistics need refit_stats=true
SCORING_KEYS = ("map_sigmas", "default_image_score", "default_pixel_map", "stats_gains")
REFIT_KEYS = ("stats_gains",)


def scoring_overrides(cfg: DictConfig, stored: dict[str, Any]) -> dict[str, Any]:
    """``model.*`` scoring options that differ from the checkpoint's, to score it with (see ``SCORING_KEYS``)."""
    want = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else {}
    have = {k: stored.get(k) for k in SCORING_KEYS if k in want}
    changed = {k: v for k, v in ignored_model_settings(cfg, have).items() if k in SCORING_KEYS}
    need_refit = [k for k in changed if k in REFIT_KEYS]
    if need_refit and not cfg.get("refit_stats"):
        raise ValueError(
            f"{', '.join(f'model.{k}' for k in need_refit)} changes the fitted statistics of checkpoint "
            f"{cfg.ckpt_path}: add refit_stats=true to refit them, or drop the override"
        )
    return changed


def ignored_model_settings(cfg: DictConfig, hp: Any) -> dict[str, Any]:
    """``model.*`` config values that differ from a loaded checkpoint's hyperparameters (which win)."""
    want = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else {}
    out = {}
    for k, v in want.items():
        if k in TEST_TIME_KEYS or k not in hp:
            continue
        have = hp[k]
        same = (
            (list(v) == list(have))
            if isinstance(v, list | tuple) and isinstance(have, list | tuple)
            else v == have
        )
        if not same:
            out[k] = v
    return out
