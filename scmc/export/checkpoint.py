"""Reading a checkpoint: ``torch.load(weights_only=True)``, the runtime's checks, the weights to load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from scmc.export.common import _err, _short
from scmc.export.package import _require_path

PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path: Path) -> Any:
    import pickle

    import torch

    path = _require_path(
        path,
        "E1102",
        "checkpoint",
        directory=False,
        hint="training writes <out>/<run>/last.pt and best.pt; pass one of them",
    )
    if path.stat().st_size == 0:
        raise _err("E1103", f"checkpoint `{path}` is empty (0 bytes): truncated or never finished writing", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc).lower() or "weights only" in str(exc).lower():
            raise _err(
                "E1103",
                f"checkpoint `{path}` holds Python objects other than tensors and plain values, "
                "which torch.load(weights_only=True) refuses to run",
                path,
                "save {'model': model.state_dict()} (scmc never loads pickled code)",
            ) from None
        raise _err("E1103", f"checkpoint `{path}` is corrupt: {_short(exc)}", path) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # zip reader errors, EOFError, ...
        raise _err(
            "E1103",
            f"checkpoint `{path}` cannot be read, it is truncated or corrupt ({path.stat().st_size:,} bytes): "
            f"{_short(exc)}",
            path,
            "re-copy it, or use another checkpoint of the run (last.pt / best.pt)",
        ) from None


def consolidate_sharded(obj: Any, path: Path) -> Any:
    """A sharded checkpoint of ``--strategy fsdp`` (a file naming its DCP shards folder) as a plain one, with
    full tensors (``scmc_runtime.fsdp.load_consolidated``); anything else as it is. E1150 if the shards are unusable."""
    if not isinstance(obj, dict) or obj.get("sharded") is None:
        return obj
    from scmc_runtime.checkpoint import CheckpointError
    from scmc_runtime.fsdp import load_consolidated

    try:
        return load_consolidated(path)
    except CheckpointError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "the shards cannot be read"
        message = message[len(f"{path}: ") :] if message.startswith(f"{path}: ") else message
        raise _err(
            "E1150",
            f"checkpoint `{path}`: {message}",
            path,
            "a sharded checkpoint is the file and the shards folder it names, side by side: copy both",
        ) from None


def check_runtime_checkpoint(obj: Any, path: Path, package: str) -> None:
    """E1106 unless the runtime's ``check_checkpoint`` (what train.py's ``--resume`` runs) accepts OBJ.

    It checks the format version and that the checkpoint names this package, if it names one;
    nothing is required (``require=()``), so a bare state_dict passes. Key and shape mismatches
    are left to :func:`load_weights`, whose message names the tensors.
    """
    if not isinstance(obj, dict) or _is_state_dict(obj):
        return  # a bare state_dict: nothing for check_checkpoint to check; other types are E1104 later
    from scmc_runtime.checkpoint import CheckpointError, check_checkpoint

    try:
        # The model entry is select_weights' to judge (E1104 names what it holds instead).
        check_checkpoint({k: v for k, v in obj.items() if k != "model"}, path, package=package, require=())
    except CheckpointError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "the checkpoint was refused"
        prefix = f"{Path(path)}: "
        if message.startswith(prefix):
            message = message[len(prefix) :]
        raise _err(
            "E1106",
            f"checkpoint `{path}`: {message}",
            path,
            "export with the package the checkpoint was trained with (same template and -p parameters)",
        ) from None


def _is_state_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def strip_prefixes(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop DDP/``torch.compile`` wrapper prefixes (``module.``, ``_orig_mod.``) from every key."""
    out, stripped = {}, []
    for key, value in state.items():
        new = key
        while new.startswith(PREFIXES):
            prefix = next(p for p in PREFIXES if new.startswith(p))
            if prefix not in stripped:
                stripped.append(prefix)
            new = new[len(prefix) :]
        out[new] = value
    return out, stripped


def select_weights(obj: Any, weights: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state_dict to export and a description of where it came from."""
    info: dict[str, Any] = {"path": str(path)}
    state: Any  # checked to be a state_dict before it is used
    if isinstance(obj, dict) and "model" in obj and not _is_state_dict(obj):
        info["kind"] = "training checkpoint"
        for key in ("format", "package", "epoch", "global_step"):
            if isinstance(obj.get(key), (str, int)):
                info[key] = obj[key]
        ema = obj.get("ema")
        has_ema = _is_state_dict(ema)
        info["has_ema"] = has_ema
        if weights == "ema" and not has_ema:
            raise _err(
                "E1105",
                f"--ema: checkpoint `{path}` has no EMA weights"
                + (" (`ema` is None: the run trained with --no-ema)" if "ema" in obj and ema is None else ""),
                path,
                "drop --ema to export the trained weights",
            )
        if has_ema and weights != "raw":
            info["weights"] = "ema"
            state = ema
        else:
            info["weights"] = "raw"
            state = obj["model"]
        if not _is_state_dict(state):
            raise _err(
                "E1104",
                f"checkpoint `{path}`: `{info['weights'] if info['weights'] == 'ema' else 'model'}` "
                "is not a state_dict (a mapping of names to tensors)",
                path,
            )
    elif _is_state_dict(obj):
        info["kind"] = "state_dict"
        info["has_ema"] = False
        if weights == "ema":
            raise _err(
                "E1105",
                f"--ema: `{path}` is a bare state_dict, with no EMA weights",
                path,
                "drop --ema to export these weights",
            )
        info["weights"] = "raw"
        state = obj
    else:
        what = type(obj).__name__
        keys = f" with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict) else ""
        raise _err(
            "E1104",
            f"checkpoint `{path}` holds a {what}{keys}: expected a training checkpoint "
            "(a dict with a `model` state_dict) or a state_dict",
            path,
        )
    state, stripped = strip_prefixes(state)
    if stripped:
        info["stripped_prefixes"] = stripped
    return state, info


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(f"`{i}`" for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_weights(model: Any, state: dict[str, Any], checkpoint: Path, package: str, ckpt_info: dict[str, Any]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape (checkpoint vs model): {_few(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        other = ckpt_info.get("package")
        origin = f" (it was written by package `{other}`)" if isinstance(other, str) and other != package else ""
        from scmc_runtime.checkpoint import older_layout

        older = older_layout(ckpt_info.get("format"))
        if older is not None and not mismatched:
            raise _err("E1106", f"checkpoint `{checkpoint}` does not fit package `{package}`: {older}", checkpoint)
        message = (
            f"checkpoint `{checkpoint}` does not fit package `{package}`{origin}: "
            f"{len(state)} tensors in the checkpoint, {len(expected)} in the model; " + "; ".join(parts)
        )
        raise _err(
            "E1106",
            message,
            checkpoint,
            "export with the package the checkpoint was trained with (same template and -p parameters)",
        )
    model.load_state_dict(state, strict=True)
