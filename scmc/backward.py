"""Backward templates (spec section 3): schema, validation and lowering to a BackwardDef.

The rendered template is validated with pydantic; its error locations are mapped back to
YAML positions. Patterns (OPTIMIZER, CLIP) go through the same allow-list and value rules
as layer arguments (:class:`scmc.lower.Lowerer`).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from scmc.diagnostics import CompileError, Diagnostic, Diagnostics, Span, did_you_mean
from scmc.ir import BackwardDef, BackwardStepDef, Ctor, OptimizerDef
from scmc.load import LDict, LList, Parameters, Source, expand, plain
from scmc.lower import Lowerer, Options
from scmc.names import NameClash, Namespace, is_name
from scmc.schema import locate
from scmc.schema import validation_diagnostics as schema_diagnostics

BACKWARD_KEYS = (
    "PARAMETERS",
    "IMPORTS",
    "MIXED_PRECISION",
    "MIXED_PRECISION_TYPE",
    "ACCUMULATE_GRADIENTS",
    "BACKWARDS",
    "LOSSES",
    "MODELS",
)


class OptimizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    NAME: str | None = None
    OPTIMIZER: list[Any]
    LAYERS: Union[str, list[str]]
    CLIP: list[Any] | None = None


class BackwardSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # other keys are keyword arguments of `.backward()`

    NAME: str | None = None
    LOSS: str
    OPTIMIZERS: list[OptimizerSpec] = Field(min_length=1)


class BackwardTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    PARAMETERS: Any = None
    IMPORTS: Any = None
    MIXED_PRECISION: Union[bool, dict[str, Any]] = False
    MIXED_PRECISION_TYPE: Literal["bfloat16", "float16"] | None = None
    ACCUMULATE_GRADIENTS: PositiveInt | None = None
    BACKWARDS: list[BackwardSpec] = Field(min_length=1)
    LOSSES: list[str] = Field(default_factory=list)
    MODELS: list[str] = Field(default_factory=list)


def _as_mapping(item: LList, keys: tuple[str, ...]) -> LDict:
    """A tuple-form item as the mapping it stands for; each key takes its element's span."""
    out = LDict(span=item.span)
    for index, (key, value) in enumerate(zip(keys, item, strict=True)):
        if key == "**":  # the backward() keyword arguments that end a 3- or 4-element BACKWARDS item
            for k, v in value.items():
                out[k] = v
                out.key_spans[k] = value.key_span(k) if isinstance(value, LDict) else item.item_span(index)
                out.value_spans[k] = value.value_span(k) if isinstance(value, LDict) else item.item_span(index)
            continue
        out[key] = value
        out.key_spans[key] = item.item_span(index)
        out.value_spans[key] = item.item_span(index)
    return out


def _optimizer_keys(item: list) -> tuple[str, ...] | None:
    """The keys of a tuple-form OPTIMIZERS item, as structcast-model's schema reads them: 2
    elements `[OPTIMIZER, LAYERS]`, 4 `[NAME, OPTIMIZER, LAYERS, CLIP]`; of 3, a string (or null)
    first is a NAME, `[NAME, OPTIMIZER, LAYERS]`, anything else (a pattern) the OPTIMIZER,
    `[OPTIMIZER, LAYERS, CLIP]`. None for any other length."""
    if len(item) == 2:
        return ("OPTIMIZER", "LAYERS")
    if len(item) == 3:
        if isinstance(item[0], str) or item[0] is None:
            return ("NAME", "OPTIMIZER", "LAYERS")
        return ("OPTIMIZER", "LAYERS", "CLIP")
    if len(item) == 4:
        return ("NAME", "OPTIMIZER", "LAYERS", "CLIP")
    return None


def _backward_keys(item: list) -> tuple[str, ...] | None:
    """The keys of a tuple-form BACKWARDS item: `[LOSS, OPTIMIZERS]`, `[NAME, LOSS, OPTIMIZERS]`;
    of 3 elements, a mapping last after a list is `[LOSS, OPTIMIZERS, {backward() kwargs}]`;
    4 elements `[NAME, LOSS, OPTIMIZERS, {backward() kwargs}]`. None for any other length."""
    if len(item) == 2:
        return ("LOSS", "OPTIMIZERS")
    if len(item) == 3:
        if isinstance(item[1], list) and isinstance(item[2], dict):
            return ("LOSS", "OPTIMIZERS", "**")
        return ("NAME", "LOSS", "OPTIMIZERS")
    if len(item) == 4 and isinstance(item[3], dict):
        return ("NAME", "LOSS", "OPTIMIZERS", "**")
    return None


def canonical_backwards(tree: Any) -> Any:
    """structcast-model's spellings of BACKWARDS rewritten (spans kept) as the mapping form the
    rest of the compiler reads: a single BACKWARDS mapping becomes a list of one; a BACKWARDS item
    written as a list (`[LOSS, OPTIMIZERS]`, `[NAME, LOSS, OPTIMIZERS]`) and an OPTIMIZERS item
    written as a list (`[OPTIMIZER, LAYERS]`, `[OPTIMIZER, LAYERS, CLIP]`, `[NAME, OPTIMIZER,
    LAYERS]`, `[NAME, OPTIMIZER, LAYERS, CLIP]`) become mappings. A list of another length is
    E1020 (BACKWARDS) or E1021 (OPTIMIZERS) at the item."""
    if not isinstance(tree, LDict):
        return tree
    backwards = tree.get("BACKWARDS")
    if isinstance(backwards, LDict):
        backwards = tree["BACKWARDS"] = LList([backwards], span=backwards.span)
    if not isinstance(backwards, LList):
        return tree
    diags = Diagnostics()
    for b_index, item in enumerate(backwards):
        span = backwards.item_span(b_index)
        if isinstance(item, list):
            keys = _backward_keys(item)
            if keys is None:
                diags.error(
                    "E1020",
                    f"a BACKWARDS item written as a list must be [LOSS, OPTIMIZERS] or [NAME, LOSS, OPTIMIZERS], "
                    f"not a list of {len(item)} element{'s' if len(item) != 1 else ''}"
                    + (" without a mapping of backward() arguments last" if len(item) == 4 else ""),
                    span,
                    "e.g. [ce_loss, [[OPTIMIZER, [model]]]]: OPTIMIZERS is a list of optimizer items; a mapping of "
                    "backward() arguments may follow it, [NAME, LOSS, OPTIMIZERS, {retain_graph: true}]",
                )
                continue
            item = backwards[b_index] = _as_mapping(_located(item, span), keys)
        if not isinstance(item, LDict):
            continue
        optimizers = item.get("OPTIMIZERS")
        if not isinstance(optimizers, LList):
            continue
        for o_index, opt in enumerate(optimizers):
            if not isinstance(opt, list):
                continue
            o_span = optimizers.item_span(o_index)
            keys = _optimizer_keys(opt)
            if keys is None:
                diags.error(
                    "E1021",
                    f"an OPTIMIZERS item written as a list must have 2, 3 or 4 elements, not {len(opt)}",
                    o_span,
                    "write [OPTIMIZER, LAYERS], [OPTIMIZER, LAYERS, CLIP], [NAME, OPTIMIZER, LAYERS] or "
                    "[NAME, OPTIMIZER, LAYERS, CLIP]",
                )
                continue
            optimizers[o_index] = _as_mapping(_located(opt, o_span), keys)
    diags.raise_if_any()
    return tree


def _located(item: list, span: Span) -> LList:
    return item if isinstance(item, LList) else LList(item, span=span)


def _known_keys(loc: tuple) -> tuple[str, ...]:
    return BACKWARD_KEYS if not loc else tuple(OptimizerSpec.model_fields)


def validation_diagnostics(exc: ValidationError, tree: Any, default: Span, what: str) -> list[Diagnostic]:
    return schema_diagnostics(exc, tree, default, what, "E1000", _known_keys)


def lower_backward(source: Source, params: Parameters, classname: str, options: Options) -> BackwardDef:
    diags = Diagnostics()
    raw = LDict({k: v for k, v in source.data.items() if k != "PARAMETERS"}, span=source.data.span)
    raw.key_spans = dict(source.data.key_spans)
    raw.value_spans = dict(source.data.value_spans)
    tree = canonical_backwards(expand(raw, params))
    try:
        spec = BackwardTemplate.model_validate(plain(tree))
    except ValidationError as exc:
        raise CompileError(validation_diagnostics(exc, tree, source.data.span, "a backward template")) from None

    lowerer = Lowerer(options, diags)
    optimizers: list[OptimizerDef] = []
    steps: list[BackwardStepDef] = []
    optimizer_names = Namespace()  # a NAME given is kept (E1002 if it cannot be); others optimizer, optimizer_2
    step_names = Namespace()  # backward, backward_2
    layer_spans: dict[str, Span] = {}
    for b_index, backward in enumerate(spec.BACKWARDS):
        b_tree = tree["BACKWARDS"][b_index]
        b_span = tree["BACKWARDS"].item_span(b_index)
        if not is_name(backward.LOSS):
            diags.error(
                "E1001", f"LOSS `{backward.LOSS}` is not a valid Python identifier", locate(b_tree, ("LOSS",), b_span)
            )
        names = []
        for o_index, opt in enumerate(backward.OPTIMIZERS):
            o_tree = b_tree["OPTIMIZERS"][o_index]
            o_span = b_tree["OPTIMIZERS"].item_span(o_index)
            if opt.NAME is None:
                name = optimizer_names.fresh("optimizer")
            else:
                try:
                    name = optimizer_names.claim(opt.NAME)
                except NameClash:
                    diags.error(
                        "E1002",
                        f"optimizer NAME `{opt.NAME}` is not a unique Python identifier",
                        locate(o_tree, ("NAME",), o_span),
                    )
                    continue
            layers = (opt.LAYERS,) if isinstance(opt.LAYERS, str) else tuple(opt.LAYERS)
            for layer in layers:
                if not all(is_name(p) for p in layer.split(".")):
                    diags.error(
                        "E1003",
                        f"LAYERS entry `{layer}` must be a model name or model.submodule",
                        locate(o_tree, ("LAYERS",), o_span),
                    )
            try:
                factory, takes_schedule = _factory(
                    lowerer, opt.OPTIMIZER, locate(o_tree, ("OPTIMIZER",), o_span), o_tree.get("OPTIMIZER")
                )
                clip = _clip(lowerer, opt.CLIP, locate(o_tree, ("CLIP",), o_span)) if opt.CLIP is not None else None
            except CompileError as exc:
                diags.extend(exc.diagnostics)
                continue
            optimizers.append(OptimizerDef(name, factory, layers, clip, takes_schedule, o_span))
            layer_spans[name] = locate(o_tree, ("LAYERS",), o_span)
            names.append(name)
        extra = tuple((k, v) for k, v in (backward.model_extra or {}).items())
        for key, _ in extra:
            if key not in ("retain_graph", "create_graph", "inputs"):
                diags.error(
                    "E1004",
                    f"`{key}` is not an argument of Tensor.backward()",
                    locate(b_tree, (key,), b_span),
                    did_you_mean(key, ("retain_graph", "create_graph")),
                )
        steps.append(
            BackwardStepDef(
                step_names.fresh(backward.NAME or "backward"),
                backward.LOSS,
                tuple(names),
                extra,
                locate(b_tree, ("LOSS",), b_span),
            )
        )
    diags.raise_if_any()

    models = list(spec.MODELS)
    spans = [(f"model {m}", locate(tree, ("MODELS", i), source.data.span)) for i, m in enumerate(models)]
    for odef in optimizers:
        for layer in odef.layers:
            root = layer.split(".")[0]
            spans.append((f"layer {layer}", layer_spans[odef.name]))
            if root not in models:
                models.append(root)
                spans.append((f"model {root}", layer_spans[odef.name]))
    losses = list(spec.LOSSES) or []
    spans += [(f"loss {n}", locate(tree, ("LOSSES", i), source.data.span)) for i, n in enumerate(losses)]
    for step in steps:
        if step.loss not in losses:
            losses.append(step.loss)
            spans.append((f"loss {step.loss}", step.span))

    enabled = (
        spec.MIXED_PRECISION if isinstance(spec.MIXED_PRECISION, bool) else spec.MIXED_PRECISION.get("enabled", True)
    )
    autocast = spec.MIXED_PRECISION_TYPE if enabled else None
    if enabled and autocast is None:
        raise CompileError(
            [
                Diagnostic(
                    "E1005",
                    "MIXED_PRECISION is on but MIXED_PRECISION_TYPE is not set",
                    source.data.key_span("MIXED_PRECISION"),
                    "set MIXED_PRECISION_TYPE: bfloat16 (or float16)",
                )
            ]
        )
    scaler = None
    if autocast == "float16":
        kwargs = dict(spec.MIXED_PRECISION) if isinstance(spec.MIXED_PRECISION, dict) else {}
        kwargs.pop("enabled", None)
        scaler = tuple((k, lowerer._value(v, source.data.key_span("MIXED_PRECISION"))) for k, v in kwargs.items())
    return BackwardDef(
        classname,
        tuple(models),
        tuple(losses),
        tuple(optimizers),
        tuple(steps),
        autocast,
        scaler,
        spec.ACCUMULATE_GRADIENTS or 1,
        source.display,
        tuple(spans),
    )


def _factory(lowerer: Lowerer, raw: list, span: Span, tree: Any = None) -> tuple[Ctor, bool]:
    if not raw or raw[0] != "_obj_":
        raise CompileError([Diagnostic("E1006", "OPTIMIZER must be an `_obj_` pattern", span)])
    address, obj, call, bind_args, bind_kwargs, call_args, call_kwargs = lowerer._pattern_parts(raw, span)
    if call is not None:
        raise CompileError(
            [
                Diagnostic(
                    "E1007",
                    "OPTIMIZER is called with the parameters; bind its arguments with `_bind_`, not `_call_`",
                    span,
                    "replace `_call_` with `_bind_`",
                )
            ]
        )
    if not callable(obj):
        raise CompileError([Diagnostic("E1008", f"`{address}` is not callable", span)])
    try:
        sig = inspect.signature(obj)
        takes_schedule = "updates_per_epoch" in sig.parameters
    except (TypeError, ValueError):
        takes_schedule = False
    lowerer._check_signature(obj, address, (None, *bind_args), bind_kwargs, span, partial=True)
    _check_regexes(obj, bind_args, bind_kwargs, tree, span)
    return Ctor(address, tuple(bind_args), tuple(bind_kwargs.items())), takes_schedule


def _regex_takers() -> tuple:
    from scmc_runtime import optim

    return (optim.create_with_scheduler, optim.create, optim.param_groups)


def _check_regexes(obj: Any, bind_args: list, bind_kwargs: dict, tree: Any, span: Span) -> None:
    """The parameter-name regexes a runtime optimizer factory will match (layer_group_regexes,
    weight_decay_regexes, no_weight_decay_regexes) are checked now: a pattern that can backtrack
    exponentially would hang training in C, where nothing can stop it (E1009)."""
    from scmc_runtime.regexes import REGEX_FIELDS, regex_problem

    from scmc.limits import int_limit

    if not any(obj is taker for taker in _regex_takers()):
        return
    try:
        bound = inspect.signature(obj).bind_partial(None, *bind_args, **bind_kwargs).arguments
    except TypeError:
        return  # reported by _check_signature
    places = [bound, bound.get("optimizer_kwargs")]
    maximum = int_limit("SCMC_MAX_REGEX_LENGTH")
    diags = Diagnostics()
    for place in places:
        if not isinstance(place, dict):
            continue
        for field in REGEX_FIELDS:
            value = place.get(field)
            patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
            for index, pattern in enumerate(patterns):
                problem = regex_problem(pattern, maximum)
                if problem:
                    where = _key_span(tree, field, index) or span
                    diags.error(
                        "E1009",
                        f"`{field}` pattern {str(pattern)[:60]!r} is refused: {problem}",
                        where,
                        hint="write it without nested or ambiguous repetition, e.g. `^(?:\\w+\\.)*bias$`; "
                        f"the length limit is {maximum:,}, set SCMC_MAX_REGEX_LENGTH to raise it",
                    )
    diags.raise_if_any()


def _key_span(tree: Any, key: str, index: int) -> Span | None:
    """Where ``key`` (its item ``index`` when it is a list) is written in ``tree``, searched breadth-first."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, LDict):
            if key in node:
                value = node[key]
                if isinstance(value, LList):
                    return value.item_span(index)
                return node.value_span(key)
            queue.extend(node.values())
        elif isinstance(node, LList):
            queue.extend(node)
    return None


def _clip(lowerer: Lowerer, raw: list, span: Span) -> Ctor:
    if not raw or raw[0] != "_obj_":
        raise CompileError([Diagnostic("E1006", "CLIP must be an `_obj_` pattern or null", span)])
    address, obj, call, bind_args, bind_kwargs, _, _ = lowerer._pattern_parts(raw, span)
    if call is not None:
        raise CompileError(
            [Diagnostic("E1007", "CLIP is called with the parameters; bind its arguments with `_bind_`", span)]
        )
    lowerer._check_signature(obj, address, (None, *bind_args), bind_kwargs, span, partial=True)
    return Ctor(address, tuple(bind_args), tuple(bind_kwargs.items()))
