"""The Jinja environment: structcast's sandbox with scmc's filters and size guards (no operation builds
a value beyond SCMC_MAX_JINJA_VALUE, _ARGUMENT or _BITS; tags and brackets nest within
SCMC_MAX_JINJA_NESTING)."""

from __future__ import annotations

import re
from typing import Any, Iterator

from scmc.diagnostics import Span, fail
from scmc.load.filters import FILTERS

_ENV = None


# Size guards of the Jinja sandbox. Jinja's own sandbox stops attribute escapes and caps
# `range`, but `'a' * 10**9`, `10 ** 10**9`, `'%0999999999d' % 1` or `'a'.ljust(10**9)` would
# still exhaust memory or time: such operations are refused with a diagnostic.
# The values are those of scmc.limits, read again at the start of each build (Budget()).
MAX_JINJA_INT = 100_000  # the largest int a filter or method takes as an argument (Jinja's MAX_RANGE)
MAX_JINJA_LENGTH = 1_000_000  # the longest string or list one operation may build
MAX_JINJA_BITS = 65_536  # the largest integer `**` may build


def _set_value_limits() -> None:
    from scmc.limits import int_limit

    global MAX_JINJA_INT, MAX_JINJA_LENGTH, MAX_JINJA_BITS
    MAX_JINJA_INT = int_limit("SCMC_MAX_JINJA_ARGUMENT")
    MAX_JINJA_LENGTH = int_limit("SCMC_MAX_JINJA_VALUE")
    MAX_JINJA_BITS = int_limit("SCMC_MAX_JINJA_BITS")


_WIDE_FORMAT = re.compile(r"%[-#0 +]*(\*|\d{6,})|%[-#0 +]*\d*\.(\*|\d{6,})|\{[^{}]*:[^{}]*(\d{6,}|\{)")


class JinjaTooBig(Exception):
    """An operation in a Jinja block would build a value beyond the sandbox's size guards."""

    def __init__(self, message: str, how: str = ""):
        super().__init__(message)
        self.how = how or "the limits are SCMC_MAX_JINJA_VALUE, SCMC_MAX_JINJA_ARGUMENT and SCMC_MAX_JINJA_BITS"


_OPENING_TAGS = {"if", "for", "macro", "call", "filter", "with", "block", "autoescape", "trans"}
_BRACKETS = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}


def _check_nesting(env: Any, source: str, maximum: int, first: Span) -> None:
    """Refuse a template whose tags or brackets nest deeper than SCMC_MAX_JINJA_NESTING before Jinja's
    recursive parser and compiler (and Python's, which has its own limits) see it. Lexing is iterative."""
    from jinja2 import TemplateSyntaxError

    from scmc.limits import exceeded

    depth = brackets = 0
    in_tag = False
    tag: list[str] = []  # the tokens of the `{% ... %}` tag being read
    try:
        tokens = env.lex(source)
        for lineno, kind, value in tokens:
            if kind == "block_begin":
                tag, in_tag = [], True
                continue
            if kind == "block_end":
                name = tag[0] if tag else ""
                if name in _OPENING_TAGS or (name == "set" and "=" not in tag):
                    depth += 1
                elif name.startswith("end"):
                    depth -= 1
                in_tag = False
            elif in_tag and kind != "whitespace":
                tag.append(value)
            if kind == "operator" and value in _BRACKETS:
                brackets += _BRACKETS[value]
            if max(depth, brackets) > maximum:
                raise fail(
                    "E0315",
                    f"Jinja tags or brackets nest more than {maximum} levels deep",
                    Span(first.path, first.line + lineno - 1, 1),
                    hint=f"templates nest a few levels; check for a runaway tag or bracket ({exceeded('SCMC_MAX_JINJA_NESTING')})",
                )
    except TemplateSyntaxError:
        return  # reported with its line by from_string


def _sized(value: Any, cap: int | None = None) -> int:
    """The size of a value as memory sees it: characters of strings, plus one per item, through
    nested lists, tuples and dicts (so a list of 8,000 strings of 100,000 characters is 800 million,
    not 8,000). An iterative walk that stops once it passes ``cap`` (default: MAX_JINJA_LENGTH)."""
    cap = MAX_JINJA_LENGTH if cap is None else cap
    total, stack = 0, [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3
    return total


def _too_big(size: int, what: str = "the block builds a value") -> JinjaTooBig:
    return JinjaTooBig(f"{what} of more than {MAX_JINJA_LENGTH:,} characters and items (at least {size:,})")


def _guard_result(value: Any) -> Any:
    size = _sized(value)
    if size > MAX_JINJA_LENGTH:
        raise _too_big(size)
    return value


def _counted(iterator: Iterator[Any]) -> Iterator[Any]:
    """A lazy sequence (`range(8000)|map('center', 100000)`) whose items are counted as they are
    made, so `|list` or `|join` stops at the limit instead of after building all of it."""
    total = 0
    for item in iterator:
        total += _sized(item) + 1
        if total > MAX_JINJA_LENGTH:
            raise _too_big(total, "a lazy sequence (map, select, ...) makes items")
        yield item


def _lazy(value: Any) -> bool:
    import collections.abc

    return isinstance(value, collections.abc.Iterator) and not isinstance(value, (str, bytes, list, tuple, dict))


def _estimate(name: str, text: Any, args: tuple, kwargs: dict) -> int:
    """The size a string filter or method would build, computed before it runs (0: nothing to estimate)."""
    if not isinstance(text, str):
        if name == "join" and isinstance(text, (list, tuple, range)):  # the join filter: value|join(sep)
            sep = args[0] if args else kwargs.get("d", "")
            count = len(text) * 7 if isinstance(text, range) else _sized(text)
            return count + (len(sep) if isinstance(sep, str) else 0) * len(text)
        return 0
    width = next((a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)), 0)
    if name == "indent":
        return (
            len(text)
            + max(width, 0) * (text.count("\n") + 1)
            + sum(len(a) * (text.count("\n") + 1) for a in (*args, *kwargs.values()) if isinstance(a, str))
        )
    if name == "expandtabs":
        return len(text) + max(width, 8 if not args else 0) * text.count("\t")
    if name == "wordwrap":
        wrap = kwargs.get("wrapstring", args[3] if len(args) > 3 else "\n")
        return len(text) * (1 + len(wrap) if isinstance(wrap, str) else 2)
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(len(text), width)
    if name == "join":  # str.join(iterable): the separator is the string
        items = args[0] if args else ()
        if isinstance(items, (list, tuple)):
            return _sized(items) + len(text) * len(items)
    if name in ("format", "format_map") or name == "%":
        fields = text.count("{") + text.count("%")
        return len(text) + fields * max([_sized(a) for a in (*args, *kwargs.values())] or [0])
    return 0


def _guard_arguments(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_JINJA_INT:
            raise JinjaTooBig(f"argument {value} is larger than {MAX_JINJA_INT:,}")


def _guard_format(text: Any) -> None:
    if isinstance(text, str) and _WIDE_FORMAT.search(text):
        raise JinjaTooBig(f"format `{text[:40]}` has a width or precision that is too large or given by an argument")


def _guard_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        count = len(text) + 1 if not old else text.count(old)
        if len(text) + count * len(new) > MAX_JINJA_LENGTH:
            raise JinjaTooBig(f"replace would build a string longer than {MAX_JINJA_LENGTH:,}")


def _call_binop(context: Any, operator: str, left: Any, right: Any) -> Any:
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and not isinstance(times, bool):
                size = _sized(seq)
                if size * times > MAX_JINJA_LENGTH:
                    raise JinjaTooBig(
                        f"`*` would build a value of {size * times:,} characters and items "
                        f"(the limit is {MAX_JINJA_LENGTH:,})"
                    )
        return _guard_result(left * right)
    if operator == "**":
        if (
            isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right > 0
            and left.bit_length() * right > MAX_JINJA_BITS
        ):
            raise JinjaTooBig(f"`**` would build an integer of more than {MAX_JINJA_BITS:,} bits")
        return left**right
    if operator == "%":
        _guard_format(left)
        if _estimate("%", left, right if isinstance(right, tuple) else (right,), {}) > MAX_JINJA_LENGTH:
            raise JinjaTooBig(f"`%` would build a string longer than {MAX_JINJA_LENGTH:,}")
        return _guard_result(left % right)
    if operator == "+":
        if _sized(left) + _sized(right) > MAX_JINJA_LENGTH:
            raise JinjaTooBig(f"`+` would build a value longer than {MAX_JINJA_LENGTH:,}")
        return left + right
    raise AssertionError(operator)  # pragma: no cover - only the operators above are intercepted


def _guarded_filter(name: str, function: Any) -> Any:
    import functools

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        from jinja2.nodes import EvalContext
        from jinja2.runtime import Context

        offset = 1 if args and isinstance(args[0], (Context, EvalContext)) else 0  # pass_context filters
        args = args[:offset] + tuple(_counted(a) if _lazy(a) else a for a in args[offset:])
        kwargs = {k: _counted(v) if _lazy(v) else v for k, v in kwargs.items()}
        plain_args = args[offset:]
        _guard_arguments(plain_args[1:], kwargs)
        if name == "format" and plain_args:
            _guard_format(plain_args[0])
        if name == "replace" and len(plain_args) >= 3:
            _guard_replace(*plain_args[:3])
        if plain_args and _estimate(name, plain_args[0], plain_args[1:], kwargs) > MAX_JINJA_LENGTH:
            raise JinjaTooBig(f"`{name}` would build a string longer than {MAX_JINJA_LENGTH:,}")
        return _guard_result(function(*args, **kwargs))

    return guarded


def _install_guards(env: Any) -> None:
    env.intercepted_binops = frozenset({"*", "**", "%", "+"})
    env.call_binop = _call_binop
    for name, function in list(env.filters.items()):
        if name not in ("raise_error",):
            env.filters[name] = _guarded_filter(name, function)
    unguarded_call = env.call

    def call(context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_counted(a) if _lazy(a) else a for a in args)
        kwargs = {k: _counted(v) if _lazy(v) else v for k, v in kwargs.items()}
        _guard_arguments(args, kwargs)
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if (
            isinstance(owner, str)
            and _estimate(getattr(method, "__name__", ""), owner, args, kwargs) > MAX_JINJA_LENGTH
        ):
            raise JinjaTooBig(f"`{method.__name__}` would build a string longer than {MAX_JINJA_LENGTH:,}")
        if isinstance(owner, str) and getattr(method, "__name__", "") in ("format", "format_map"):
            _guard_format(owner)
        if isinstance(owner, str) and getattr(method, "__name__", "") == "replace" and len(args) >= 2:
            _guard_replace(owner, args[0], args[1])
        return _guard_result(unguarded_call(context, obj, *args, **kwargs))

    env.call = call
    env.finalize = _finalize  # what `{{ ... }}` prints: sized before it becomes text
    env.scmc_concat = _concat
    env.code_generator_class = _guarded_code_generator()


def _finalize(value: Any) -> Any:
    return _guard_result(value)


def _concat(values: tuple) -> str:
    """`a ~ b`: the sizes of the pieces are added up before they are joined."""
    size = sum(_sized(v) for v in values)
    if size > MAX_JINJA_LENGTH:
        raise _too_big(size, "`~` would build a string")
    return "".join(str(v) for v in values)


def _guarded_code_generator() -> type:
    from jinja2.compiler import CodeGenerator

    class GuardedCodeGenerator(CodeGenerator):
        """Jinja's code generator, with `~` (which Jinja compiles to a plain join) sent through
        :func:`_concat`, so it is size-checked like the intercepted operators."""

        def visit_Concat(self, node: Any, frame: Any) -> None:
            if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:  # pragma: no cover - autoescape is off
                return super().visit_Concat(node, frame)
            self.write("environment.scmc_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    return GuardedCodeGenerator


def jinja_environment():
    """structcast's sandboxed environment (StrictUndefined, trim/lstrip blocks) with our filters."""
    global _ENV
    if _ENV is None:
        from structcast.core.template import configure_jinja, get_environment

        configure_jinja(filters=FILTERS)
        _ENV = get_environment()
        _ENV.globals.pop("lipsum", None)  # random text would make builds non-reproducible
        _install_guards(_ENV)
    return _ENV
