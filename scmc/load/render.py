"""Rendering one Jinja block (``_jinja_yaml_``, ``_jinja_json_``, ``_jinja_``, with ``_jinja_group_``
and ``_jinja_pipe_``) within the build's budget, every failure a diagnostic at the block."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from scmc.diagnostics import CompileError, Span, did_you_mean, fail
from scmc.load.budget import Budget, _budget, _timeout
from scmc.load.common import JINJA_ALIASES, JINJA_GROUP, JINJA_JSON, JINJA_KEYS, JINJA_PIPE, JINJA_YAML, shorten
from scmc.load.filters import TemplateRaised
from scmc.load.located import LDict, plain, relocate
from scmc.load.parameters import _GROUPS_CACHE, Parameters
from scmc.load.parse import _RENDERED_CACHE, _plain_data, _too_deep, int_too_long, parse_rendered_yaml
from scmc.load.sandbox import JinjaTooBig, _check_nesting, jinja_environment

_TEMPLATE_CACHE: dict[str, Any] = {}


def clear_caches() -> None:
    """Forget the in-process memos (parsed rendered blocks, validated parameter groups, compiled
    Jinja templates), so that the next build costs what it costs in a fresh process."""
    _RENDERED_CACHE.clear()
    _GROUPS_CACHE.clear()
    _TEMPLATE_CACHE.clear()


def _render(source: str, variables: Mapping[str, Any], span: Span, text_span: Span | None = None) -> str:
    """Render ``source``; errors point at ``span`` (the block), syntax errors at their line of ``text_span``."""
    from jinja2 import TemplateSyntaxError, UndefinedError
    from jinja2.sandbox import SecurityError

    env = jinja_environment()
    budget = _budget()
    template = _TEMPLATE_CACHE.get(source)
    first = text_span or Span(span.path, span.line + 1)  # where the template text starts
    if template is None:
        _check_nesting(env, source, budget.nesting, first)
        try:
            template = env.from_string(source)
        except TemplateSyntaxError as exc:
            line = first.line + max((exc.lineno or 1) - 1, 0)
            raise fail("E0300", f"Jinja syntax error: {exc.message}", Span(span.path, line, 1)) from None
        except (RecursionError, MemoryError, SyntaxError) as exc:
            # a long chain of operators or filters: Jinja's compiler or Python's recurses too deeply
            raise fail(
                "E0315",
                f"this Jinja block is too deeply nested to compile ({type(exc).__name__})",
                span,
                hint="split long expressions and deep nesting of tags or brackets into several blocks or `set`s",
            ) from None
        _TEMPLATE_CACHE[source] = template
    try:
        return _render_limited(template, dict(variables), budget)  # a mapping, so a parameter may be called `self`
    except JinjaTooBig as exc:
        raise fail(
            "E0314",
            f"Jinja block too large: {exc}",
            span,
            hint=f"templates describe layers; they do not need values this large ({exc.how})",
        ) from None
    except MemoryError:
        raise fail(
            "E0314",
            "Jinja block too large: rendering it ran out of memory",
            span,
            hint="templates describe layers; they do not need values this large",
        ) from None
    except RenderTimeout:
        raise _timeout(span) from None
    except RecursionError:
        raise fail(
            "E0310", "Jinja rendering recursed too deeply", span, hint="a macro calls itself without end"
        ) from None
    except TemplateRaised as exc:
        raise fail("E0301", f"the template refused these parameters: {exc}", span) from None
    except UndefinedError as exc:
        names = sorted(variables)
        missing = re.search(r"'([^']+)' is undefined", str(exc))
        hint = did_you_mean(missing.group(1), names) if missing else ""
        raise fail(
            "E0302",
            f"Jinja: {exc.message}",
            span,
            hint=hint
            or (f"variables available here: {', '.join(names)}" if names else "no parameters are defined here"),
        ) from None
    except SecurityError as exc:
        raise fail("E0303", f"Jinja sandbox refused: {exc}", span, hint="templates may only read parameters") from None
    except CompileError:
        raise
    except Exception as exc:  # an error raised by a filter or an operation on parameter values
        raise fail("E0304", f"Jinja rendering failed: {type(exc).__name__}: {exc}", span) from None


class RenderTimeout(Exception):
    pass


def _render_limited(template: Any, variables: dict[str, Any], budget: Budget) -> str:
    """Render with the output capped at SCMC_MAX_JINJA_BLOCK_CHARS (and what is left of the build's
    SCMC_MAX_JINJA_BUILD_CHARS) and, in the main thread, the time at what is left of the build's
    SCMC_MAX_JINJA_SECONDS (a SIGALRM timer: a loop that prints nothing yields no chance to check)."""
    import signal
    import threading

    from scmc.limits import exceeded

    left = budget.remaining()
    if left <= 0:
        raise RenderTimeout()
    timer = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    )
    if timer:

        def expired(signum: int, frame: Any) -> None:
            raise RenderTimeout()

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, left)
    try:
        pieces: list[str] = []
        total = 0
        for piece in template.generate(variables):
            total += len(piece)
            if total > budget.block_chars:
                raise JinjaTooBig(
                    f"it renders more than {budget.block_chars:,} characters", exceeded("SCMC_MAX_JINJA_BLOCK_CHARS")
                )
            if budget.rendered + total > budget.chars:
                raise JinjaTooBig(
                    f"the blocks of this build render more than {budget.chars:,} characters",
                    exceeded("SCMC_MAX_JINJA_BUILD_CHARS"),
                )
            pieces.append(piece)
        budget.rendered += total
        return "".join(pieces)
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


_SAFE_PIPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "tuple": list}


def _pipe_step(name: str, value: Any, span: Span) -> Any:
    """One cast of a `_jinja_pipe_`; a value it cannot cast is a diagnostic at the pipe."""
    try:
        if name in ("json.loads", "json"):
            if not isinstance(value, str):
                raise TypeError(f"it takes the rendered text, not a {type(plain(value)).__name__}")
            return _json_block(value, span)
        if name == "int" and isinstance(value, str):
            message = int_too_long(sum(c.isdigit() for c in value))
            if message:
                raise ValueError(message)
        return _SAFE_PIPES[name](value)
    except CompileError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise fail(
            "E0316",
            f"`_jinja_pipe_` step `{name}` cannot cast {shorten(repr(plain(value)), 60)}: {exc}",
            span,
            hint="the pipe casts what the block rendered; make the block render a value of that type",
        ) from None


def _apply_pipe(value: Any, pipe: Any, span: Span) -> Any:
    items = pipe if isinstance(pipe, list) and not (pipe and pipe[0] == "_obj_") else [pipe]
    for item in items:
        name = item
        if isinstance(item, list) and len(item) == 2 and item[0] == "_obj_" and isinstance(item[1], dict):
            name = item[1].get("_addr_")
        if name in ("json.loads", "json") or name in _SAFE_PIPES:
            value = _pipe_step(name, value, span)
        else:
            raise fail(
                "E0305",
                f"`_jinja_pipe_` step `{plain(item)}` is not allowed",
                span,
                hint="pipes may only cast: int, float, str, bool, list, dict, json.loads",
            )
    return value


def _render_block(node: LDict, groups: Parameters, default: str) -> tuple[LDict, Any]:
    """Render the Jinja block of a mapping. Returns (the other keys, the rendered value)."""
    aliases = [a for a in JINJA_ALIASES if a in node]
    if len(aliases) > 1:
        raise fail("E0306", f"one mapping holds several Jinja blocks: {', '.join(aliases)}", node.key_span(aliases[1]))
    alias = aliases[0]
    source = node[alias]
    span = node.key_span(alias)
    if not isinstance(source, str):
        raise fail("E0307", f"`{alias}` must be a string holding a Jinja template", node.value_span(alias))
    group_name = node.get(JINJA_GROUP) or default
    variables = groups.group(str(group_name))
    _budget().groups_used.add(str(group_name))
    if variables is None:
        raise fail(
            "E0308",
            f"`{JINJA_GROUP}: {group_name}` names no parameter group",
            node.value_span(JINJA_GROUP) if JINJA_GROUP in node else span,
            hint=did_you_mean(str(group_name), groups.groups) or f"groups: {', '.join(sorted(groups.groups))}",
        )
    text = _render(source, variables, span, node.value_span(alias))
    block_span = Span(span.path, span.line, span.col, "in the output of this Jinja block")
    if alias == JINJA_YAML:
        try:
            value = parse_rendered_yaml(text, span.path)
        except CompileError as exc:
            diag = exc.diagnostics[0]
            inner = diag.span.line if diag.span else 0
            raise fail(
                diag.code, f"{diag.message} (line {inner} of the rendered block:\n{_excerpt(text, inner)})", span
            ) from None
        value = relocate(value, block_span)
    elif alias == JINJA_JSON:
        value = relocate(_json_block(text, span), block_span)
    else:
        value = text
    if JINJA_PIPE in node:
        value = _apply_pipe(value, node[JINJA_PIPE], node.key_span(JINJA_PIPE))
    rest = LDict(span=node.span)
    for key, item in node.items():
        if key not in JINJA_KEYS:
            rest[key] = item
            rest.key_spans[key] = node.key_span(key)
            rest.value_spans[key] = node.value_span(key)
    return rest, value


class _JsonInt(ValueError):
    pass


def _json_block(text: str, span: Span) -> Any:
    """The value of a `_jinja_json_` block: integers and nesting bounded like YAML's."""

    def parse_int(digits: str) -> int:
        message = int_too_long(len(digits.lstrip("-")))
        if message:
            raise _JsonInt(message)
        return int(digits)

    try:
        value = json.loads(text, parse_int=parse_int)
    except _JsonInt as exc:
        raise fail("E0107", f"in the JSON this Jinja block rendered: {exc}", span) from None
    except json.JSONDecodeError as exc:
        raise fail("E0309", f"the Jinja block did not render valid JSON: {exc}", span) from None
    except (RecursionError, ValueError) as exc:
        raise fail("E0309", f"the Jinja block did not render usable JSON: {exc}", span) from None
    if not _plain_data(value):
        raise _too_deep(span.path, 0, "", span)
    return value


def _excerpt(text: str, line: int) -> str:
    lines = text.splitlines()
    lo, hi = max(line - 3, 0), min(line + 2, len(lines))
    return "\n".join(f"    {i + 1:>3} | {shorten(lines[i], 160)}" for i in range(lo, hi))
