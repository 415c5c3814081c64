"""The generated training entry point, ``<pkg>/train.py``.

:class:`TrainContext` is what the package emitter knows about the compiled model, loss, metric
and backward; :func:`render_train` turns it into the source of ``train.py`` through
``templates/train.py.j2``. The generated file runs as ``python -m <pkg>.train`` and as
``torchrun --nproc_per_node=N -m <pkg>.train``; its ``TrainConfig`` fields (one per flag) are
listed in :data:`FIELDS`, with defaults that a template or preset may override through
``TrainContext.defaults``. The file is the package's wiring (flags, how a batch feeds the model,
loss, metric and backward); the generic loop it hands them to is ``scmc_runtime.trainer.Trainer``.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any

TEMPLATE = "train.py.j2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Field:
    """One ``TrainConfig`` field: its flag is ``--name-with-dashes``."""

    name: str
    type: str  # as written in the generated dataclass
    default: Any
    help: str
    group: str


# The TrainConfig fields, in the order they appear in train.py and in --help. ``defaults`` in a
# TrainContext overrides the default of any of them (and nothing else: unknown keys are errors).
FIELDS: tuple[Field, ...] = (
    # data
    Field("data", "str", "", "ImageFolder root holding train/ and val/; empty: the embedded digits", "data"),
    Field("timm_dataset", "str", "", "a timm dataset instead, e.g. torch/cifar10 (needs timm)", "data"),
    Field("cache_dir", "str", "data", "where the digits are unpacked and timm datasets downloaded", "data"),
    Field("image_size", "int", 224, "images are resized to image_size x image_size", "data"),
    Field("mean", "tuple[float, ...]", IMAGENET_MEAN, "per-channel normalization mean", "data"),
    Field("std", "tuple[float, ...]", IMAGENET_STD, "per-channel normalization std", "data"),
    Field("translate", "int", 0, "random shift of training images by up to this many pixels", "data"),
    Field("hflip", "bool", False, "random horizontal flips of training images", "data"),
    Field("skip_bad_images", "bool", False, "decode every image up front and skip (and count) unreadable ones", "data"),
    Field(
        "allow_class_mismatch",
        "bool",
        False,
        "train even when the data's class count differs from the model head's outputs",
        "data",
    ),
    Field("workers", "int", 2, "data-loading processes per rank (0: load in the training process)", "data"),
    # augmentation: timm's training recipe (scmc_runtime.recipe), with --data-pipeline timm
    Field(
        "data_pipeline", "str", "basic", "basic: resize, --translate, --hflip; timm: the flags below", "augmentation"
    ),
    Field("no_aug", "bool", False, "timm: no training augmentation (resize and center crop only)", "augmentation"),
    Field("scale", "tuple[float, ...]", (0.08, 1.0), "random-resized-crop area range", "augmentation"),
    Field("ratio", "tuple[float, ...]", (0.75, 1.3333333333333333), "random-resized-crop aspect range", "augmentation"),
    Field("train_crop_mode", "str", "rrc", "rrc, rkrc or rkrr (timm's random-resized-crop variants)", "augmentation"),
    Field("train_interpolation", "str", "random", "resize interpolation of training images", "augmentation"),
    Field("interpolation", "str", "bicubic", "resize interpolation of validation images", "augmentation"),
    Field("hflip_prob", "float", 0.5, "probability of a horizontal flip", "augmentation"),
    Field("vflip", "float", 0.0, "probability of a vertical flip", "augmentation"),
    Field("color_jitter", "float", 0.4, "color jitter strength (used without --auto-augment)", "augmentation"),
    Field("color_jitter_prob", "float", 1.0, "probability of applying the color jitter", "augmentation"),
    Field("grayscale_prob", "float", 0.0, "probability of a grayscale image", "augmentation"),
    Field("gaussian_blur_prob", "float", 0.0, "probability of a gaussian blur", "augmentation"),
    Field(
        "auto_augment",
        "str",
        "",
        "policy, e.g. rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w4-d2, 3a",
        "augmentation",
    ),
    Field("reprob", "float", 0.0, "random erasing probability", "augmentation"),
    Field("remode", "str", "pixel", "random erasing fill: const, rand or pixel", "augmentation"),
    Field("recount", "int", 1, "at most this many erased regions per image", "augmentation"),
    Field("crop_pct", "float", 0.875, "validation: resize to image_size / crop_pct, then center crop", "augmentation"),
    Field("mixup", "float", 0.0, "mixup alpha (0: off); makes soft targets", "augmentation"),
    Field("cutmix", "float", 0.0, "cutmix alpha (0: off); makes soft targets", "augmentation"),
    Field(
        "cutmix_minmax",
        "tuple[float, ...]",
        (),
        "cutmix box area min max (instead of --cutmix's alpha)",
        "augmentation",
    ),
    Field("mixup_prob", "float", 1.0, "probability of mixing a batch", "augmentation"),
    Field("mixup_switch_prob", "float", 0.5, "probability of cutmix instead of mixup when both are on", "augmentation"),
    Field("mixup_mode", "str", "batch", "one mix per batch, pair or elem(ent)", "augmentation"),
    Field("mixup_off_epoch", "int", 0, "stop mixing from this epoch on (0: never)", "augmentation"),
    Field("label_smoothing", "float", 0.0, "label smoothing of the soft targets", "augmentation"),
    Field(
        "num_aug_repeats",
        "int",
        0,
        "repeated augmentation: each image this many times per epoch (0: off)",
        "augmentation",
    ),
    Field(
        "aug_splits",
        "int",
        0,
        "AugMix splits: a clean and N - 1 augmented views of each image (e.g. --auto-augment augmix-m3-w3-d1), "
        "the loss on the clean one plus a JSD term over all (0: off, else at least 2)",
        "augmentation",
    ),
    Field(
        "jsd_alpha", "float", 12.0, "weight of the JSD consistency term of --aug-splits (timm's alpha)", "augmentation"
    ),
    Field(
        "resplit",
        "bool",
        False,
        "no random erasing on the clean split (the first half without --aug-splits); with --use-prefetcher",
        "augmentation",
    ),
    # loader
    Field("pin_memory", "bool", True, "pin host memory of batches when training on CUDA", "loader"),
    Field(
        "persistent_workers",
        "bool",
        False,
        "keep the --workers processes between epochs (the epoch's augmentation seed travels with each index)",
        "loader",
    ),
    Field("use_prefetcher", "bool", False, "timm: uint8 batches, normalized and erased on the device", "loader"),
    Field("image_dtype", "str", "float32", "dtype of the training images: float32, bfloat16 or float16", "loader"),
    # schedule
    Field("epochs", "int", 10, "passes over the training data", "schedule"),
    Field("batch_size", "int", 64, "global batch per step, split evenly over the ranks", "schedule"),
    Field("max_steps", "int", 0, "at most this many training batches per epoch (0: all)", "schedule"),
    Field(
        "max_val_steps",
        "int",
        0,
        "validate on a random subset of this many global batches, fixed by --seed (0: all)",
        "schedule",
    ),
    Field("seed", "int", 0, "seed for weights, shuffling and augmentation", "schedule"),
    Field("deterministic", "bool", False, "reproducible kernels (slower on GPU)", "schedule"),
    # weights
    Field("ema", "bool", True, "keep an exponential moving average of the weights and validate it", "weights"),
    Field("ema_decay", "float", 0.9998, "EMA decay per optimizer update", "weights"),
    Field("ema_warmup", "bool", True, "ramp the EMA decay up from 0 over the first updates", "weights"),
    Field(
        "init_from",
        "str",
        "",
        "start from these weights: a state dict, a scmc/timm/torchvision checkpoint or .safetensors "
        "(mapped by name, else by order and shape)",
        "weights",
    ),
    Field(
        "reset_head",
        "bool",
        False,
        "with --init-from: keep this model's own classifier (another class count)",
        "weights",
    ),
    # optimizer: the values backward.py was compiled with, changed for one run (no rebuild)
    Field("lr", "float | None", None, "base learning rate of every optimizer", "optimizer"),
    Field("weight_decay", "float | None", None, "weight decay of every optimizer", "optimizer"),
    Field("warmup_epochs", "float | None", None, "epochs of learning-rate warmup", "optimizer"),
    Field("clip_grad", "float | None", None, "clip gradients to this norm (none: no clipping)", "optimizer"),
    Field("grad_accum_steps", "int", 1, "training steps per optimizer update", "optimizer"),
    Field(
        "precision", "str", "float32", "float32, bfloat16 or float16 autocast (float16 adds a GradScaler)", "optimizer"
    ),
    Field("ema_min_decay", "float", 0.0, "lowest EMA decay during the warmup", "weights"),
    Field("ema_update_after_step", "int", 0, "the EMA copies the weights until this many updates", "weights"),
    Field("ema_warmup_gamma", "float", 1.0, "EMA warmup: decay = 1 - (1 + step / gamma) ** -power", "weights"),
    Field("ema_warmup_power", "float", 2 / 3, "EMA warmup power", "weights"),
    Field("ema_foreach", "bool", True, "update the EMA with fused foreach kernels", "weights"),
    Field("ema_exclude_buffers", "bool", False, "copy buffers (BatchNorm statistics) instead of averaging", "weights"),
    # speed
    Field("device", "str", "auto", "auto, cpu, cuda or cuda:N (under torchrun: the GPU of LOCAL_RANK)", "speed"),
    Field("compile", "bool", False, "torch.compile the model", "speed"),
    Field("compile_mode", "str", "default", "default, reduce-overhead or max-autotune", "speed"),
    Field("matmul_precision", "str", "highest", "float32 matmuls: highest, high (TF32) or medium", "speed"),
    Field("compile_backend", "str", "inductor", "torch.compile backend (inductor, aot_eager, eager, ...)", "speed"),
    Field("compile_fullgraph", "bool", False, "torch.compile: one graph, an error at any graph break", "speed"),
    Field("channels_last", "bool", False, "channels-last memory format (faster convolutions on GPU)", "speed"),
    Field(
        "sync_bn",
        "bool",
        True,
        "under DDP, BatchNorm statistics over all ranks (SyncBatchNorm; on CPU over gloo); --no-sync-bn: per rank",
        "speed",
    ),
    Field("threads", "int", 0, "CPU threads per process (0: torch's default)", "speed"),
    # distributed (docs/fsdp.md)
    Field(
        "strategy",
        "str",
        "ddp",
        "ddp: every rank holds the whole model; fsdp: parameters, gradients and optimizer state sharded over ranks",
        "distributed",
    ),
    Field(
        "fsdp_unit",
        "str",
        "",
        "model.py class whose instances are FSDP units (default: the most repeated)",
        "distributed",
    ),
    Field("reshard_after_forward", "bool", True, "fsdp: free the gathered parameters after forward", "distributed"),
    Field(
        "activation_checkpointing", "bool", False, "fsdp: recompute each unit's activations in backward", "distributed"
    ),
    # runs, checkpoints, logging
    Field("out", "str", "runs", "folder of runs; a run writes <out>/<run-name>/", "output"),
    Field("run_name", "str", "", "name of the run folder (default: the package name, then -2, -3, ...)", "output"),
    Field(
        "resume",
        "str",
        "",
        "auto: continue the run's last.pt (--run-name, else the package's newest run), if any; or a checkpoint path",
        "output",
    ),
    Field(
        "fresh",
        "bool",
        False,
        "start a new run in a new folder even where a run (or a broken checkpoint) exists",
        "output",
    ),
    Field("val_every", "int", 1, "validate every N epochs (and after the last one)", "output"),
    Field("save_every", "int", 0, "also save last.pt every N updates (0: only at epoch ends)", "output"),
    Field("best_metric", "str", "val_loss", "validation metric that picks best.pt", "output"),
    Field("best_mode", "str", "min", "max or min: whether a larger best_metric is better", "output"),
    Field("log_every", "int", 50, "print and log training metrics every N steps", "output"),
    Field("ci", "bool", False, "plain log lines instead of a progress bar", "output"),
    Field("mlflow", "bool", True, "record the run with MLflow (rank 0)", "output"),
    Field("mlflow_uri", "str", "", "MLflow tracking URI (default: sqlite:///<out>/mlflow.db)", "output"),
    Field("experiment", "str", "", "MLflow experiment (default: the package name)", "output"),
)
FIELD_NAMES = frozenset(f.name for f in FIELDS)


@dataclass(frozen=True)
class TrainContext:
    """What ``train.py`` needs to know about the package it trains.

    ``defaults`` overrides :data:`FIELDS` defaults (e.g. ``{"epochs": 6, "batch_size": 32,
    "image_size": 32, "best_metric": "val_acc1", "best_mode": "max"}``). When it sets no
    ``best_metric``, the first metric output (``val_<name>``, larger is better) is used, or the
    first loss output (smaller is better) when there is no metric.
    """

    package: str  # import name, e.g. "convnextv2_femto"
    scmc_version: str
    template: str  # source template path, relative, for the header
    model_inputs: list[str]  # the first is fed the images; another may be the label
    model_outputs: list[str]
    model_structured: bool  # forward returns a dict keyed by model_outputs
    label: str  # name under which loss/metric graphs take the integer class labels
    loss_inputs: list[str]  # each is the label, a model output or a model input
    loss_outputs: list[str]
    loss_structured: bool
    metric_inputs: list[str]  # empty metric_outputs: the package has no metric
    metric_outputs: list[str]
    metric_structured: bool
    backward_losses: list[str]  # the loss outputs Backward.__call__ takes, by keyword
    defaults: dict[str, Any] = field(default_factory=dict)
    model_class: str = "Model"  # the class in model.py (scmc build --classname)
    soft_targets: int = 0  # N > 0: the loss takes the labels as one-hot probabilities over N classes
    # An image_table dataset (scmc_runtime.tabular): the model's second input is fed a row of
    # num_features values, and loss/metric inputs named ``target`` the row's num_targets values.
    target: str = ""  # empty: images and class labels only
    num_features: int = 0
    num_targets: int = 0
    # Backward.compiled (scmc.emit.backward.compiled_settings): the defaults of the optimizer flags
    backward: dict[str, Any] = field(default_factory=dict)
    # --aug-splits: the model output with the classification logits and the backward loss the JSD
    # term joins (scmc.link.Training), or why they cannot be told (the flag is then refused)
    jsd_logits: str = ""
    jsd_loss: str = ""
    jsd_problem: str = ""


# optimizer flag -> the key of Backward.compiled that gives its default and the --help text's "compiled:"
OVERRIDE_FLAGS = ("lr", "weight_decay", "warmup_epochs", "clip_grad", "grad_accum_steps", "precision")


def _check_names(ctx: TrainContext) -> None:
    lists = {
        "model_inputs": ctx.model_inputs,
        "model_outputs": ctx.model_outputs,
        "loss_inputs": ctx.loss_inputs,
        "loss_outputs": ctx.loss_outputs,
        "metric_inputs": ctx.metric_inputs,
        "metric_outputs": ctx.metric_outputs,
        "backward_losses": ctx.backward_losses,
    }
    singles = {"label": [ctx.label], "package": [ctx.package], "model_class": [ctx.model_class]}
    for what, names in {**lists, **singles}.items():
        for name in names:
            if not name.isidentifier() or keyword.iskeyword(name):
                raise ValueError(f"train.py: {what} holds {name!r}, which is not a Python identifier")
    if not ctx.model_inputs:
        raise ValueError("train.py: the model takes no inputs; it needs at least the images")
    if not ctx.model_outputs or not ctx.loss_outputs:
        raise ValueError("train.py: the model and the loss must each have at least one output")
    if ctx.target and (len(ctx.model_inputs) != 2 or ctx.num_features < 1 or ctx.num_targets < 1):
        raise ValueError("train.py: an image_table package has two model inputs (image, features) and sizes")
    extra = [n for n in ctx.model_inputs[1:] if n != ctx.label and not ctx.target]
    if extra:
        raise ValueError(
            f"train.py: the model's first input ({ctx.model_inputs[0]}) is fed the images and another may be "
            f"the label ({ctx.label}); there is no data for {', '.join(extra)}"
        )
    known = {ctx.label, *ctx.model_outputs, *ctx.model_inputs, *([ctx.target] if ctx.target else [])}
    for role, inputs in (("loss", ctx.loss_inputs), ("metric", ctx.metric_inputs)):
        missing = [n for n in inputs if n not in known]
        if missing:
            raise ValueError(
                f"train.py: {role} input(s) {', '.join(missing)} are neither the label ({ctx.label}) "
                f"nor a model output ({', '.join(ctx.model_outputs)})"
            )
    if ctx.jsd_logits and (ctx.jsd_logits not in ctx.model_outputs or ctx.jsd_loss not in ctx.backward_losses):
        raise ValueError(f"train.py: the JSD term reads {ctx.jsd_logits} into {ctx.jsd_loss}: not an output and loss")
    if ctx.metric_inputs and not ctx.metric_outputs:
        raise ValueError("train.py: the metric has inputs but no outputs")
    not_losses = [n for n in ctx.backward_losses if n not in ctx.loss_outputs]
    if not ctx.backward_losses or not_losses:
        raise ValueError(
            f"train.py: the backward takes {', '.join(ctx.backward_losses) or 'no losses'}, but the loss "
            f"outputs are {', '.join(ctx.loss_outputs)}"
        )
    clash = set(ctx.loss_outputs) & set(ctx.metric_outputs)
    if clash:
        raise ValueError(f"train.py: {', '.join(sorted(clash))} is both a loss and a metric output")


def _fields(ctx: TrainContext) -> list[Field]:
    unknown = sorted(set(ctx.defaults) - FIELD_NAMES)
    if unknown:
        raise ValueError(
            f"train.py: unknown training default(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELD_NAMES))}"
        )
    defaults = dict(ctx.defaults)
    compiled = {k: ctx.backward[k] for k in OVERRIDE_FLAGS if ctx.backward.get(k) is not None}
    defaults = {**compiled, **defaults}
    if "best_metric" in defaults and "best_mode" not in defaults:  # a metric is better larger, a loss smaller
        name = str(defaults["best_metric"]).split("val_", 1)[-1].removeprefix("train_")
        defaults["best_mode"] = "max" if name in ctx.metric_outputs else "min"
    if "best_metric" not in defaults:
        if ctx.metric_outputs:
            defaults["best_metric"] = f"val_{ctx.metric_outputs[0]}"
            defaults.setdefault("best_mode", "max")
        else:
            defaults["best_metric"] = f"val_{ctx.loss_outputs[0]}"
            defaults.setdefault("best_mode", "min")
    if "experiment" not in defaults:
        defaults["experiment"] = ctx.package
    out = []
    for f in FIELDS:
        value = defaults.get(f.name, f.default)
        help_text = f.help
        if f.name in OVERRIDE_FLAGS and ctx.backward:
            shown = ctx.backward.get(f.name)
            if shown is None and f.name in ("lr", "weight_decay"):
                help_text += " (default: each optimizer's value in backward.py)"
            else:
                help_text += f" (default: {'none' if shown is None else shown}, as compiled into backward.py)"
        if value is None and f.type.endswith("| None"):
            out.append(Field(f.name, f.type, value, help_text, f.group))
            continue
        if f.type.startswith("tuple"):
            value = tuple(float(v) for v in value)
        elif f.type in ("float", "float | None"):
            value = float(value)
        elif not isinstance(value, {"int": int, "str": str, "bool": bool}[f.type]) or (
            f.type == "int" and isinstance(value, bool)
        ):
            raise ValueError(f"train.py: default {f.name}={value!r} is not a{'n' if f.type == 'int' else ''} {f.type}")
        out.append(Field(f.name, f.type, value, help_text, f.group))
    by_name = {f.name: f.default for f in out}
    if by_name["best_mode"] not in ("max", "min"):
        raise ValueError(f"train.py: best_mode must be max or min, not {by_name['best_mode']!r}")
    return out


def _source(name: str, ctx: TrainContext, soft: bool = False) -> str:
    """The expression in train.py that holds the graph input ``name`` (``soft``: for the loss)."""
    if name == ctx.label:
        if not soft:
            return "batch.labels"
        if ctx.soft_targets:
            return f"as_soft_targets(batch.loss_labels, {int(ctx.soft_targets)})"
        return "batch.loss_labels"
    if name in ctx.model_outputs:
        if ctx.model_structured:
            return f"outputs[{name!r}]"
        if len(ctx.model_outputs) == 1:
            return "outputs"
        return f"outputs[{ctx.model_outputs.index(name)}]"
    if name == ctx.model_inputs[0]:
        return "batch.images"
    if ctx.target and name == ctx.target:
        return "batch.targets"
    if ctx.target and name == ctx.model_inputs[1]:
        return "batch.features"
    raise AssertionError(name)


def render_train(ctx: TrainContext) -> str:
    """The source of ``<package>/train.py``: rendered, black-formatted and checked with ``ast.parse``."""
    from scmc.emit.jinja import environment
    from scmc.emit.python import format_python

    _check_names(ctx)
    env = environment()
    fields = _fields(ctx)
    if len(ctx.model_outputs) == 1 and not ctx.model_structured:
        outputs_type = "torch.Tensor"
    elif ctx.model_structured:
        outputs_type = "dict[str, torch.Tensor]"
    else:
        outputs_type = "tuple[torch.Tensor, ...]"
    if ctx.target:
        model_call, forward_doc = "batch.images, batch.features", "the images and their rows of features"
    else:
        model_call = ", ".join("batch.images" if i == 0 else "batch.labels" for i in range(len(ctx.model_inputs)))
        forward_doc = "the images and the labels" if len(ctx.model_inputs) > 1 else "the images"
    source = env.get_template(TEMPLATE).render(
        ctx=ctx,
        fields=fields,
        groups=[g for i, g in enumerate(f.group for f in fields) if g not in [f.group for f in fields][:i]],
        outputs_type=outputs_type,
        model_call=model_call,
        forward_doc=forward_doc,
        loss_args=", ".join(f"{n}={_source(n, ctx, soft=True)}" for n in ctx.loss_inputs),
        metric_args=", ".join(f"{n}={_source(n, ctx)}" for n in ctx.metric_inputs),
        backward_args=", ".join(f"{n}=losses[{n!r}]" for n in ctx.backward_losses),
        jsd_logits=_source(ctx.jsd_logits, ctx) if ctx.jsd_logits else "",
        defaults={f.name: f.default for f in fields},
    )
    return format_python(source)
