"""Schemas of the rendered non-graph templates, and pydantic errors mapped back to YAML positions.

A preset (dataset, EMA, compile) is validated here with a pydantic model whose unknown keys
are errors (``extra="forbid"``): every key a preset may hold is read by someone (the
generated train.py, predict.py or ``scmc export``), so a key nobody reads is reported instead
of being dropped. Each validation error becomes a :class:`Diagnostic` at the position of the
offending key (:func:`locate`), with a did-you-mean hint for misspelled keys.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from scmc.diagnostics import Diagnostic, Span, did_you_mean
from scmc.load import LDict, LList


def locate(tree: Any, loc: tuple, default: Span) -> Span:
    """The span of the value at a pydantic error location."""
    node, span = tree, default
    for part in loc:
        if isinstance(node, LDict) and part in node:
            span = node.key_span(part) if not isinstance(node[part], (LDict, LList)) else node[part].span
            node = node[part]
        elif isinstance(node, LList) and isinstance(part, int) and part < len(node):
            span = node.item_span(part)
            node = node[part]
        else:
            break
    return span


def validation_diagnostics(
    exc: ValidationError,
    tree: Any,
    default: Span,
    what: str,
    code: str,
    known: Callable[[tuple], Sequence[str]],
) -> list[Diagnostic]:
    """One diagnostic per pydantic error; ``known(loc)`` lists the keys allowed where an unknown one was."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or what
        kind = err["type"]
        if kind == "extra_forbidden":
            keys = tuple(known(loc[:-1]))
            message = f"unknown key `{loc[-1]}` in {what}"
            hint = did_you_mean(str(loc[-1]), keys) or f"known keys: {', '.join(keys)}"
        elif kind == "missing":
            message, hint = f"{what} needs `{path}`", ""
        else:
            message, hint = f"`{path}`: {err['msg']}", ""
        out.append(Diagnostic(code, message, locate(tree, loc, default), hint))
    return out


# --------------------------------------------------------------------------- presets


class DatasetPreset(BaseModel):
    """``--dataset`` / ``PACKAGE: {DATASET: ...}``: where train.py's images come from and how they look."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["digits", "image_folder", "timm", "image_table"]  # digits: the embedded 8x8 digits
    name: str | None = None  # timm only: the timm dataset name, e.g. torch/cifar10
    root: str | None = None  # image_folder: the folder with train/ and val/; timm: the cache folder
    image_size: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    epochs: PositiveInt | None = None
    workers: NonNegativeInt | None = None
    mean: tuple[float, ...] | None = Field(default=None, min_length=1)
    std: tuple[float, ...] | None = Field(default=None, min_length=1)
    num_classes: PositiveInt | None = None  # checked against the model's output by the link stage
    classes: tuple[str, ...] | None = None  # class labels, for predict.py and `scmc export`
    targets: Literal["class", "soft"] = "class"  # soft: the loss is fed one-hot probabilities
    # image_table (images + a row of features and regression targets each; scmc/link.py checks the wiring)
    num_features: PositiveInt | None = None  # the model's second input: a vector of this many values
    num_targets: PositiveInt | None = None  # the regression targets the loss takes as `target`


class EmaPreset(BaseModel):
    """``PACKAGE: {EMA: ...}``: defaults of train.py's EMA flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    warmup: bool | None = None


class CompilePreset(BaseModel):
    """``PACKAGE: {COMPILE: ...}``: defaults of train.py's torch.compile flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None


PRESETS: dict[str, type[BaseModel]] = {"dataset": DatasetPreset, "ema": EmaPreset, "compile": CompilePreset}

# preset field -> the generated train.py's TrainConfig field it sets the default of
TRAIN_FIELDS: dict[str, dict[str, str]] = {
    "dataset": {
        "image_size": "image_size",
        "batch_size": "batch_size",
        "epochs": "epochs",
        "workers": "workers",
        "mean": "mean",
        "std": "std",
        "root": "data",  # a timm dataset's root is its cache_dir (scmc/link.py)
        "name": "timm_dataset",
    },
    "ema": {"enabled": "ema", "decay": "ema_decay", "warmup": "ema_warmup"},
    "compile": {"enabled": "compile", "mode": "compile_mode"},
}
