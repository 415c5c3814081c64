"""Atomic, ``weights_only``-loadable checkpoints and the RNG state needed to resume exactly.

A checkpoint is a dict of tensors and plain python values (dict, list, tuple, str, int, float,
bool, None), so ``torch.load(path, weights_only=True)`` reads it without running any pickled
code. It is written to a hidden temporary file in the same directory, flushed to disk, then
renamed over the target: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as torch_dist
from torch import nn

from scmc_runtime.distributed import is_distributed

__all__ = [
    "CheckpointError",
    "unwrap",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
]

PathLike = Union[str, "os.PathLike[str]"]
_TEMP_SUFFIX = ".tmp"
_PLAIN = (str, int, float, bool, type(None), bytes, torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or holds something other than plain values."""


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under any ``DistributedDataParallel``/``DataParallel`` and ``torch.compile`` wrappers.

    Its ``state_dict()`` keys carry no ``module.`` or ``_orig_mod.`` prefix.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint key at {where} is a {type(key).__name__}, not a plain value")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif type(value) not in _PLAIN and not isinstance(value, torch.Tensor):
        raise TypeError(
            f"checkpoint value at {where} is a {type(value).__module__}.{type(value).__qualname__}; "
            "only tensors and plain python values can be loaded with weights_only=True"
        )


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same directory, fsync, rename).

    Raises ``TypeError`` before writing anything if ``state`` holds a value that
    ``torch.load(weights_only=True)`` would refuse. On any error the target is left untouched
    and the temporary file is removed.
    """
    path = Path(path)
    _check_plain(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raise ``CheckpointError`` naming the file if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... depending on the damage
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: cannot load checkpoint, the file is truncated, corrupt or not a weights-only "
            f"checkpoint ({reason}). Delete it to resume from an earlier one."
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict at the top of the checkpoint, found {type(state).__name__}")
    return state


def _is_complete(path: Path) -> bool:
    # torch.save writes a zip archive; a truncated one has no end-of-central-directory record.
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def find_latest(directory: PathLike, pattern: str = "*.pt") -> Optional[Path]:
    """The most recently written complete checkpoint in ``directory``, or None.

    Temporary files of interrupted writes are ignored, and so are files that are not a
    complete ``torch.save`` archive. Ties in modification time go to the larger name, so
    zero-padded step numbers (``step-00001200.pt``) order correctly.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [
        path
        for path in directory.glob(pattern)
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(_TEMP_SUFFIX)
    ]
    candidates.sort(key=lambda path: (path.stat().st_mtime_ns, path.name), reverse=True)
    for path in candidates:
        if _is_complete(path):
            return path
    return None


# ---------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> Dict[str, Any]:
    """This process's RNG states (python, torch CPU, current CUDA device, numpy) as plain values/tensors."""
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = numpy.random.get_state()
    state["numpy"] = {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype("int64")),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured; parts absent from ``state`` are left alone."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    if "numpy" in state:
        try:
            import numpy
        except ImportError:
            return
        saved = state["numpy"]
        keys = saved["keys"].cpu().numpy().astype(numpy.uint32)
        numpy.random.set_state((saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's :func:`rng_state`, indexed by rank (a collective: every rank must call it).

    Rank 0 saves the list; on resume each rank restores ``states[rank]``.
    """
    local = rng_state()
    if not is_distributed():
        return [local]
    gathered: List[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, local)
    return gathered
