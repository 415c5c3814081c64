"""Atomic, ``weights_only``-loadable checkpoints and the RNG state needed to resume exactly.

A checkpoint is a dict of tensors and plain python values (dict, list, tuple, str, int, float,
bool, None), so ``torch.load(path, weights_only=True)`` reads it without running any pickled
code. It is written to a hidden temporary file in the same directory, flushed to disk, then
renamed over the target: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
import torch.distributed as torch_dist
from torch import nn

from scmc_runtime.distributed import is_distributed

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "STAGES_FORMAT",
    "older_layout",
    "unwrap",
    "save_checkpoint",
    "load_checkpoint",
    "model_signature",
    "check_checkpoint",
    "load_weights",
    "find_latest",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
]

PathLike = Union[str, "os.PathLike[str]"]
_TEMP_SUFFIX = ".tmp"
# The layout of the dicts train.py writes; a reader refuses a newer one. 1: "format", "signature".
# 2: the model entry of a package whose template repeats a block holds its stages as nn.Sequential
# (`backbone.blocks1.0.fc1.weight`, was `backbone.block2.fc1.weight`): scmc's model format 2.
FORMAT_VERSION = 2
# The first format whose model entry has the nn.Sequential stages.
STAGES_FORMAT = 2
# What --resume needs besides the weights (best.pt holds the weights and metrics only).
RESUME_KEYS = ("model", "backward", "epoch", "step_in_epoch", "global_step", "best", "rng")
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
            model = cast(nn.Module, model._orig_mod)
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
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask
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


def _umask() -> int:
    """The process umask (read without changing it where Linux reports it, else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    """Read a checkpoint with ``weights_only=True``; raise ``CheckpointError`` naming the file if it cannot.

    The message is one line saying what is wrong: missing, not a ``torch.save`` archive,
    truncated or corrupt, or holding pickled Python objects (which are never loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not _is_complete(path):
        if _starts_like_zip(path):
            raise CheckpointError(f"{path}: the checkpoint is truncated (an interrupted write or copy)")
        raise CheckpointError(f"{path}: not a checkpoint (not a torch.save archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... depending on the damage
        text = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{path}: the checkpoint holds Python objects ({found.group(1)}); only tensors and plain "
                "values are loaded (weights_only), so it is refused"
            ) from None
        reason = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise CheckpointError(f"{path}: the checkpoint is corrupt ({reason[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict at the top of the checkpoint, found {type(state).__name__}")
    return state


def _starts_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def model_signature(state_dict: Mapping[str, Any]) -> str:
    """A digest of a state dict's key names, shapes and dtypes (not its values): 16 hex digits.

    Two models have the same signature exactly when one's weights load into the other strictly.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
        dtype = str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__
        digest.update(f"{key}\t{shape}\t{dtype}\n".encode())
    return digest.hexdigest()[:16]


def _difference(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    """One example of how two state dicts differ, for a message."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    for key in sorted(set(expected) & set(found)):
        a, b = expected[key], found[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and tuple(a.shape) != tuple(b.shape):
            return f"{key} is {list(b.shape)} there, {list(a.shape)} here"
    if missing:
        return f"{len(missing)} weight(s) missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected weight(s), e.g. {extra[0]}"
    return "the dtypes differ"


def older_layout(version: Any) -> Optional[str]:
    """Why a checkpoint train.py wrote in format VERSION may not fit a model built by a newer scmc;
    None if the format is current (or is no train.py format: a bare state dict has none)."""
    if not isinstance(version, int) or not 1 <= version < STAGES_FORMAT:
        return None
    return (
        f"it is a checkpoint of format {version} (every block its own attribute, e.g. block2), "
        f"this package's model is format {FORMAT_VERSION} (repeated blocks as nn.Sequential stages, e.g. blocks1.0): "
        "use the scmc version that built it, or start from its weights with --init-from (matched by order and shape)"
    )


def check_checkpoint(
    state: Mapping[str, Any],
    path: PathLike,
    *,
    package: Optional[str] = None,
    model: Optional[Mapping[str, Any]] = None,
    require: Sequence[str] = ("model",),
) -> None:
    """Raise ``CheckpointError`` (one line, naming ``path``) unless ``state`` fits this package.

    Checks, in order: the format version is one this runtime reads; ``package`` (when given)
    is the package that wrote it; every key of ``require`` is present (``RESUME_KEYS`` for a
    resume: best.pt holds no optimizer state); ``state["model"]`` is a dict of tensors whose
    names, shapes and dtypes match ``model`` (a state dict of the model about to load it). A
    sharded checkpoint (``--strategy fsdp``: ``state["sharded"]`` names its DCP folder, see
    ``scmc_runtime.fsdp``) holds its model and EMA there; its recorded ``signature`` is compared.
    """
    where = Path(path)
    version = state.get("format", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format {version!r} is newer than this scmc-runtime reads ({FORMAT_VERSION}); "
            "upgrade scmc-runtime"
        )
    written_by = state.get("package")
    if package is not None and written_by is not None and written_by != package:
        raise CheckpointError(f"{where}: a checkpoint of package {written_by}, not of {package}")
    # A sharded checkpoint (--strategy fsdp): its model, EMA and optimizer state are in the DCP
    # shards folder it names (scmc_runtime.fsdp); the file itself carries the model's signature.
    sharded = state.get("sharded") is not None
    missing = [key for key in require if key not in state and not (sharded and key in ("model", "ema"))]
    if missing:
        hint = " (best.pt holds weights only: resume from last.pt)" if "backward" in missing else ""
        raise CheckpointError(f"{where}: the checkpoint has no {', '.join(missing)}{hint}")
    weights = state.get("model")
    if sharded:
        signature = state.get("signature")
        if model is not None and signature != model_signature(model):
            older = older_layout(version)
            if older is not None:
                raise CheckpointError(f"{where}: the checkpoint's model does not fit this package's model: {older}")
            raise CheckpointError(
                f"{where}: the checkpoint's model does not fit this package's model "
                f"(signature {signature}, expected {model_signature(model)})"
            )
    elif "model" in require or weights is not None:
        if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{where}: the checkpoint's model entry is not a dict of tensors")
        if model is not None and model_signature(weights) != model_signature(model):
            older = older_layout(version) if set(weights) != set(model) else None
            if older is not None:
                raise CheckpointError(f"{where}: the checkpoint's model does not fit this package's model: {older}")
            raise CheckpointError(
                f"{where}: the checkpoint's model does not fit this package's model "
                f"(signature {model_signature(weights)}, expected {model_signature(model)}: {_difference(model, weights)})"
            )


def load_weights(path: PathLike, model: nn.Module, *, package: Optional[str] = None, ema: bool = True) -> nn.Module:
    """Load a train.py checkpoint (best.pt or last.pt) into ``model``; returns it, in eval mode.

    ``ema=True`` takes the moving-average weights when the checkpoint has them (what
    validation reported as ``ema_val_*``), else the raw ones. The checkpoint is read with
    ``weights_only=True`` and checked with :func:`check_checkpoint` first.
    """
    state = load_checkpoint(path)
    if state.get("sharded") is not None:  # --strategy fsdp: the weights are in a DCP shards folder
        from scmc_runtime.fsdp import load_consolidated

        state = load_consolidated(path)
    expected = model.state_dict()
    check_checkpoint(state, path, package=package, model=expected)
    weights = state["model"]
    averaged = state.get("ema")
    if ema and isinstance(averaged, Mapping) and model_signature(averaged) == model_signature(expected):
        weights = averaged
    model.load_state_dict(weights)
    return model.eval()


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
    # legacy=True (the default) gives the tuple form; numpy's stubs also allow the dict form
    kind, keys, pos, has_gauss, cached = cast(Tuple[str, Any, int, int, float], numpy.random.get_state())
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
