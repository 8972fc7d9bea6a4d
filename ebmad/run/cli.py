"""The command line's front door: settings checked against the real config, errors as one clear line.

- :func:`check_overrides` runs before Hydra: every ``key=value`` must name an existing setting of the
  composed config (with the command line's group choices applied) and every ``group=option`` an existing
  option; otherwise one line says which and suggests the closest real name ("did you mean ..."). Adding a
  new key on purpose stays possible with ``+key=value``.
- :func:`report_error`: ebmad's own errors (bad data, config values, checkpoints: ``ValueError`` and
  ``OSError`` and their subclasses ``DatasetError``, ``CheckpointError``) are logged as one line with the run
  folder; the traceback only with ``HYDRA_FULL_ERROR=1`` or ``debug=...`` (``full_traceback: true``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ebmad.run.metadata import did_you_mean

log = logging.getLogger("ebmad")
USER_ERRORS = (ValueError, OSError)


class UnknownSetting(ValueError):
    """A command-line override names a setting or option that the config does not have."""


def _group_options(conf_dir: Path, group: str) -> list[str] | None:
    """The options of config group ``group`` (``conf/<group>/*.yaml``), or None if it is no group."""
    folder = conf_dir / group
    if not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (containers and leaves)."""
    out = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            out.append(full)
            try:
                child = node._get_node(k)
            except Exception:
                continue
            if isinstance(child, DictConfig):
                out += _keys(child, f"{full}.")
    return out


def check_overrides(args: list[str], conf_dir: Path, config_name: str) -> None:
    """Raise :class:`UnknownSetting` for an override naming no setting / option of the composed config.

    Only plain ``key=value`` and ``group=option`` overrides are checked (``+``/``++``/``~`` and ``hydra.*`` are
    Hydra's business); anything this check cannot parse or compose is left to Hydra's own errors.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags = {"-m", "--multirun", "-c", "--cfg", "--info", "--resolve", "-p", "--package"}
    plain = [a for a in args if "=" in a and not a.startswith("-") and a.split("=")[0] not in flags]
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception:
        return
    choices: list[str] = []
    keys = []
    for o in overrides:
        name = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or name.startswith("hydra") or o.package:
            continue
        options = _group_options(conf_dir, name)
        if options is None:
            keys.append((name, o.input_line))
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(o.value())]
        for v in values:
            if v not in (*options, "null"):
                raise UnknownSetting(f"unknown option {name}={v} (in '{o.input_line}'); options of '{name}': "
                                     f"{', '.join(options)}{did_you_mean(v, options, prefix=f'{name}=')}")  # fmt: skip
        choices.append(f"{name}={values[0]}")
    if not keys:
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=choices)
    except Exception:
        return
    finally:
        GlobalHydra.instance().clear()
    for key, line in keys:
        if OmegaConf.select(cfg, key, default="__missing__", throw_on_missing=False) != "__missing__":
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig):
            hint = did_you_mean(leaf, [str(k) for k in node.keys()], prefix=f"{parent}." if parent else "")
        else:
            hint = did_you_mean(key, _keys(cfg))
        raise UnknownSetting(f"unknown setting '{key}' (in '{line}'){hint} To add a new key on purpose, "
                             f"write +{line}")  # fmt: skip


def full_traceback(cfg: DictConfig | None = None) -> bool:
    """Whether errors keep their traceback: ``HYDRA_FULL_ERROR=1`` or ``full_traceback: true`` (``debug=``)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    return bool(cfg is not None and OmegaConf.select(cfg, "full_traceback", default=False))


def report_error(exc: BaseException, out: str | Path | None) -> None:
    """One line on stderr (and in the run's log file): the error and the run folder."""
    where = f" (run folder: {out})" if out else ""
    line = f"{type(exc).__name__}: {exc}{where}"
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:  # the log file only: the console gets the stderr line
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"error: {line}", file=sys.stderr, flush=True)


def front_door(args: list[str], conf_dir: Path, config_name: str) -> None:
    """:func:`check_overrides`, exiting with status 2 and one line on a bad override."""
    try:
        check_overrides(args, conf_dir, config_name)
    except UnknownSetting as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
