"""Schemas of the rendered non-graph templates, and pydantic errors mapped back to YAML positions.

A preset (dataset, EMA, compile) is validated here with a pydantic model whose unknown keys
are errors (``extra="forbid"``): every key a preset may hold is read by someone (the
generated train.py, predict.py or ``scmc export``), so a key nobody reads is reported instead
of being dropped. Each validation error becomes a :class:`Diagnostic` at the position of the
offending key (:func:`locate`), with a did-you-mean hint for misspelled keys.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
)

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


Probability = Field(default=None, ge=0.0, le=1.0)
Interpolation = Literal["random", "bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"]


class RecipeKeys(BaseModel):
    """timm's data-pipeline keys (scmc_runtime.recipe), in either form of a dataset preset; None: not set.

    Any of them set makes train.py default to ``--data-pipeline timm``. ``aug_splits`` (AugMix splits
    with a JSD loss, scmc_runtime.augmix) is 0 (off) or at least 2; the link stage checks that the
    loss tells which model output holds the logits (E1223).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    no_aug: bool | None = None
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    train_crop_mode: Literal["rrc", "rkrc", "rkrr"] | None = None
    train_interpolation: Interpolation | None = None
    interpolation: Interpolation | Literal[""] | None = None  # "": bicubic
    hflip: float | None = Probability
    vflip: float | None = Probability
    color_jitter: float | None = Field(default=None, ge=0.0)
    color_jitter_prob: float | None = Probability
    grayscale_prob: float | None = Probability
    gaussian_blur_prob: float | None = Probability
    auto_augment: str | None = None
    reprob: float | None = Probability
    remode: Literal["const", "rand", "pixel"] | None = None
    recount: PositiveInt | None = None
    resplit: bool | None = None
    mixup: float | None = Field(default=None, ge=0.0)
    cutmix: float | None = Field(default=None, ge=0.0)
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float | None = Probability
    mixup_switch_prob: float | None = Probability
    mixup_mode: Literal["batch", "pair", "elem"] | None = None
    mixup_off_epoch: NonNegativeInt | None = None
    label_smoothing: float | None = Field(default=None, ge=0.0, lt=1.0)
    aug_splits: NonNegativeInt | None = None
    jsd_alpha: float | None = Field(
        default=None, ge=0.0, allow_inf_nan=False
    )  # the JSD term's weight (timm's alpha, 12)
    crop_pct: float | None = Field(default=None, gt=0.0, le=1.0)
    pin_memory: bool | None = None
    persistent_workers: bool | None = None
    use_prefetcher: bool | None = None
    channels_last: bool | None = None
    image_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # the best-checkpoint criterion (not a loader key): val_<loss or metric>, ema_val_..., train_...
    best_metric: str | None = Field(default=None, min_length=1)
    best_mode: Literal["max", "min"] | None = None

    @field_validator("aug_splits")
    @classmethod
    def _splits_off_or_two(cls, value: Any) -> Any:
        if value == 1:
            raise ValueError("1 split is the clean images alone; give 0 (off) or at least 2 (clean + augmented)")
        return value

    @property
    def recipe_given(self) -> bool:
        return bool(self.model_fields_set & (set(RecipeKeys.model_fields) - {"best_metric", "best_mode"}))

    @property
    def soft_keys(self) -> tuple[str, ...]:
        """The keys that make soft targets (mixup, cutmix, label smoothing), where they are on."""
        return tuple(k for k in ("mixup", "cutmix", "cutmix_minmax", "label_smoothing") if getattr(self, k))


class DatasetPreset(RecipeKeys):
    """``--dataset`` / ``PACKAGE: {DATASET: ...}``: where train.py's images come from and how they look."""

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


class TimmDatasetPreset(RecipeKeys):
    """A dataset preset in structcast-model's form (``cfg/datasets/default_timm.yaml``): no ``kind``.

    ``dataset`` is a timm dataset name (``torch/cifar10``), or empty for an ImageFolder at
    ``dataset_dir``; ``input_size`` is ``[C, H, W]``; ``repeats`` is timm's repeated augmentation;
    ``num_samples`` caps the training images per epoch; ``training: false`` turns augmentation off.
    """

    training: bool = True
    epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    dataset: str = ""
    dataset_dir: str | None = None
    num_classes: PositiveInt | None = None
    input_size: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    seed: NonNegativeInt | None = None
    repeats: NonNegativeInt | None = None
    num_samples: PositiveInt | None = None
    device: str | None = None
    workers: NonNegativeInt | None = None
    mean: tuple[float, ...] | None = Field(default=None, min_length=1)
    std: tuple[float, ...] | None = Field(default=None, min_length=1)

    # the DatasetPreset view the link stage reads
    @property
    def kind(self) -> str:
        return "timm" if self.dataset else "image_folder"

    @property
    def name(self) -> str | None:
        return self.dataset or None

    @property
    def root(self) -> str | None:
        return self.dataset_dir

    @property
    def image_size(self) -> int | None:
        return self.input_size[-1] if self.input_size else None

    @property
    def classes(self) -> None:
        return None

    @property
    def targets(self) -> str:
        return "class"


def dataset_schema(config: Any) -> type[BaseModel]:
    """A mapping without ``kind`` is a preset in structcast-model's form, unless it has scmc's own keys.

    (Then ``kind`` is what is missing, and the scmc schema says so.)
    """
    if not isinstance(config, dict) or "kind" in config:
        return DatasetPreset
    scmc_only = set(DatasetPreset.model_fields) - set(TimmDatasetPreset.model_fields)
    return DatasetPreset if scmc_only & set(config) else TimmDatasetPreset


class EmaPreset(BaseModel):
    """``PACKAGE: {EMA: ...}``: defaults of train.py's EMA flags (timm ``ModelEmaV3``'s knobs).

    structcast-model's keys (decay, min_decay, update_after_step, use_warmup, warmup_gamma,
    warmup_power, foreach, exclude_buffers), plus ``enabled`` and ``warmup`` (``use_warmup``'s
    older name).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    warmup: bool | None = None
    min_decay: float | None = Field(default=None, ge=0.0, lt=1.0)
    update_after_step: NonNegativeInt | None = None
    use_warmup: bool | None = None
    warmup_gamma: float | None = Field(default=None, gt=0.0)
    warmup_power: float | None = Field(default=None, gt=0.0)
    foreach: bool | None = None
    exclude_buffers: bool | None = None


class CompilePreset(BaseModel):
    """``PACKAGE: {COMPILE: ...}``: defaults of train.py's torch.compile flags (mode, backend, fullgraph)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    backend: str | None = Field(default=None, min_length=1)
    fullgraph: bool | None = None


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
    "ema": {
        "enabled": "ema",
        "decay": "ema_decay",
        "warmup": "ema_warmup",
        "use_warmup": "ema_warmup",
        "min_decay": "ema_min_decay",
        "update_after_step": "ema_update_after_step",
        "warmup_gamma": "ema_warmup_gamma",
        "warmup_power": "ema_warmup_power",
        "foreach": "ema_foreach",
        "exclude_buffers": "ema_exclude_buffers",
    },
    "compile": {
        "enabled": "compile",
        "mode": "compile_mode",
        "backend": "compile_backend",
        "fullgraph": "compile_fullgraph",
    },
}
# recipe keys (either dataset form) whose TrainConfig field has another name; the others keep theirs
RECIPE_FIELDS: dict[str, str] = {"hflip": "hflip_prob"}
# the structcast-model form's own keys (input_size, num_samples, training: see scmc/link.py)
TIMM_DATASET_FIELDS: dict[str, str] = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "seed": "seed",
    "workers": "workers",
    "device": "device",
    "mean": "mean",
    "std": "std",
    "repeats": "num_aug_repeats",
    "dataset": "timm_dataset",
}
