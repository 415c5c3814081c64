"""Expansion: every Jinja block of a template resolved (structcast's ``extend_structure`` with
positions), object patterns in their canonical spelling, and what kind of template a mapping is."""

from __future__ import annotations

import time
from typing import Any

from scmc.diagnostics import Span, fail
from scmc.load.budget import _BUDGET, Budget, _budget, _timeout
from scmc.load.common import JINJA_ALIASES, JINJA_GROUP, JINJA_KEYS, JINJA_PIPE, shorten
from scmc.load.located import LDict, LList, plain, span_of
from scmc.load.parameters import Parameters
from scmc.load.render import _render_block


def canonical_patterns(value: Any) -> Any:
    """structcast's mapping spelling of an object pattern, ``{_obj_: [[_addr_, X], [_call_, {...}]]}``,
    rewritten (in place, spans kept) as the list spelling ``[_obj_, {_addr_: X}, {_call_: {...}}]``
    wherever a pattern may stand. A step is a ``[key, value]`` pair or a bare key (``_call_``); any
    other step is E0108. Iterative, so a deep tree cannot overflow the stack."""

    def convert(mapping: LDict) -> LList:
        steps = mapping["_obj_"]
        items: list[Any] = ["_obj_"]
        spans = [mapping.key_span("_obj_")]
        for i, step in enumerate(steps):
            where = steps.item_span(i) if isinstance(steps, LList) else mapping.value_span("_obj_")
            spans.append(where)
            if isinstance(step, str):
                items.append(step)
            elif isinstance(step, list) and len(step) == 2 and isinstance(step[0], str):
                pair = LDict(span=where)
                pair[step[0]] = step[1]
                pair.key_spans[step[0]] = step.item_span(0) if isinstance(step, LList) else where
                pair.value_spans[step[0]] = step.item_span(1) if isinstance(step, LList) else where
                items.append(pair)
            elif isinstance(step, list) and len(step) == 1 and isinstance(step[0], str):
                items.append(step[0])
            else:
                raise fail(
                    "E0108",
                    f"a step of the mapping form of `_obj_` must be [KEY, VALUE] or a bare key, not {shorten(repr(plain(step)), 60)}",
                    where,
                    "e.g. {_obj_: [[_addr_, torch.nn.Linear], [_call_, {in_features: 4, out_features: 2}]]}",
                )
        return LList(items, span=mapping.span, item_spans=spans)

    def is_mapping_form(node: Any) -> bool:
        return isinstance(node, LDict) and len(node) == 1 and "_obj_" in node and isinstance(node["_obj_"], list)

    if is_mapping_form(value):
        value = convert(value)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in list(node.items()):
                if is_mapping_form(child):
                    node[key] = child = convert(child)
                if isinstance(child, (dict, list)):
                    stack.append(child)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                if is_mapping_form(child):
                    node[i] = child = convert(child)
                if isinstance(child, (dict, list)):
                    stack.append(child)
    return value


def template_kind(data: LDict, params: Parameters | None = None) -> str:
    """What a template is: a "layer graph" (FLOW), a "backward" (BACKWARDS) or a "preset"
    (anything else), judged by its keys after rendering: a template whose top level is
    PARAMETERS and a Jinja block that renders INPUTS, OUTPUTS and FLOW is a layer graph, as in
    structcast-model. The raw keys decide when they can (no rendering then); the top level is
    rendered with ``params`` only when they hold neither FLOW nor BACKWARDS beside a Jinja block."""

    def by_keys(mapping: Any) -> str | None:
        if not isinstance(mapping, dict):
            return None
        return "layer graph" if "FLOW" in mapping else "backward" if "BACKWARDS" in mapping else None

    kind = by_keys(data)
    if kind is None and params is not None and any(alias in data for alias in JINJA_ALIASES):
        # only the top level's own block: user layers render with their own parameters, later
        body = LDict({k: v for k, v in data.items() if k in JINJA_KEYS}, span=data.span)
        body.key_spans = dict(data.key_spans)
        body.value_spans = dict(data.value_spans)
        kind = by_keys(expand(body, params))
    return kind or "preset"


def expand(data: Any, params: Parameters, default: str = "default") -> Any:
    """Resolve every Jinja block in ``data`` (structcast's ``extend_structure`` with positions).

    Its time counts against the build's SCMC_MAX_JINJA_SECONDS (see :class:`Budget`)."""
    owned = _BUDGET.get() is None
    token = _BUDGET.set(Budget()) if owned else None
    budget = _budget()
    outer = budget.started is None
    if outer:
        budget.started = time.monotonic()
    try:
        return canonical_patterns(_expand(data, params, default, budget))
    finally:
        if outer and budget.started is not None:
            budget.spent += time.monotonic() - budget.started
            budget.started = None
        if token is not None:
            _BUDGET.reset(token)


def _expand(data: Any, params: Parameters, default: str, budget: Budget) -> Any:
    from scmc.limits import exceeded

    def merge_into(rest: LDict, part: LDict) -> LDict:
        out = LDict(span=rest.span)
        for src in (rest, part):
            for k, v in src.items():
                out[k] = v
                out.key_spans[k] = src.key_span(k)
                out.value_spans[k] = src.value_span(k)
        return out

    def go(node: Any, depth: int) -> Any:
        if depth > budget.passes:
            raise fail(
                "E0310",
                f"values and Jinja passes nest deeper than {budget.passes} levels",
                span_of(node, Span("<template>")),
                hint=f"check for a block that renders itself again ({exceeded('SCMC_MAX_JINJA_PASSES')})",
            )
        if budget.remaining() <= 0:
            raise _timeout(span_of(node, Span("<template>")))
        if isinstance(node, LDict):
            if any(a in node for a in JINJA_ALIASES):
                rest, part = _render_block(node, params, default)
                if not rest:
                    return go(part, depth + 1)
                if isinstance(part, LDict):
                    return go(merge_into(rest, part), depth + 1)
                raise fail("E0312", "this Jinja block sits beside other keys, so it must render a mapping", rest.span)
            out = LDict(span=node.span)
            for k, v in node.items():
                if k in (JINJA_GROUP, JINJA_PIPE):
                    continue
                out[k] = go(v, depth + 1)
                out.key_spans[k] = node.key_span(k)
                out.value_spans[k] = node.value_span(k)
            return out
        if isinstance(node, LList):
            items: list[Any] = []
            spans: list[Span] = []
            resolved = False
            for index, item in enumerate(node):
                if isinstance(item, LDict) and any(a in item for a in JINJA_ALIASES):
                    resolved = True
                    rest, part = _render_block(item, params, default)
                    if rest:
                        if not isinstance(part, LDict):
                            raise fail(
                                "E0312",
                                "this Jinja block sits beside other keys, so it must render a mapping",
                                rest.span,
                            )
                        items.append(merge_into(rest, part))
                        spans.append(node.item_span(index))
                    elif isinstance(part, list):
                        items.extend(part)
                        spans.extend(
                            part.item_spans if isinstance(part, LList) else [node.item_span(index)] * len(part)
                        )
                    elif part is None:
                        continue  # a block that rendered nothing adds no items
                    else:
                        raise fail("E0313", "a Jinja block inside a list must render a list", node.item_span(index))
                else:
                    items.append(item)
                    spans.append(node.item_span(index))
            result = LList(items, span=node.span, item_spans=spans)
            if resolved:
                return go(result, depth + 1)
            return LList([go(v, depth + 1) for v in result], span=node.span, item_spans=spans)
        return node

    return go(data, 0)
