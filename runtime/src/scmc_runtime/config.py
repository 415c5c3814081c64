"""Configuration of a training run: a dataclass whose fields are the command-line flags.

:func:`flag` declares a field with its ``--help``; :func:`parse_config` turns ``argv`` into the
dataclass; :func:`validate_config` checks every flag before anything is created.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import torch

from scmc_runtime.errors import UsageError

__all__ = ["flag", "config_parser", "parse_config", "validate_config", "COMPILE_MODES"]

T = TypeVar("T")
C = TypeVar("C")


def flag(default: T, help: str) -> T:
    """A dataclass field with a default and the ``--help`` text of its flag."""
    return dataclasses.field(default=default, metadata={"help": help})


def _unwrap_optional(annotation: Any) -> Tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType":
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return annotation, False


def config_parser(
    cls: Type[Any], description: Optional[str] = None, prog: Optional[str] = None
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls``.

    ``epochs: int`` becomes ``--epochs N``; ``bool`` fields get both ``--ema`` and ``--no-ema``;
    ``tuple[float, ...]``/``list[...]`` take several values; ``Optional[X]`` accepts ``none``.
    Help text comes from :func:`flag`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        annotation, optional = _unwrap_optional(hints[field.name])
        origin = typing.get_origin(annotation)
        kwargs: Dict[str, Any] = {"dest": field.name, "default": default, "help": help_text}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (tuple, list, Sequence):
            item = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
            kwargs.update(nargs="+", type=item)
        elif annotation in (int, float, str):
            kwargs["type"] = _optional(annotation) if optional else annotation
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: cannot make a flag for type {annotation!r}")
        parser.add_argument(name, **kwargs)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help (unless the help already says it); the description keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        if "(default" in text or action.default in ("", None):
            return text
        return super()._get_help_string(action)


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def parse_config(
    cls: Type[C], argv: Optional[Sequence[str]] = None, description: Optional[str] = None, prog: Optional[str] = None
) -> C:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into an instance of the dataclass ``cls``."""
    namespace = config_parser(cls, description, prog).parse_args(argv)
    values = vars(namespace)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]  # C is unbound; cls is a config dataclass
        if isinstance(field.default, tuple) and isinstance(values[field.name], list):
            values[field.name] = tuple(values[field.name])
    return cls(**values)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def _device_problem(device: str) -> Optional[str]:
    if device in ("auto", "cpu"):
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        return "must be auto, cpu, cuda or cuda:N"
    if resolved.type != "cuda":
        return "must be auto, cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return "no CUDA device is available here; use --device cpu (or auto)"
    count = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    index = resolved.index if resolved.index is not None else local_rank
    if index >= count:
        return f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return None


def validate_config(
    cfg: Any,
    *,
    losses: Sequence[str] = (),
    metrics: Sequence[str] = (),
    world_size: Optional[int] = None,
) -> None:
    """Check every flag of a generated ``TrainConfig`` before anything is created; raise one ``UsageError``.

    Ranges, choices and combinations, the device really present, and ``best_metric`` among the
    names validation reports (``val_<loss or metric>``, ``ema_val_...`` with EMA,
    ``train_...``). Every problem is listed, one line each, naming the flag and what it accepts.
    Fields a config does not have are skipped.
    """
    values = dataclasses.asdict(cfg)
    problems: List[str] = []
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)

    def bad(name: str, message: str) -> None:
        problems.append(f"{_flag(name)} {_shown(values[name])}: {message}")

    at_least = {
        "epochs": 1,
        "batch_size": 1,
        "image_size": 1,
        "log_every": 1,
        "max_steps": 0,
        "max_val_steps": 0,
        "workers": 0,
        "threads": 0,
        "save_every": 0,
        "translate": 0,
    }
    for name, low in at_least.items():
        if name in values and values[name] < low:
            bad(name, f"must be at least {low}" + (" (0: all)" if name in ("max_steps", "max_val_steps") else ""))
    if values.get("batch_size", 0) >= 1 and world > 1 and values["batch_size"] % world:
        bad("batch_size", f"the global batch must be a multiple of the {world} ranks")
    for name in ("mean", "std"):
        if name in values and len(values[name]) != 3:
            bad(name, "give 3 values, one per RGB channel")
    if "std" in values and any(v <= 0 for v in values["std"]):
        bad("std", "every value must be positive")
    if "ema_decay" in values and not 0.0 <= values["ema_decay"] < 1.0:
        bad("ema_decay", "must be in [0, 1), e.g. 0.9998")
    if "best_mode" in values and values["best_mode"] not in ("max", "min"):
        bad("best_mode", "must be max or min")
    if "compile_mode" in values and values["compile_mode"] not in COMPILE_MODES:
        bad("compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
    if "device" in values:
        problem = _device_problem(values["device"])
        if problem:
            bad("device", problem)
    if values.get("data") and values.get("timm_dataset"):
        problems.append("--data and --timm-dataset: pass one data source, not both")
    if values.get("data"):
        root = Path(values["data"])
        if not root.is_dir():
            bad("data", "no such folder" if not root.exists() else "not a folder")
    resume = values.get("resume", "")
    if resume and resume != "auto" and not Path(resume).is_file():
        bad("resume", "no such checkpoint file (or pass auto: the newest last.pt of the run)")
    if values.get("fresh") and resume:
        problems.append(f"--fresh and --resume {resume}: --fresh starts a new run, --resume continues one")
    run_name = values.get("run_name", "")
    if run_name and (run_name in (".", "..") or "/" in run_name or os.sep in run_name):
        bad("run_name", "must be a folder name inside --out, without / or ..")
    out = Path(values.get("out", "") or ".")
    if out.exists() and not out.is_dir():
        bad("out", "exists and is not a folder")
    if "best_metric" in values and (losses or metrics):
        names = [f"val_{n}" for n in (*losses, *metrics)]
        if values.get("ema", False):
            names += [f"ema_val_{n}" for n in (*losses, *metrics)]
        names += [f"train_{n}" for n in (*losses, *metrics)]
        if values["best_metric"] not in names:
            bad("best_metric", f"must be one of {', '.join(names)}")
    if problems:
        if len(problems) == 1:
            raise UsageError(problems[0])
        raise UsageError(f"{len(problems)} problems with the flags:\n  " + "\n  ".join(problems))
