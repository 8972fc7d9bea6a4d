"""Checkpoints that survive a kill at any moment, and clear errors for the ones that did not.

- :class:`AtomicCheckpointIO` (Lightning plugin) and :func:`atomic_torch_save` write to a temporary
  file in the target's folder, flush and fsync it, ``os.replace`` it onto the final name and fsync the
  folder: whenever the process dies, the final name holds the old file or the new one, never a part.
- :func:`load_checkpoint_file` is the one way ebmad reads a checkpoint or statistics file: ``torch.load``
  with ``weights_only=True`` (tensors and plain containers only; the allowlist ``ALLOWED_GLOBALS`` of extra
  types is empty because ebmad writes nothing else). A file whose pickle names any other type (a class, a
  function such as ``os.system``) is refused with :class:`UnsafeCheckpointError` naming the file and the
  types, and nothing in it runs. Lightning's loaders are routed through it (``AtomicCheckpointIO`` and
  :func:`load_module_checkpoint`).
- :func:`validate_checkpoint` loads a checkpoint or raises :class:`CheckpointError` saying which file
  and what is wrong (missing, empty, not a checkpoint, truncated, unsafe, another model type or size).
- :func:`pick_resume_checkpoint` chooses the newest valid checkpoint of a folder and sets damaged
  ones aside as ``<name>.damaged-<timestamp>``.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
DAMAGED_MARK = ".damaged-"
LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


# Types beyond torch's weights-only defaults (tensors, dicts, lists, tuples, OrderedDict, Counter, numbers,
# strings, torch dtypes/devices/sizes) that an ebmad checkpoint may hold: none. Hyperparameters are
# written as plain containers (configs are converted with ``_convert_="all"`` before instantiation).
ALLOWED_GLOBALS: tuple[Any, ...] = ()


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or was written by another model configuration.

    ``damaged`` is True when the file itself is broken (missing, empty, truncated, not a checkpoint)
    and False when it is a sound checkpoint of another model type or size.
    """

    def __init__(self, message: str, damaged: bool = True) -> None:
        super().__init__(message)
        self.damaged = damaged


class UnsafeCheckpointError(CheckpointError):
    """A file whose pickle holds types ebmad never writes (classes, functions): refused unopened."""

    def __init__(self, path: Path, types: list[str], detail: str = "") -> None:
        names = (
            ", ".join(types) if types else (detail or "an object that is not a tensor or a plain container")
        )
        super().__init__(
            f"refusing to load {path}: it holds {names}, which ebmad checkpoints never contain (only tensors "
            "and plain containers are loaded, so that opening a file can never run code). If you trust its "
            "author, see docs/reliability.md 'Checkpoints from others'",
            damaged=False,
        )
        self.types = types


# ------------------------------------------------------------------------------ writing


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it onto ``path`` durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` that leaves either the old or the new file at ``path``, whenever it is killed."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_module_checkpoint(module: Any, path: str | os.PathLike[str]) -> None:
    """A Lightning-format checkpoint (weights, buffers, hyperparameters) of a module fitted without
    ``trainer.fit`` (the fit-only methods): loadable by ``load_from_checkpoint``, predict and export."""
    import pytorch_lightning as pl

    ckpt: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
    }
    module.on_save_checkpoint(ckpt)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(ckpt, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, fsynced checkpoint writes; load errors name the file.

    Use as ``pl.Trainer(plugins=[AtomicCheckpointIO()])``. Remote paths (``s3://`` ...) fall back to
    Lightning's own transaction-based writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:  # fmt: skip
        """Always weights-only (``weights_only=False`` is refused): see :func:`load_checkpoint_file`."""
        if weights_only is False:
            raise ValueError("ebmad never loads checkpoints with weights_only=False")
        if "://" in str(path):
            with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return load_checkpoint_file(path, map_location=map_location)


# ------------------------------------------------------------------------------ reading


def _describe_head(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON or other text"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return f"unknown content starting with {head[:8]!r}"


def _diagnose(path: Path) -> None:
    """Raise :class:`CheckpointError` if the file is not a complete torch file; return if it looks sound."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write was interrupted; delete it")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK\x03\x04"):  # torch's zip format (torch >= 1.6)
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path} is truncated or damaged ({size} bytes, the zip directory at its end is "
                "missing): its write was interrupted or the copy is incomplete; delete it or use an older one"
            )
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is damaged ({size} bytes): {exc}") from exc
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no data.pkl inside)")
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: entry {bad} fails its CRC check")
        return
    if head[:1] != b"\x80":  # neither zip nor the legacy pickle format
        raise CheckpointError(f"{path} is not a torch checkpoint: it looks like {_describe_head(head)}")


def _unsafe_globals(path: Path) -> list[str]:
    """The non-allowed globals a zip-format torch file's pickle names (read without unpickling)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy format or damaged: the load's own error tells
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    return [n for n in names if n not in allowed]


def load_checkpoint_file(path: str | os.PathLike[str], map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint or statistics file that can never run code (weights only).

    Raises :class:`UnsafeCheckpointError` naming the file and the types when its pickle holds anything
    but tensors and plain containers (checked before unpickling, and enforced by the weights-only
    unpickler), :class:`CheckpointError` when it is missing, damaged or not a torch file.
    """
    path = Path(path)
    unsafe = _unsafe_globals(path) if path.is_file() else []
    if unsafe:
        raise UnsafeCheckpointError(path, unsafe)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text.lower() or "global" in text.lower():  # the restricted unpickler refused it
            raise UnsafeCheckpointError(path, [], text.split("\n")[0][:300]) from None
        raise _load_error(path, exc) from exc
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (*LOAD_ERRORS, AttributeError, ImportError, TypeError) as exc:
        raise _load_error(path, exc) from exc


def _load_error(path: Path, exc: BaseException) -> CheckpointError:
    try:
        _diagnose(path)  # says what is wrong with the file, if it can tell
    except CheckpointError as err:
        return err
    return CheckpointError(
        f"checkpoint {path} cannot be loaded (truncated or damaged?): {type(exc).__name__}: {exc}"
    )


def validate_checkpoint(
    path: str | os.PathLike[str],
    expected_model_type: str | None = None,
    image_size: int | None = None,
    in_channels: int | None = None,
) -> dict[str, Any]:
    """Load a Lightning checkpoint (on the CPU) or raise :class:`CheckpointError` naming the file and the problem.

    ``expected_model_type`` (``ebm``, ``draem``, ...; checkpoints without the ``ebmad_model_type`` key
    are EBMs), ``image_size`` and ``in_channels`` are compared when given.
    """
    path = Path(path)
    _diagnose(path)
    ckpt = load_checkpoint_file(path, map_location="cpu")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is a torch file but not an ebmad Lightning checkpoint: no {' / '.join(missing)} "
            f"(keys: {sorted(map(str, ckpt))[:10]})"
        )
    kind = str(ckpt.get("ebmad_model_type", "ebm"))
    if expected_model_type is not None and kind != expected_model_type:
        raise CheckpointError(
            f"checkpoint {path} was written by model type '{kind}', expected '{expected_model_type}' "
            f"(model={expected_model_type}); use model={kind} or another checkpoint",
            damaged=False,
        )
    hp = ckpt["hyper_parameters"]
    for key, want in (("image_size", image_size), ("in_channels", in_channels)):
        have = hp.get(key)
        if want is not None and have is not None and int(have) != int(want):
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={have} but {key}={want} is expected "
                f"(data.image_size / data.channels); it is {hp.get('in_channels')}x{hp.get('image_size')}"
                f"x{hp.get('image_size')}",
                damaged=False,
            )
    return ckpt


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The ``global_step`` a checkpoint was written at (weights-only, memory-mapped read)."""
    return int(load_checkpoint_file(path, map_location="cpu", mmap=True)["global_step"])


def load_module_checkpoint(cls: Any, path: str | os.PathLike[str], map_location: Any = "cpu",
                           **kwargs: Any) -> Any:  # fmt: skip
    """``cls.load_from_checkpoint`` (a LightningModule class), weights only; unsafe files are refused unopened."""
    unsafe = _unsafe_globals(Path(path))
    if unsafe:
        raise UnsafeCheckpointError(Path(path), unsafe)
    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
        return cls.load_from_checkpoint(str(path), map_location=map_location, weights_only=True, **kwargs)


def set_aside(path: Path, reason: str) -> Path | None:
    """Rename a damaged file to ``<name>.damaged-<timestamp>`` (never overwriting), with a warning."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}{DAMAGED_MARK}{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{DAMAGED_MARK}{stamp}-{n}")
        n += 1
    try:
        path.rename(target)
    except FileNotFoundError:  # another process (DDP rank) moved it first
        return None
    log.warning("damaged checkpoint %s set aside as %s: %s", path, target.name, reason)
    return target


def pick_resume_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    expected_model_type: str | None = None,
    image_size: int | None = None,
    in_channels: int | None = None,
) -> Path | None:
    """The newest valid checkpoint in ``ckpt_dir`` (``last.ckpt`` first, then others by mtime), or None.

    Damaged ones are renamed aside (see :func:`set_aside`) and the next is tried; leftover temporary
    files of interrupted atomic writes are removed. A sound checkpoint of another model type or size
    raises :class:`CheckpointError`: the folder belongs to another configuration.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        log.info("removing %s, left by an interrupted checkpoint write", tmp)
        tmp.unlink(missing_ok=True)
    found = [p for p in folder.glob("*.ckpt") if p.is_file()]
    last = [p for p in found if p.name == "last.ckpt"]
    others = sorted((p for p in found if p.name != "last.ckpt"), key=_mtime, reverse=True)
    for path in (*last, *others):
        try:
            validate_checkpoint(path, expected_model_type, image_size, in_channels)
        except CheckpointError as exc:
            if not exc.damaged:
                raise
            if path.exists():
                set_aside(path, str(exc))
            continue
        return path
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("-inf")
