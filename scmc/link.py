"""The link stage: the compiled parts of a package, wired together and checked, as one value.

After every part has been lowered (model, loss, metric: layer graphs; backward; dataset, EMA and
compile presets), :func:`link` decides how they fit: which model output or input feeds each
loss and metric input, which name is the label, which loss outputs the backward steps take,
what the presets set as train.py's defaults. Every wiring mistake is a :class:`Diagnostic` at
the key of the template that holds it (codes E1200-E1299); nothing here raises anything else
for a user mistake. The result, a frozen :class:`PackageDef`, is what the emitters print.

Label kinds are judged by what the loss layer *is* (the resolved class), never by its name:
a soft-target loss (``timm.loss.SoftTargetCrossEntropy``, ``torch.nn.BCEWithLogitsLoss``...)
needs the dataset preset to say ``targets: soft`` (train.py then feeds it one-hot
probabilities); a loss that takes class indices only (``torch.nn.NLLLoss``...) refuses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from scmc.addresses import AddressError, AllowList, resolve
from scmc.diagnostics import CompileError, Diagnostic, Diagnostics, Span, did_you_mean
from scmc.ir import BackwardDef, ModuleDef, Node, Program, node_reads, out_names
from scmc.load import LDict, Source
from scmc.schema import (
    PRESETS,
    RECIPE_FIELDS,
    TIMM_DATASET_FIELDS,
    TRAIN_FIELDS,
    CompilePreset,
    DatasetPreset,
    EmaPreset,
    RecipeKeys,
    TimmDatasetPreset,
    dataset_schema,
    locate,
    validation_diagnostics,
)

PRESET_ROLES = tuple(PRESETS)  # dataset, ema, compile


@dataclass
class Compiled:
    """One part of the package after its stages (lowered, materialized, emitted as module text)."""

    role: str
    source: Source
    program: Program | None  # layer graphs
    text: str  # generated Python (empty for presets)
    param_count: int
    input_shapes: dict[str, Any] | None
    params: dict[str, Any]
    backward: BackwardDef | None = None
    config: Any = None  # a rendered preset, plain values
    files: dict[str, Path] = field(default_factory=dict)  # `_file_` modules: stem -> path
    includes: list[Source] = field(default_factory=list)  # templates read through CFG
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # named groups Jinja rendered with, as resolved
    output_shapes: dict[str, tuple[int, ...]] | None = None  # the model's, without the batch
    macs: int | None = None  # the model's, one sample in inference (None: no input shapes to count at)
    tree: Any = None  # a rendered preset with positions (LDict), for diagnostics

    @property
    def root(self) -> ModuleDef:
        assert self.program is not None
        return self.program.module(self.program.root)


@dataclass(frozen=True)
class Training:
    """How train.py feeds the loss, metric and backward (the package has a loss and a backward)."""

    label: str  # the name under which loss and metric take the labels
    soft_targets: int  # 0: class indices; N: the loss is fed one-hot probabilities over N classes
    backward_losses: tuple[str, ...]
    defaults: tuple[tuple[str, Any], ...]  # TrainConfig field -> default, from the presets
    # An image_table dataset: the model's second input is a vector of num_features values and the
    # loss/metric take the regression targets (num_targets per sample) as `target` (TABLE_TARGET).
    target: str = ""  # empty: images and class labels only
    num_features: int = 0
    num_targets: int = 0
    # --aug-splits (scmc_runtime.augmix): the model output holding the classification logits (the one
    # the loss compares with the labels) and the backward's loss the JSD term joins; else why not.
    jsd_logits: str = ""
    jsd_loss: str = ""
    jsd_problem: str = ""


@dataclass(frozen=True)
class BuildInfo:
    """What the command line asked for, as the package's README and manifest record it."""

    params: tuple[str, ...]
    parts: tuple[tuple[str, Path], ...]  # (role, template path), the model first
    shapes: tuple[tuple[str, Any], ...]
    allow_modules: tuple[str, ...]


@dataclass(frozen=True)
class PackageDef:
    """One package: its parts, their wiring and the validated presets. Emitters only print it."""

    name: str
    model: Compiled
    loss: Compiled | None
    metric: Compiled | None
    backward: Compiled | None
    dataset: DatasetPreset | None
    ema: EmaPreset | None
    compile: CompilePreset | None
    parts: tuple[Compiled, ...]  # every part, in the order of the build (for the manifest)
    training: Training | None  # None: no loss or no backward, so no train.py
    build: BuildInfo
    class_labels: tuple[str, ...] | None = None  # predict.py's labels, when the data names them
    warnings: tuple[Diagnostic, ...] = ()  # wiring that builds but deserves a look (printed by the CLI)

    @property
    def modules(self) -> tuple[Compiled, ...]:
        return tuple(c for c in (self.model, self.loss, self.metric, self.backward) if c is not None)


# --------------------------------------------------------------------------- label kinds

# (module, attribute) of layers that take probabilities (soft targets) / class indices only as targets
SOFT_TARGET_LAYERS = (
    ("timm.loss", "SoftTargetCrossEntropy"),
    ("torch.nn", "BCEWithLogitsLoss"),
    ("torch.nn", "BCELoss"),
    ("torch.nn", "KLDivLoss"),
)
CLASS_TARGET_LAYERS = (
    ("torch.nn", "NLLLoss"),
    ("torch.nn", "MultiMarginLoss"),
    ("timm.loss", "LabelSmoothingCrossEntropy"),
)


def _objects(names: tuple[tuple[str, str], ...]) -> list[Any]:
    out = []
    for module, attr in names:
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # an optional library that is not installed
            continue
    return out


def _label_layer(graph: Compiled, label: str, allow: AllowList) -> tuple[str, Any, Node] | None:
    """(address, resolved class, node) of the first layer of a graph's root that reads the label."""
    root = graph.root
    children = {c.attr: c for c in root.children}
    for node in root.flow:
        if label not in node_reads(node) or node.layer not in children:
            continue
        child = children[node.layer]
        if child.kind == "user":
            return None
        try:
            return child.ctor.address, resolve(child.ctor.address, allow), node
        except AddressError:
            return None
    return None


# --------------------------------------------------------------------------- presets


def validate_preset(part: Compiled, diags: Diagnostics) -> BaseModel | None:
    """The preset as its pydantic schema, or None after reporting each mistake at its key."""
    schema = dataset_schema(part.config) if part.role == "dataset" else PRESETS[part.role]
    tree = part.tree
    span = part.source.data.span
    if not isinstance(part.config, dict):
        diags.error(
            "E1203",
            f"a {part.role} preset must be a mapping of keys to values",
            span,
            f"keys: {', '.join(schema.model_fields)}",
        )
        return None
    try:
        return schema.model_validate(part.config)
    except ValidationError as exc:
        diags.extend(
            validation_diagnostics(
                exc, tree, span, f"the {part.role} preset", "E1203", lambda loc: tuple(schema.model_fields)
            )
        )
        return None


def _key(part: Compiled, key: str) -> Span:
    return locate(part.tree, (key,), part.source.data.span)


def _check_dataset(
    part: Compiled, preset: DatasetPreset | TimmDatasetPreset, channels: int, diags: Diagnostics
) -> None:
    if isinstance(preset, TimmDatasetPreset):
        if not preset.dataset and not preset.dataset_dir:
            diags.error(
                "E1208",
                "an ImageFolder preset (empty `dataset`) needs `dataset_dir`, the folder holding train/ and val/",
                _key(part, "dataset"),
                "add `dataset_dir: path/to/images`, or name a timm dataset (`dataset: torch/cifar10`)",
            )
        if preset.input_size is not None and preset.input_size[0] != channels:
            diags.error(
                "E1208",
                f"`input_size` has {preset.input_size[0]} channels, but the model takes {channels}",
                _key(part, "input_size"),
                f"give [{channels}, H, W]",
            )
    else:
        _check_scmc_dataset(part, preset, diags)
    for key in ("mean", "std"):
        values = getattr(preset, key)
        if values is not None and len(values) != channels:
            diags.error(
                "E1208",
                f"`{key}` has {len(values)} value{'s' if len(values) != 1 else ''}, but the images have "
                f"{channels} channels",
                _key(part, key),
                f"give one value per channel ({channels})",
            )
    if preset.targets == "soft" and preset.num_classes is None and preset.classes is None:
        diags.error(
            "E1210",
            "`targets: soft` makes one-hot probabilities, so the preset needs `num_classes`",
            _key(part, "targets"),
            "add `num_classes: N`",
        )
    if preset.soft_keys and preset.num_classes is None and preset.classes is None:
        diags.error(
            "E1221",
            f"`{preset.soft_keys[0]}` makes soft targets (a probability per class), so the preset needs `num_classes`",
            _key(part, preset.soft_keys[0]),
            "add `num_classes: N`",
        )


def _check_scmc_dataset(part: Compiled, preset: DatasetPreset, diags: Diagnostics) -> None:
    given = preset.model_fields_set
    if preset.kind == "digits" and "root" in given:
        diags.error(
            "E1208",
            "a digits preset takes no `root`: the digits are embedded in scmc-runtime",
            _key(part, "root"),
            "remove `root`, or use `kind: image_folder` for your own images",
        )
    if preset.kind == "image_folder" and not preset.root:
        diags.error(
            "E1208",
            "an image_folder preset needs `root`, the folder holding train/ and val/",
            _key(part, "kind"),
            "add `root: path/to/images`",
        )
    if preset.kind == "timm" and not preset.name:
        diags.error(
            "E1208",
            "a timm preset needs `name`, the timm dataset (e.g. torch/cifar10)",
            _key(part, "kind"),
            "add `name: torch/cifar10`",
        )
    if preset.kind != "timm" and "name" in given:
        diags.error(
            "E1208",
            f"`name` selects a timm dataset, but this preset is `kind: {preset.kind}`",
            _key(part, "name"),
            "remove `name`, or use `kind: timm`",
        )
    if preset.classes is not None and preset.num_classes is not None and len(preset.classes) != preset.num_classes:
        diags.error(
            "E1208",
            f"`classes` names {len(preset.classes)} classes, but `num_classes` is {preset.num_classes}",
            _key(part, "classes"),
        )


def _train_defaults(presets: dict[str, tuple[Compiled, BaseModel]], model: Compiled) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for role, (_, preset) in presets.items():
        mapping = dict(TIMM_DATASET_FIELDS if isinstance(preset, TimmDatasetPreset) else TRAIN_FIELDS[role])
        if isinstance(preset, RecipeKeys):
            mapping.update({key: RECIPE_FIELDS.get(key, key) for key in RecipeKeys.model_fields})
            if preset.recipe_given or isinstance(preset, TimmDatasetPreset):
                defaults["data_pipeline"] = "timm"
        if role == "dataset" and isinstance(preset, (DatasetPreset, TimmDatasetPreset)) and preset.kind == "timm":
            mapping["root"] = "cache_dir"  # a timm dataset's root is where it is cached
        for key in sorted(preset.model_fields_set, key=list(type(preset).model_fields).index):
            if mapping.get(key) and getattr(preset, key) not in (None, ""):  # "": timm's default
                value = getattr(preset, key)
                defaults[mapping[key]] = list(value) if isinstance(value, tuple) else value
        if isinstance(preset, TimmDatasetPreset):
            defaults.update(_timm_form_defaults(preset))
    if "image_size" not in defaults and model.input_shapes:
        first = model.input_shapes[model.root.inputs[0]]["shape"]
        defaults["image_size"] = int(first[-1])
    return defaults


# --------------------------------------------------------------------------- image_table wiring

TABLE_LABEL, TABLE_TARGET = "label", "target"  # what an image_table dataset feeds the loss and metric


def _input_shape(model: Compiled, name: str) -> tuple[int, ...] | None:
    spec = (model.input_shapes or {}).get(name)
    return tuple(int(d) for d in spec["shape"]) if spec else None


def _check_table(model: Compiled, graphs: list[Compiled], part: Compiled, preset: DatasetPreset, diags: Diagnostics):
    """An image_table dataset feeds (image, features) to the model and `label`, `target` to the loss and metric."""
    root = model.root
    for key in ("num_features", "num_targets"):
        if getattr(preset, key) is None:
            diags.error(
                "E1216",
                f"a `kind: image_table` preset needs `{key}`, the length of each row's "
                f"{'features (the model' + chr(39) + 's second input)' if key == 'num_features' else 'regression targets'}",
                _key(part, "kind"),
                f"add `{key}: N` (cfg/datasets/digits_table.yaml has 4 features and 2 targets)",
            )
    if preset.targets == "soft":
        diags.error(
            "E1218",
            "`targets: soft` is for class-label datasets; an image_table dataset feeds class indices as `label`",
            _key(part, "targets"),
            "remove `targets: soft`",
        )
    if len(root.inputs) != 2:
        diags.error(
            "E1211",
            f"the dataset preset {part.source.display} is `kind: image_table`: it feeds two model inputs, the image "
            f"and its row of features, but the model takes {len(root.inputs)} "
            f"({', '.join(f'`{n}`' for n in root.inputs) or 'none'})",
            _model_inputs_span(model),
            "declare INPUTS: [image, tabular] (the image first, the features second)",
        )
        return
    image, tabular = root.inputs
    image_shape, tabular_shape = _input_shape(model, image), _input_shape(model, tabular)
    if image_shape is not None and len(image_shape) != 3:
        diags.error(
            "E1211",
            f"the model's first input `{image}` is fed images (channels x height x width), but its INPUT_SHAPES "
            f"entry is {list(image_shape)}",
            _model_inputs_span(model),
            "give the image first in INPUTS and its shape as [C, H, W] in INPUT_SHAPES",
        )
    if tabular_shape is not None and (len(tabular_shape) != 1 or tabular_shape[0] != preset.num_features):
        if preset.num_features is not None:
            diags.error(
                "E1212",
                f"the model's second input `{tabular}` has shape {list(tabular_shape)}, but the dataset preset's rows "
                f"have {preset.num_features} features (`num_features`)",
                _key(part, "num_features"),
                f"build both for the same width: -p num_features={tabular_shape[0] if len(tabular_shape) == 1 else 'N'}"
                " sets both in the example templates",
            )
    for name in (TABLE_LABEL, TABLE_TARGET):
        if name in root.inputs or name in root.outputs:
            diags.error(
                "E1217",
                f"the model's {'input' if name in root.inputs else 'output'} `{name}` has the name under which the "
                "image_table dataset feeds the loss its "
                f"{'class labels' if name == TABLE_LABEL else 'regression targets'}",
                _model_inputs_span(model) if name in root.inputs else _writes(model, name),
                f"rename the model's `{name}`",
            )
    known = {*root.outputs, TABLE_LABEL, TABLE_TARGET}
    for graph in graphs:
        for n in graph.root.inputs:
            if n not in known:
                diags.error(
                    "E1214",
                    f"{graph.role} input `{n}` is {'a model input' if n in root.inputs else 'not a model output'}: "
                    f"train.py feeds the {graph.role} the model's outputs ({', '.join(root.outputs)}) and the "
                    f"image_table dataset's labels (`{TABLE_LABEL}`: class indices, `{TABLE_TARGET}`: regression "
                    "targets)",
                    _reads(graph, n),
                    did_you_mean(n, sorted(known)) or f"read `{TABLE_LABEL}` or `{TABLE_TARGET}`",
                )
        for node in graph.root.flow:
            reads = node_reads(node)
            if TABLE_TARGET not in reads or preset.num_targets is None:
                continue
            for n in reads:
                shape = (model.output_shapes or {}).get(n)
                if n in root.outputs and shape is not None and tuple(shape) != (preset.num_targets,):
                    diags.error(
                        "E1213",
                        f"{graph.role}: `{n}` is compared with the regression targets ({preset.num_targets} per "
                        f"sample, `num_targets`), but the model's `{n}` gives {list(shape)} per sample",
                        node.span,
                        f"build the regression head for the data: -p num_targets={preset.num_targets}",
                    )


def _timm_form_defaults(preset: TimmDatasetPreset) -> dict[str, Any]:
    """The structcast-model form's keys that are not one TrainConfig field each."""
    out: dict[str, Any] = {}
    if preset.dataset_dir is not None:
        out["cache_dir" if preset.dataset else "data"] = preset.dataset_dir
    if preset.input_size is not None:
        out["image_size"] = int(preset.input_size[-1])
    if not preset.training:
        out["no_aug"] = True
    if preset.num_samples is not None and preset.batch_size:
        out["max_steps"] = max(1, preset.num_samples // preset.batch_size)  # at most num_samples images an epoch
    return out


# --------------------------------------------------------------------------- AugMix splits


def _jsd_wiring(
    model: Compiled, loss: Compiled, label: str, backward_losses: Sequence[str], table: bool
) -> tuple[str, str, str]:
    """(logits output, loss the JSD term joins, "") for --aug-splits, or ("", "", why it cannot be told)."""
    if table:
        return "", "", "an image-table package has no AugMix splits"
    outputs = model.root.outputs
    fed = [n for node in loss.root.flow if label in node_reads(node) for n in node_reads(node) if n in outputs]
    fed = list(dict.fromkeys(fed))
    if len(fed) != 1:
        which = f"several model outputs ({', '.join(f'`{n}`' for n in fed)})" if fed else "no model output"
        return "", "", f"the loss compares the labels (`{label}`) with {which}"
    logits = fed[0]
    shape = (model.output_shapes or {}).get(logits)
    if shape is not None and len(shape) != 1:
        return "", "", f"the model's `{logits}` gives {list(shape)} per sample, not one score per class"
    if len(backward_losses) != 1:
        names = ", ".join(f"`{n}`" for n in backward_losses)
        return "", "", f"the backward takes several losses ({names}), so which one the JSD term joins is not told"
    return logits, backward_losses[0], ""


def _check_splits(part: Compiled, preset: Any, problem: str, table: bool, diags: Diagnostics) -> None:
    """A dataset preset with `aug_splits` >= 2: the splits must be trainable with this package (E1223)."""
    span = _key(part, "aug_splits")
    n = preset.aug_splits
    mixing = [k for k in ("mixup", "cutmix", "cutmix_minmax") if getattr(preset, k)]
    if mixing:
        diags.error(
            "E1223",
            f"`aug_splits: {n}` cannot be combined with `{mixing[0]}`: the JSD loss compares the views of one image, "
            "mixing pairs different images (timm refuses it too)",
            span,
            f"set `{mixing[0]}: 0`, or `aug_splits: 0`",
        )
    if preset.no_aug or not getattr(preset, "training", True):
        diags.error(
            "E1223",
            f"`aug_splits: {n}` with augmentation off (`no_aug` / `training: false`) leaves nothing to augment",
            span,
            "set `aug_splits: 0`",
        )
    if problem and not table:
        diags.error(
            "E1223",
            f"`aug_splits: {n}`: the JSD consistency term needs the model's classification logits, but {problem}",
            span,
            "use a loss that compares the labels with one model output (cfg/losses/cls.yaml), or `aug_splits: 0`",
        )
    elif table:
        diags.error("E1223", f"`aug_splits: {n}`: {problem}", span, "set `aug_splits: 0`")


# --------------------------------------------------------------------------- link


def _model_inputs_span(model: Compiled) -> Span:
    data = model.source.data
    return data.key_span("INPUTS") if isinstance(data, LDict) and "INPUTS" in data else data.span


def _reads(graph: Compiled, name: str) -> Span:
    """The span of the first step of a graph's root that reads `name`."""
    for node in graph.root.flow:
        if name in node_reads(node):
            return node.span
    return graph.source.data.span


def _writes(graph: Compiled, name: str) -> Span:
    for node in graph.root.flow:
        if name in out_names(node.out):
            return node.span
    return graph.source.data.span


def link(name: str, compiled: list[Compiled], build: BuildInfo, allow: AllowList) -> PackageDef:
    """Wire the parts into one PackageDef; every mistake is reported, then raised as one CompileError."""
    diags = Diagnostics()
    by_role = {c.role: c for c in compiled}
    model = by_role["model"]
    loss, metric, backward = by_role.get("loss"), by_role.get("metric"), by_role.get("backward")

    presets: dict[str, tuple[Compiled, Any]] = {}
    for role in PRESET_ROLES:
        part = by_role.get(role)
        if part is not None:
            preset = validate_preset(part, diags)
            if preset is not None:
                presets[role] = (part, preset)
    dataset = presets["dataset"][1] if "dataset" in presets else None
    root = model.root
    if dataset is not None:
        first = (model.input_shapes or {}).get(root.inputs[0]) if root.inputs else None
        image: Sequence[Any] = first["shape"] if first else ()
        channels = int(image[0]) if len(image) == 3 else 3  # train.py's images are C x H x W (RGB)
        _check_dataset(presets["dataset"][0], dataset, channels, diags)
    outputs = tuple(root.outputs)
    known = set(root.inputs) | set(outputs)
    label = "label"
    graphs = [g for g in (loss, metric) if g is not None]
    table_preset: DatasetPreset | None = dataset if dataset is not None and dataset.kind == "image_table" else None
    table = table_preset is not None
    if table_preset is not None:
        _check_table(model, graphs, presets["dataset"][0], table_preset, diags)
    unknown = [n for g in graphs for n in g.root.inputs if n not in known]
    if unknown and not table:
        label = "label" if "label" in unknown else unknown[0]
    for graph in graphs if not table else ():
        for n in graph.root.inputs:
            if n in known or n == label:
                continue
            hint = did_you_mean(n, outputs)
            diags.error(
                "E1200",
                f"{graph.role} input `{n}` is neither the label (`{label}`) nor an output of the model "
                f"({', '.join(outputs)})",
                _reads(graph, n),
                hint or f"the model {model.source.display} produces {', '.join(f'`{o}`' for o in outputs)}",
            )
        images = [n for n in graph.root.inputs if n in root.inputs and n != root.inputs[0] and n != label]
        for n in images:
            diags.error(
                "E1200",
                f"{graph.role} input `{n}` is a model input that train.py has no data for",
                _reads(graph, n),
                f"train.py feeds the images as `{root.inputs[0]}` and the labels as `{label}`",
            )
    if not root.inputs and loss is not None and backward is not None:
        diags.error(
            "E1209",
            "the model takes no inputs, so train.py has nothing to feed it the images with",
            model.source.data.span,
            "declare the images as the model's first input (INPUTS: [image])",
        )
    extra = [n for n in root.inputs[1:] if n != label]
    if extra and (loss is not None and backward is not None) and not table:
        diags.error(
            "E1209",
            f"the model takes {', '.join(f'`{n}`' for n in extra)} besides the images (`{root.inputs[0]}`), "
            "but train.py has data only for the images and the label",
            _model_inputs_span(model),
            f"the model's inputs may be the images and the label (`{label}`); for an image and a vector of "
            "features use a dataset preset of `kind: image_table` (cfg/datasets/digits_table.yaml)",
        )
    if loss is not None and metric is not None:
        for n in metric.root.outputs:
            if n in loss.root.outputs:
                diags.error(
                    "E1207",
                    f"metric output `{n}` is also a loss output; train.py logs them under one name each",
                    _writes(metric, n),
                    "rename the metric output",
                )

    # the classes the data has vs the model's output
    num_classes = None
    if dataset is not None:
        num_classes = dataset.num_classes or (len(dataset.classes) if dataset.classes else None)
    if num_classes is not None and model.output_shapes:
        fed = [n for g in graphs if label in g.root.inputs for n in g.root.inputs if n in outputs]
        if table:  # only the outputs the class labels are compared with, not the regression head
            fed = [n for g in graphs for node in g.root.flow if label in node_reads(node) for n in node_reads(node)]
            fed = [n for n in fed if n in outputs]
        for n in dict.fromkeys(fed):
            shape = model.output_shapes.get(n)
            if shape is not None and len(shape) == 1 and shape[0] != num_classes:
                assert dataset is not None  # num_classes came from it
                part = presets["dataset"][0]
                # A warning, not an error: a head wider than the data still trains (the extra classes
                # never occur), and the model template's own default build must give a package.
                diags.warn(
                    "W1204",
                    f"the dataset preset has {num_classes} classes, but the model's `{n}` gives {shape[0]} "
                    f"per sample",
                    _key(part, "num_classes" if dataset.num_classes else "classes"),
                    f"build the model's head for the data: pass -p num_classes={num_classes} (or the parameter "
                    f"that sets the head's out_features in {model.source.display})",
                )

    # label kinds: what the data yields vs what the loss takes
    recipe_soft = dataset.soft_keys if dataset is not None else ()  # mixup, cutmix, label smoothing
    soft = dataset is not None and (dataset.targets == "soft" or bool(recipe_soft))
    if loss is not None and backward is not None and label in loss.root.inputs:
        found = _label_layer(loss, label, allow)
        if found is not None:
            address, obj, node = found
            if not soft and any(obj is o for o in _objects(SOFT_TARGET_LAYERS)):
                where = (
                    f"the dataset preset {presets['dataset'][0].source.display}"
                    if "dataset" in presets
                    else "the embedded digits (no dataset preset)"
                )
                diags.error(
                    "E1202",
                    f"`{address}` takes soft targets (a probability per class), but {where} yields class indices",
                    node.span,
                    "set `targets: soft` in the dataset preset (for cfg/datasets/digits.yaml: -p targets=soft) "
                    "to feed it one-hot probabilities, or use a loss on class indices such as torch.nn.CrossEntropyLoss",
                )
            if recipe_soft and any(obj is o for o in _objects(CLASS_TARGET_LAYERS)):
                key = recipe_soft[0]
                diags.error(
                    "E1220",
                    f"`{key}` in the dataset preset makes soft targets (a probability per class), but `{address}` "
                    "takes class indices",
                    _key(presets["dataset"][0], key),
                    "use a loss on probabilities (scmc build ... --loss cfg/losses/soft_cls.yaml), "
                    f"or set `{key}: 0`",
                )
            elif soft and any(obj is o for o in _objects(CLASS_TARGET_LAYERS)):
                diags.error(
                    "E1202",
                    f"the dataset preset says `targets: soft`, but `{address}` takes class indices",
                    _key(presets["dataset"][0], "targets"),
                    "remove `targets: soft`, or use a loss on probabilities such as timm.loss.SoftTargetCrossEntropy",
                )

    # the best-checkpoint criterion of the dataset preset names what validation reports
    if dataset is not None and dataset.best_metric and loss is not None and backward is not None:
        names = [*loss.root.outputs, *(metric.root.outputs if metric is not None else ())]
        reported = [f"{prefix}{n}" for prefix in ("val_", "ema_val_", "train_") for n in names]
        if dataset.best_metric not in reported:
            diags.error(
                "E1222",
                f"`best_metric: {dataset.best_metric}` is not reported by train.py (it reports {', '.join(reported)})",
                _key(presets["dataset"][0], "best_metric"),
                did_you_mean(dataset.best_metric, reported) or f"name one of {', '.join(reported[:4])}",
            )

    # the backward: its losses are loss outputs, its model is the package's model
    if backward is not None and backward.backward is not None:
        bdef = backward.backward
        spans = dict(bdef.spans)
        where = backward.source.data.span
        if loss is not None:
            loss_outputs = tuple(loss.root.outputs)
            for n in bdef.losses:
                if n not in loss_outputs:
                    diags.error(
                        "E1201",
                        f"the backward takes loss `{n}`, which the loss {loss.source.display} does not output "
                        f"(its outputs: {', '.join(loss_outputs)})",
                        spans.get(f"loss {n}", where),
                        did_you_mean(n, loss_outputs) or f"name one of {', '.join(loss_outputs)}",
                    )
        if len(bdef.models) > 1:
            diags.error(
                "E1206",
                f"the backward optimizes {len(bdef.models)} models ({', '.join(bdef.models)}); a package trains one",
                spans.get(f"model {bdef.models[1]}", where),
                f"optimize `{bdef.models[0]}` and its submodules (LAYERS: [{bdef.models[0]}.<submodule>])",
            )
        assert model.program is not None  # a model part is layer graphs (model.root read them above)
        for opt in bdef.optimizers:
            for layer in opt.layers:
                missing = _missing_submodule(model.program, layer)
                if missing is not None:
                    attr, have = missing
                    diags.error(
                        "E1205",
                        f"LAYERS entry `{layer}`: the model has no submodule `{attr}`",
                        spans.get(f"layer {layer}", opt.span),
                        did_you_mean(attr, have) or f"its submodules: {', '.join(have)}",
                    )
    jsd: tuple[str, str, str] = ("", "", "")
    if loss is not None and backward is not None and backward.backward is not None:
        jsd = _jsd_wiring(model, loss, label, backward.backward.losses, table)
        if dataset is not None and dataset.aug_splits and dataset.aug_splits > 1:
            _check_splits(presets["dataset"][0], dataset, jsd[2], table, diags)
    diags.raise_if_any()

    training = None
    if loss is not None and backward is not None and backward.backward is not None:
        training = Training(
            label=label,
            soft_targets=num_classes if soft and num_classes else 0,
            backward_losses=tuple(backward.backward.losses),
            defaults=tuple(_train_defaults(presets, model).items()),
            target=TABLE_TARGET if table else "",
            num_features=(table_preset.num_features or 0) if table_preset is not None else 0,
            num_targets=(table_preset.num_targets or 0) if table_preset is not None else 0,
            jsd_logits=jsd[0],
            jsd_loss=jsd[1],
            jsd_problem=jsd[2],
        )
    labels = None
    if dataset is not None and dataset.classes:
        labels = tuple(dataset.classes)
    elif dataset is not None and dataset.kind == "digits":
        labels = tuple(str(i) for i in range(10))
    return PackageDef(
        name=name,
        model=model,
        loss=loss,
        metric=metric,
        backward=backward,
        dataset=dataset,
        ema=presets["ema"][1] if "ema" in presets else None,
        compile=presets["compile"][1] if "compile" in presets else None,
        parts=tuple(compiled),
        training=training,
        build=build,
        class_labels=labels,
        warnings=tuple(diags.warnings),
    )


def _missing_submodule(program: Program, layer: str) -> tuple[str, list[str]] | None:
    """(missing attribute, the attributes there are) when `model.a.b` names no submodule of the root."""
    path = layer.split(".")[1:]
    module = program.module(program.root)
    for attr in path:
        children = {c.attr: c for c in module.children if c.kind != "function"}
        if attr not in children:
            return attr, sorted(children)
        child = children[attr]
        if child.kind != "user":
            return None  # a library module: its own submodules are not known here
        module = program.module(child.ctor.address)
    return None


__all__ = ["BuildInfo", "Compiled", "CompileError", "PackageDef", "Training", "link"]
