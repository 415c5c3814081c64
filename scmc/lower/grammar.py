"""The FLOW step grammar, checked by hand (it is positional): step forms, layer names, outputs.

Nothing here lowers anything: each function takes what a template wrote and either returns it in
a typed form or raises the diagnostic for the mistake (:func:`~scmc.lower.common.error_at`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scmc.diagnostics import Diagnostics, Span, did_you_mean
from scmc.ir import Out, OutDict, OutName, OutTuple
from scmc.load import LDict
from scmc.lower.common import MODULE_ATTRS, STEP_KEYS, error_at
from scmc.names import is_name


@dataclass
class StepForm:
    """One FLOW step, whichever of its forms it was written in."""

    inputs: Any = None
    outputs: Any = None
    name: Any = None
    layer: Any = None
    has_io: bool = True  # False: a mapping step that only defines a LAYER


def step_form(step: Any, span: Span, diags: Diagnostics) -> StepForm:
    """``[in, out]``, ``[in, out, name]``, ``[in, out, LAYER]``, ``[in, out, name, LAYER]`` or a mapping."""
    if isinstance(step, list):
        return _list_form(step, span)
    if isinstance(step, dict):
        return _mapping_form(step, span, diags)
    raise error_at("E0726", f"a FLOW step must be a list or a mapping, not {type(step).__name__}", span)


def _list_form(step: list, span: Span) -> StepForm:
    n = len(step)
    if n == 2:
        return StepForm(step[0], step[1])
    if n == 3:
        inputs, outputs, third = step
        if isinstance(third, str):
            return StepForm(inputs, outputs, name=third)
        return StepForm(inputs, outputs, layer=third)
    if n == 4:
        return StepForm(*step)
    raise error_at(
        "E0722",
        f"a FLOW step has 2 to 4 elements; this one has {n}",
        span,
        "[in, out], [in, out, name], [in, out, LAYER] or [in, out, name, LAYER]",
    )


def _mapping_form(step: dict, span: Span, diags: Diagnostics) -> StepForm:
    for k in step:
        if k not in STEP_KEYS:
            diags.error(
                "E0723",
                f"unknown key `{k}` in a FLOW step",
                step.key_span(k) if isinstance(step, LDict) else span,
                did_you_mean(str(k), STEP_KEYS) or "a step mapping has INPUTS, OUTPUTS, NAME and LAYER",
            )
    if ("INPUTS" in step) != ("OUTPUTS" in step):
        missing = "OUTPUTS" if "INPUTS" in step else "INPUTS"
        raise error_at(
            "E0724",
            f"this step has {'INPUTS' if missing == 'OUTPUTS' else 'OUTPUTS'} but no {missing}; "
            "INPUTS and OUTPUTS come together or not at all",
            span,
            f"add {missing}, or drop both to only define the layer",
        )
    form = StepForm(step.get("INPUTS"), step.get("OUTPUTS"), step.get("NAME"), step.get("LAYER"), "INPUTS" in step)
    if not form.has_io and form.layer is None:
        raise error_at("E0725", "a step without INPUTS/OUTPUTS must define a LAYER", span)
    return form


def check_layer_name(name: Any, span: Span) -> None:
    """A step's layer name becomes an attribute of the generated class."""
    if not is_name(name):
        raise error_at(
            "E0727",
            f"layer name `{name}` is not a valid Python identifier",
            span,
            "names become attributes of the generated class: use letters, digits and _",
        )
    if name.startswith("__"):
        raise error_at(
            "E0728",
            f"layer name `{name}` is reserved: names starting with `__` are special in a Python class",
            span,
            f"rename it, e.g. `{name.strip('_') or 'layer'}`",
        )
    if name in MODULE_ATTRS:
        raise error_at(
            "E0728",
            f"layer name `{name}` would shadow torch.nn.Module.{name}",
            span,
            f"rename it, e.g. `{name}_layer`",
        )


def defined_name(step: Any) -> str | None:
    """The layer name a (possibly broken) step meant to define, if it says so plainly."""
    if isinstance(step, list) and len(step) in (3, 4) and is_name(step[2]):
        return step[2]
    if isinstance(step, dict) and is_name(step.get("NAME")):
        return step["NAME"]
    return None


def step_outputs(raw: Any, span: Span) -> Out:
    """A step's OUTPUTS: a name, a (nested) list of names, or {name: key of the result}."""
    if isinstance(raw, str):
        if not is_name(raw):
            raise error_at("E0735", f"output name `{raw}` is not a valid Python identifier", span)
        return OutName(raw)
    if isinstance(raw, list):
        if not raw:
            raise error_at("E0735", "an output list must name at least one value", span)
        return OutTuple(tuple(step_outputs(v, span) for v in raw))
    if isinstance(raw, dict):
        pairs = []
        for k, v in raw.items():
            if not is_name(k):
                raise error_at("E0735", f"output name `{k}` is not a valid Python identifier", span)
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise error_at("E0735", f"output `{k}` must name a key (string or integer) of the result", span)
            pairs.append((k, v))
        return OutDict(tuple(pairs))
    raise error_at("E0735", f"unsupported output `{raw}`", span)


def nesting_depth(value: Any) -> int:
    """Nesting of a plain value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    return deepest
