"""Load templates: YAML with source positions, parameters, ``-p`` overrides, Jinja.

YAML is read with ruamel.yaml's composer, so every mapping, list and scalar keeps its
line and column; values are rebuilt as :class:`LDict` / :class:`LList` (plain ``dict``
and ``list`` subclasses that remember where their keys and items came from). Only the
standard YAML scalar tags are accepted: a tag that would import or construct an object
is a diagnostic, not a Python object.

Jinja blocks are rendered with structcast's sandboxed environment and its parameter
semantics (``DEFAULT``/``SHARED``/named groups, see :class:`Parameters`). Nodes produced
by a block carry the span of the block itself, so later errors still point into the
YAML file.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import re
import stat
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from scmc.diagnostics import CompileError, Diagnostics, Span, did_you_mean, fail, note_source, printable

JINJA_YAML = "_jinja_yaml_"
JINJA_JSON = "_jinja_json_"
JINJA_TEXT = "_jinja_"
JINJA_GROUP = "_jinja_group_"
JINJA_PIPE = "_jinja_pipe_"
JINJA_ALIASES = (JINJA_YAML, JINJA_JSON, JINJA_TEXT)
JINJA_KEYS = (*JINJA_ALIASES, JINJA_GROUP, JINJA_PIPE)


# --------------------------------------------------------------------------- the build's Jinja budget


class Budget:
    """What Jinja may still spend in this build: seconds (SCMC_MAX_JINJA_SECONDS) and rendered
    characters (SCMC_MAX_JINJA_BUILD_CHARS), for all blocks and templates together; and the
    parameter groups the blocks were rendered with (a `-p` value for a group that no block used
    is an error, see :func:`check_group_overrides`)."""

    def __init__(self) -> None:
        from scmc.limits import int_limit, limit

        self.seconds = limit("SCMC_MAX_JINJA_SECONDS")
        self.chars = int_limit("SCMC_MAX_JINJA_BUILD_CHARS")
        self.block_chars = int_limit("SCMC_MAX_JINJA_BLOCK_CHARS")
        self.passes = int_limit("SCMC_MAX_JINJA_PASSES")
        self.nesting = int_limit("SCMC_MAX_JINJA_NESTING")
        _set_value_limits()
        self.spent = 0.0  # seconds of finished expand() calls
        self.started: float | None = None  # when the running outermost expand() began
        self.rendered = 0
        self.groups_used: set[str] = set()

    def remaining(self) -> float:
        running = time.monotonic() - self.started if self.started is not None else 0.0
        return self.seconds - self.spent - running


_BUDGET: "contextvars.ContextVar[Budget | None]" = contextvars.ContextVar("scmc_jinja_budget", default=None)


@contextmanager
def build_budget() -> Iterator[Budget]:
    """One build: every expand() inside shares the time and output budget."""
    budget = Budget()
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def current_budget() -> Budget:
    """The budget of the build in progress (a fresh one outside a build)."""
    return _budget()


def _budget() -> Budget:
    budget = _BUDGET.get()
    return Budget() if budget is None else budget  # outside a build and expand(): a budget of its own


def _timeout(span: Span) -> CompileError:
    from scmc.limits import exceeded, shown

    return fail(
        "E0311",
        f"Jinja rendering in this build took longer than {shown('SCMC_MAX_JINJA_SECONDS')} s (stopped in this block)",
        span,
        hint=f"a loop runs too long, or the build renders too many blocks; {exceeded('SCMC_MAX_JINJA_SECONDS')}",
    )


# --------------------------------------------------------------------------- located values


class LDict(dict):
    """A mapping that remembers the span of itself, its keys and its values."""

    span: Span
    key_spans: dict[Any, Span]
    value_spans: dict[Any, Span]

    def __init__(self, *args: Any, span: Span | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.span = span or Span("<unknown>")
        self.key_spans = {}
        self.value_spans = {}

    def key_span(self, key: Any) -> Span:
        return self.key_spans.get(key, self.span)

    def value_span(self, key: Any) -> Span:
        return self.value_spans.get(key, self.key_span(key))


class LList(list):
    """A list that remembers the span of itself and of each item."""

    span: Span
    item_spans: list[Span]

    def __init__(self, items: Iterable[Any] = (), span: Span | None = None, item_spans: list[Span] | None = None):
        super().__init__(items)
        self.span = span or Span("<unknown>")
        self.item_spans = list(item_spans) if item_spans is not None else [self.span] * len(self)

    def item_span(self, index: int) -> Span:
        if 0 <= index < len(self.item_spans):
            return self.item_spans[index]
        return self.span


def span_of(value: Any, default: Span) -> Span:
    return getattr(value, "span", default)


def plain(value: Any) -> Any:
    """Strip positions: nested plain dicts and lists (for hashing, dumping, comparing)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def relocate(value: Any, span: Span) -> Any:
    """Give a freshly parsed value (and everything in it) one span."""
    if isinstance(value, dict):
        out = LDict(span=span)
        for k, v in value.items():
            out[k] = relocate(v, span)
            out.key_spans[k] = span
            out.value_spans[k] = span
        return out
    if isinstance(value, list):
        return LList([relocate(v, span) for v in value], span=span)
    return value


# --------------------------------------------------------------------------- YAML reading

_SAFE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:merge",
}


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    return yaml


_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_a_file(display: str, mode: int) -> CompileError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return fail(
        "E0004",
        f"{display} is {kind}, not a template file",
        hint="templates are read from regular files only; save the template to a file and pass that",
    )


def read_text(path: Path, display: str) -> str:
    """The text of a template file. Only a regular file is read (a FIFO or a device could block or
    never end), and only when its size, taken before reading, is within SCMC_MAX_TEMPLATE_BYTES."""
    from scmc.limits import exceeded, int_limit

    maximum = int_limit("SCMC_MAX_TEMPLATE_BYTES")
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_file(display, info.st_mode)
        if info.st_size > maximum:
            raise _too_large(display, info.st_size, exceeded("SCMC_MAX_TEMPLATE_BYTES"))
        # O_NONBLOCK: a FIFO put in the file's place after the stat above cannot block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise _not_a_file(display, opened.st_mode)
            chunks, size = [], 0
            while size <= maximum:  # a file that grows while it is read stops at the limit
                chunk = os.read(fd, min(1 << 20, maximum + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > maximum:
            raise _too_large(display, len(data), exceeded("SCMC_MAX_TEMPLATE_BYTES"))
    except FileNotFoundError:
        raise fail(
            "E0001",
            f"template file not found: {display}",
            hint="check the path; it is relative to the current directory",
        ) from None
    except IsADirectoryError:
        raise fail("E0001", f"{display} is a directory, not a template file") from None
    except PermissionError:
        raise fail(
            "E0002", f"cannot read {display}: permission denied", hint="make the file readable (chmod +r)"
        ) from None
    except OSError as exc:
        raise fail("E0002", f"cannot read {display}: {exc.strerror or exc}") from None
    from scmc import cache

    cache.note_read(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - data.rfind(b"\n", 0, exc.start)
        raise fail(
            "E0003",
            f"the template is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            Span(display, line, col),
            hint="save the template as UTF-8",
        ) from None
    note_source(display, text)  # a template: its lines may be shown in diagnostics
    return text


def _too_large(display: str, size: int, how: str) -> CompileError:
    return fail(
        "E0005",
        f"{display} is {size:,} bytes, too large for a template",
        hint=f"templates describe layers in a few kilobytes; {how}",
    )


def _too_deep(display: str, line_offset: int, note: str, span: Span | None = None) -> CompileError:
    from scmc.limits import exceeded, shown

    return fail(
        "E0106",
        f"the YAML nests more than {shown('SCMC_MAX_YAML_DEPTH')} levels deep",
        span or Span(display, line_offset + 1, 1, note),
        hint=f"templates nest a few levels; check for a runaway bracket ({exceeded('SCMC_MAX_YAML_DEPTH')})",
    )


def parse_yaml(text: str, display: str, line_offset: int = 0, note: str = "") -> Any:
    """Parse YAML text into located values. Raises CompileError on syntax or tag errors."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    yaml = _yaml()
    try:
        node = yaml.compose(text)
    except RecursionError:
        raise _too_deep(display, line_offset, note) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = (mark.line + 1 + line_offset) if mark else line_offset
        col = (mark.column + 1) if mark else 1
        problem = exc.problem or exc.context or "invalid YAML"
        hint = ""
        if exc.context and exc.problem and exc.context_mark is not None:
            start = exc.context_mark
            hint = f"{exc.context} that starts at line {start.line + 1 + line_offset}, column {start.column + 1}"
            if "flow sequence" in exc.context or "flow mapping" in exc.context:
                hint += f"; is a closing {']' if 'sequence' in exc.context else '}'} missing?"
        raise fail("E0100", f"invalid YAML: {problem}", Span(display, line, col, note), hint=hint) from None
    except YAMLError as exc:  # pragma: no cover - ruamel raises marked errors for text input
        raise fail("E0100", f"invalid YAML: {exc}", Span(display, line_offset, 1, note)) from None
    if node is None:
        return None
    diags = Diagnostics()
    constructor = yaml.constructor
    guard = _Expansion()
    try:
        value = _construct(node, constructor, display, line_offset, note, diags, guard)
    except _Expanded as exc:
        raise fail(exc.code, exc.message, exc.span, hint=exc.hint) from None
    except _Nested as exc:
        raise _too_deep(display, line_offset, note, exc.span) from None
    except RecursionError:
        raise _too_deep(display, line_offset, note) from None
    diags.raise_if_any()
    return value


class _Expanded(Exception):
    def __init__(self, message: str, span: Span, hint: str, code: str = "E0105"):
        super().__init__(message)
        self.message, self.span, self.hint, self.code = message, span, hint, code


class _Nested(Exception):
    def __init__(self, span: Span):
        super().__init__("too deep")
        self.span = span


def int_too_long(digits: int) -> str | None:
    """The message for an integer literal of ``digits`` digits beyond SCMC_MAX_INT_DIGITS, else None."""
    from scmc.limits import exceeded, int_limit

    if digits <= int_limit("SCMC_MAX_INT_DIGITS"):
        return None
    return f"an integer of {digits:,} digits is too long ({exceeded('SCMC_MAX_INT_DIGITS')})"


class _Expansion:
    """Counts the values built from a YAML node graph: aliases repeat nodes, so a few lines of
    anchors (the "billion laughs") could otherwise expand to billions of values."""

    def __init__(self) -> None:
        from scmc.limits import int_limit

        self.maximum = int_limit("SCMC_MAX_YAML_VALUES")
        self.max_depth = int_limit("SCMC_MAX_YAML_DEPTH")
        self.left = self.maximum
        self.open: set[int] = set()

    def enter(self, node: Any, span: Span) -> None:
        from scmc.limits import exceeded

        self.left -= 1
        if self.left < 0:
            raise _Expanded(
                f"the YAML expands to more than {self.maximum:,} values",
                span,
                "anchors and aliases (`&a`, `*a`) repeat their value each time they are used; "
                + exceeded("SCMC_MAX_YAML_VALUES"),
            )
        if len(self.open) >= self.max_depth:
            raise _Nested(span)
        if id(node) in self.open:
            raise _Expanded(
                "this alias refers to a collection that contains it",
                span,
                "a template must be a tree: an alias cannot point at one of its own parents",
            )


def _short_tag(tag: str) -> str:
    """A tag as the template spells it: `tag:yaml.org,2002:python/name` -> `!!python/name`."""
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix) :] if tag.startswith(prefix) else tag


_RENDERED_CACHE: dict[str, Any] = {}


def clear_caches() -> None:
    """Forget the in-process memos (parsed rendered blocks, validated parameter groups, compiled
    Jinja templates), so that the next build costs what it costs in a fresh process."""
    _RENDERED_CACHE.clear()
    _GROUPS_CACHE.clear()
    _TEMPLATE_CACHE.clear()


def parse_rendered_yaml(text: str, display: str) -> Any:
    """Parse the output of a Jinja block. Its nodes all get the block's span, so no positions
    are kept: ruamel's safe loader is enough (and several times faster than composing)."""
    from ruamel.yaml.constructor import ConstructorError
    from ruamel.yaml.error import MarkedYAMLError

    if text in _RENDERED_CACHE:
        return _copy(_RENDERED_CACHE[text])
    if "&" in text and "*" in text:  # anchors and aliases: the composer path counts what they expand to
        return parse_yaml(text, display)
    try:
        value = _yaml().load(text)
    except RecursionError:
        return parse_yaml(text, display)  # reports the nesting with a diagnostic
    except ConstructorError as exc:
        if "could not determine a constructor" in str(exc.problem or ""):
            return parse_yaml(text, display)  # reports the refused tag with its position
        raise
    except MarkedYAMLError:
        return parse_yaml(text, display)  # reports the syntax error with its position
    except ValueError:  # an integer beyond Python's int/str conversion limit
        return parse_yaml(text, display)  # reports it with its position
    if not _plain_data(value):  # a timestamp, binary or set tag: refused, with its position
        return parse_yaml(text, display)
    _RENDERED_CACHE[text] = value
    return _copy(value)


def _plain_data(value: Any, depth: int = 0, bounds: tuple[int, int] | None = None) -> bool:
    """Only plain values, nested within SCMC_MAX_YAML_DEPTH, integers within SCMC_MAX_INT_DIGITS
    (anything else is parsed again by the composer path, which reports it with its position)."""
    if bounds is None:
        from scmc.limits import int_limit

        bounds = (int_limit("SCMC_MAX_YAML_DEPTH"), int_limit("SCMC_MAX_INT_DIGITS"))
    if isinstance(value, (dict, list)) and depth >= bounds[0]:
        return False
    if isinstance(value, dict):
        return all(_plain_data(k, depth + 1, bounds) and _plain_data(v, depth + 1, bounds) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_data(v, depth + 1, bounds) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() < 3 * bounds[1] or len(str(abs(value))) <= bounds[1]
    return value is None or isinstance(value, (str, int, float, bool))


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _construct(
    node: Any,
    constructor: Any,
    display: str,
    line_offset: int,
    note: str,
    diags: Diagnostics,
    guard: "_Expansion | None" = None,
) -> Any:
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    mark = node.start_mark
    span = Span(display, mark.line + 1 + line_offset, mark.column + 1, note)
    guard = guard or _Expansion()
    guard.enter(node, span)
    if isinstance(node, (MappingNode, SequenceNode)):
        guard.open.add(id(node))
        try:
            return _construct_collection(node, constructor, display, line_offset, note, diags, guard, span)
        finally:
            guard.open.discard(id(node))
    return _construct_collection(node, constructor, display, line_offset, note, diags, guard, span)


def _construct_collection(
    node: Any,
    constructor: Any,
    display: str,
    line_offset: int,
    note: str,
    diags: Diagnostics,
    guard: "_Expansion",
    span: Span,
) -> Any:
    from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

    if node.tag not in _SAFE_TAGS:
        diags.error(
            "E0101",
            f"YAML tag `{_short_tag(node.tag)}` is not allowed in templates",
            span,
            hint="templates are data: remove the tag (objects are built with `_obj_` patterns)",
        )
        return None
    if isinstance(node, ScalarNode):
        if node.tag == "tag:yaml.org,2002:int":
            message = int_too_long(sum(c.isalnum() for c in node.value))
            if message:
                diags.error("E0107", message, span, hint="templates hold sizes and counts, not numbers this long")
                return None
        try:
            value = constructor.construct_object(node, deep=True)
        except Exception as exc:  # a malformed scalar such as an out-of-range timestamp
            diags.error("E0100", f"invalid YAML scalar: {exc}", span)
            return None
        if isinstance(value, float) and not math.isfinite(value) and node.tag == "tag:yaml.org,2002:float":
            return value
        return value
    if isinstance(node, SequenceNode):
        items, spans = [], []
        for child in node.value:
            items.append(_construct(child, constructor, display, line_offset, note, diags, guard))
            cm = child.start_mark
            spans.append(Span(display, cm.line + 1 + line_offset, cm.column + 1, note))
        return LList(items, span=span, item_spans=spans)
    if isinstance(node, MappingNode):
        out = LDict(span=span)
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merged = _construct(value_node, constructor, display, line_offset, note, diags, guard)
                for part in merged if isinstance(merged, list) else [merged]:
                    if isinstance(part, LDict):
                        for k, v in part.items():
                            if k not in out:
                                out[k] = v
                                out.key_spans[k] = part.key_span(k)
                                out.value_spans[k] = part.value_span(k)
                continue
            key = _construct(key_node, constructor, display, line_offset, note, diags, guard)
            km = key_node.start_mark
            key_span = Span(display, km.line + 1 + line_offset, km.column + 1, note)
            if isinstance(key, (dict, list)):
                diags.error("E0102", "mapping keys must be scalars", key_span)
                continue
            if key in out:
                diags.error(
                    "E0103",
                    f"duplicate key `{key}`",
                    key_span,
                    hint=f"`{key}` is already set at line {out.key_span(key).line}",
                )
                continue
            out[key] = _construct(value_node, constructor, display, line_offset, note, diags, guard)
            vm = value_node.start_mark
            out.key_spans[key] = key_span
            if isinstance(value_node, ScalarNode) and value_node.style in ("|", ">"):
                # a block scalar's text starts on the line after its `|` / `>` indicator
                out.value_spans[key] = Span(display, vm.line + 2 + line_offset, key_span.col, note)
            else:
                out.value_spans[key] = Span(display, vm.line + 1 + line_offset, vm.column + 1, note)
        return out
    diags.error("E0101", f"unsupported YAML node `{node.tag}`", span)  # pragma: no cover
    return None


@dataclass
class Source:
    """One template file as read from disk."""

    path: Path  # resolved absolute path
    display: str  # the path as shown in diagnostics (relative to the working directory when possible)
    text: str
    data: Any

    @property
    def directory(self) -> Path:
        return self.path.parent


def display_path(path: Path) -> str:
    """The path as diagnostics and generated headers show it: relative to the working directory
    when possible, with control characters (a newline in a file name) spelled out."""
    try:
        text = str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return printable(text)


def recorded_path(path: Path | str) -> str:
    """How a generated file names an input: relative to the working directory when it lies inside
    it (normalized: no `..`, `/` separators), else by its file name alone, so that no path of the
    build machine ends up in a package. Control characters are spelled out."""
    import os

    path = Path(path)
    cwd = Path.cwd()
    for spelling, base in ((Path(os.path.abspath(path)), Path(os.path.abspath(cwd))), (path.resolve(), cwd.resolve())):
        try:
            text = spelling.relative_to(base).as_posix()
            break
        except ValueError:
            continue
    else:
        text = path.name
    return printable(text)


def read_template(path: Path) -> Source:
    display = display_path(path)
    text = read_text(path, display)
    data = parse_yaml(text, display)
    if not isinstance(data, LDict):
        raise fail("E0104", "a template must be a YAML mapping at the top level", Span(display, 1, 1))
    return Source(path.resolve(), display, text, data)


# --------------------------------------------------------------------------- parameters


_GROUPS_CACHE: dict[str, dict[str, dict[str, Any]]] = {}


def _validated_groups(shared: dict, default: dict, groups: dict) -> dict[str, dict[str, Any]]:
    """structcast's Parameters validation and group merging, memoized: a template renders
    the same user layer with the same parameters many times."""
    from structcast.core.template import Parameters as StructcastParameters

    key = json.dumps([shared, default, groups], sort_keys=True, default=repr)
    if key not in _GROUPS_CACHE:
        _GROUPS_CACHE[key] = StructcastParameters.model_validate(
            {"_shared_": shared, "_default_": default, **groups}
        ).template_kwargs
    return {k: dict(v) for k, v in _GROUPS_CACHE[key].items()}


@dataclass
class Parameters:
    """Parameter groups with structcast's semantics.

    ``groups`` holds ``default`` and every named group, each already merged with SHARED
    (SHARED wins, as in structcast's ``Parameters.template_kwargs``).
    """

    groups: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})

    @classmethod
    def from_raw(cls, raw: Any, span: Span, diags: Diagnostics) -> "Parameters":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            diags.error("E0200", "PARAMETERS must be a mapping of parameter groups", span)
            return cls()
        groups: dict[str, dict[str, Any]] = {}
        for key, value in raw.items():
            if value is None:
                value = {}
            if not isinstance(value, dict):
                where = raw.value_span(key) if isinstance(raw, LDict) else span
                diags.error("E0201", f"parameter group `{key}` must be a mapping, not {type(value).__name__}", where)
                continue
            groups["default" if key == "DEFAULT" else "_shared_" if key == "SHARED" else key] = plain(value)
        shared = groups.pop("_shared_", {})
        default = groups.pop("default", {})
        both = sorted(set(shared) & set(default))
        if both:
            where = raw.key_span("SHARED") if isinstance(raw, LDict) else span
            shared_block = raw.get("SHARED") if isinstance(raw, LDict) else None
            if isinstance(shared_block, LDict):
                where = shared_block.key_span(both[0])  # the key itself, inside SHARED
            default_block = raw.get("DEFAULT") if isinstance(raw, LDict) else None
            also = (
                f" (DEFAULT sets it at line {default_block.key_span(both[0]).line})"
                if isinstance(default_block, LDict)
                else ""
            )
            diags.error(
                "E0202",
                f"parameter{'s' if len(both) > 1 else ''} {', '.join(f'`{k}`' for k in both)} set in both SHARED and DEFAULT",
                where,
                hint=f"keep each key in one of the two groups{also}; SHARED is merged into every group",
            )
            return cls()
        try:
            merged = _validated_groups(shared, default, groups)
        except Exception as exc:
            diags.error("E0203", f"invalid PARAMETERS: {exc}", span)
            return cls()
        return cls({k: dict(v) for k, v in merged.items()})

    def merge(self, other: "Parameters") -> "Parameters":
        """``other`` over ``self``, group by group (structcast's ``Parameters.merge``)."""
        names = list(self.groups) + [k for k in other.groups if k not in self.groups]
        return Parameters({k: {**self.groups.get(k, {}), **other.groups.get(k, {})} for k in names})

    def group(self, name: str | None) -> dict[str, Any] | None:
        return self.groups.get(name or "default")


# --------------------------------------------------------------------------- -p overrides

_DOTTED_KEY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\s*=(.*)$", re.S)


@dataclass
class Override:
    """One ``-p`` value: ``key=value``, ``group.key=value`` or a YAML mapping of groups."""

    text: str
    group: str | None = None
    key: str | None = None
    value: Any = None
    groups: dict[str, dict[str, Any]] | None = None  # the upstream form
    applied: set[tuple[str, str]] = field(default_factory=set)  # (group, key) of the upstream form that applied

    def describe(self) -> str:
        return f"-p {shorten(self.text)}"


def shorten(text: str, width: int = 80) -> str:
    """``text`` as a message quotes it: a long -p value or rendered line is cut, saying how long it was."""
    return text if len(text) <= width else f"{text[: width - 20]}... ({len(text):,} characters)"


def parse_override(text: str) -> Override:
    match = _DOTTED_KEY.match(text)
    if match:
        first, second, raw_value = match.groups()
        value = _parse_value(raw_value, text)
        if second is None:
            return Override(text, None, first, value)
        return Override(text, first, second, value)
    value = _parse_value(text, text)
    if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
        raise fail(
            "E0210",
            f"cannot read `-p {shorten(text)}`",
            hint="write `-p key=value`, `-p group.key=value` or `-p 'DEFAULT: {key: value}'`",
        )
    groups = {
        ("default" if k == "DEFAULT" else "_shared_" if k == "SHARED" else str(k)): plain(v or {})
        for k, v in value.items()
    }
    return Override(text, groups=groups)


def _parse_value(raw: str, whole: str) -> Any:
    """A -p value, read as YAML by the same reader as templates (tags refused, aliases counted,
    nesting and integer sizes bounded)."""
    if not raw.strip():
        return None
    try:
        return plain(parse_yaml(raw, "<-p>"))
    except CompileError as exc:
        diag = exc.diagnostics[0]
        if diag.code == "E0100":
            message = diag.message.removeprefix("invalid YAML: ")
            raise fail("E0211", f"the value in `-p {shorten(whole)}` is not valid YAML: {message}") from None
        raise fail(
            "E0211", f"the value in `-p {shorten(whole)}` is not usable: {diag.message}", hint=diag.hint
        ) from None


def parameter_blocks(data: LDict) -> list[LDict]:
    """Every PARAMETERS mapping of a template: the root's and those of its user layers."""
    blocks: list[LDict] = []

    def visit(node: Any) -> None:
        if not isinstance(node, LDict):
            return
        params = node.get("PARAMETERS")
        if isinstance(params, LDict):
            blocks.append(params)
        for key, value in node.items():
            if (
                key != "PARAMETERS"
                and isinstance(key, str)
                and key not in LAYER_GRAPH_KEYS
                and isinstance(value, LDict)
            ):
                visit(value)

    visit(data)
    return blocks


LAYER_GRAPH_KEYS = (
    "PARAMETERS",
    "IMPORTS",
    "INPUTS",
    "OUTPUTS",
    "STRUCTURED_OUTPUT",
    "FLOW",
    "INFERENCE_FLOW",
    "INPUT_SHAPES",
)


def defined_keys(blocks: list[LDict]) -> set[str]:
    keys: set[str] = set()
    for block in blocks:
        for group in block.values():
            if isinstance(group, dict):
                keys.update(str(k) for k in group)
    return keys


def apply_override(blocks: list[LDict], override: Override, allow_new: bool) -> bool:
    """Apply one override to a template's PARAMETERS blocks. Returns whether it applied.

    The rule (docs/template-language.md, "Parameters and -p precedence"): a value given on the
    command line is never ignored. A bare key (or SHARED) sets the key wherever the block defines
    it; a group's value (`group.key=value`, `'group: {key: value}'`, `'DEFAULT: {...}'`) wins over
    SHARED for that group, as in structcast-model (the command line's groups are merged over the
    template's, SHARED already applied): the key is moved out of SHARED into every group, with
    SHARED's value, before the given group gets its own."""
    items: list[tuple[str | None, str | None, Any]]
    if override.groups is not None:
        items = [(group, key, value) for group, values in override.groups.items() for key, value in values.items()]
    else:
        items = [(override.group, override.key, override.value)]
    applied = False
    for given, key, value in items:
        group = (
            None if given in (None, "_shared_", "SHARED") else "default" if given in ("default", "DEFAULT") else given
        )
        if _apply_one(blocks, group, str(key), value, allow_new):
            applied = True
            override.applied.add((str(given), str(key)))
    return applied


def _apply_one(blocks: list[LDict], group: str | None, key: str, value: Any, allow_new: bool) -> bool:
    import copy

    applied = False
    for block in blocks:
        if not any(isinstance(g, dict) and key in g for g in block.values()):
            continue
        if group is None:
            for target in block.values():
                if isinstance(target, dict) and key in target:
                    target[key] = copy.deepcopy(value)
                    applied = True
            continue
        yaml_group = "DEFAULT" if group == "default" else group
        target = block.get(yaml_group)
        if not isinstance(target, dict):
            if yaml_group != "DEFAULT":
                continue  # this block has no such group (another may; an unknown group is E0214)
            target = LDict(span=block.span)
            block["DEFAULT"] = target
        _unshare(block, key)
        target[key] = copy.deepcopy(value)
        applied = True
    if not applied and allow_new and blocks:
        first = blocks[0]
        name = "DEFAULT" if group in (None, "default") else group
        target = first.get(name)
        if not isinstance(target, dict):
            target = LDict(span=first.span)
            first[name] = target
        target[key] = copy.deepcopy(value)
        applied = True
    return applied


def _unshare(block: LDict, key: str) -> None:
    """Move ``key`` out of SHARED into DEFAULT and every named group of ``block``, each with SHARED's
    value: what every group sees is unchanged, and one group can now be given a value of its own."""
    import copy

    shared, default = block.get("SHARED"), block.get("DEFAULT")
    if not isinstance(shared, dict) or key not in shared:
        return
    if isinstance(default, dict) and key in default:
        return  # the template sets it in both: E0202 says so
    value = shared.pop(key)
    span = shared.key_span(key) if isinstance(shared, LDict) else block.span
    if not isinstance(block.get("DEFAULT"), dict):
        block["DEFAULT"] = LDict(span=span)
    for name, group in list(block.items()):
        if name == "SHARED":
            continue
        if group is None:
            group = block[name] = LDict(span=span)
        if isinstance(group, dict):
            group[key] = copy.deepcopy(value)
            if isinstance(group, LDict):
                group.key_spans.setdefault(key, span)


def check_group_overrides(overrides: list[Override], used: set[str], sources: list[Source], diags: Diagnostics) -> None:
    """A `-p` value for a named group that no Jinja block of the build rendered with would be lost:
    it is an error naming the groups that were used (issue 13: `-p femto.depths=...` with atto selected)."""
    for override in overrides:
        if override.groups is not None:
            names = [g for g in override.groups if g not in ("default", "_shared_", "DEFAULT", "SHARED")]
        elif override.group not in (None, "default", "DEFAULT", "SHARED"):
            names = [override.group]
        else:
            names = []
        for name in names:
            if name in used:
                continue
            chosen = sorted(used - {"default"})
            span, hint = None, ""
            for source in sources:
                for block in parameter_blocks(source.data):
                    if name in block and span is None:
                        span = block.key_span(name)
                    selector = block.get("DEFAULT")
                    if isinstance(selector, dict) and not hint:
                        for key, value in selector.items():
                            if isinstance(value, str) and value in chosen and name in block:
                                hint = f"select it with `-p {key}={name}`, or leave out `{override.describe()}`"
            if chosen:
                what = f"the blocks of this build render with group{'s' if len(chosen) > 1 else ''} " + ", ".join(
                    f"`{g}`" for g in chosen
                )
            else:
                what = "no block of this build renders with a named group (only DEFAULT)"
            diags.error(
                "E0217",
                f"`{override.describe()}` sets group `{name}`, which this build does not use: {what}",
                span,
                hint=hint
                or f"a value for a group that is not used would be ignored; leave out `{override.describe()}`",
            )


def report_unused_overrides(
    overrides: list[Override], used: list[bool], sources: list[Source], diags: Diagnostics
) -> None:
    known: set[str] = set()
    groups: set[str] = set()
    for source in sources:
        blocks = parameter_blocks(source.data)
        known |= defined_keys(blocks)
        for block in blocks:
            groups.update(str(k) for k in block)
    for override, was_used in zip(overrides, used, strict=True):
        first = sources[0] if sources else None
        span = None
        if first is not None:
            params = first.data.get("PARAMETERS")
            span = first.data.key_span("PARAMETERS") if params is not None else Span(first.display, 1, 1)
        if override.groups is not None:  # each (group, key) must apply: one that did not is never silently dropped
            missed = [
                (g, str(k))
                for g, values in override.groups.items()
                for k in values
                if (g, str(k)) not in override.applied
            ]
            for group in dict.fromkeys(g for g, _ in missed if g not in ("default", "_shared_") and g not in groups):
                diags.error(
                    "E0214",
                    f"`{override.describe()}` names group `{group}`, which no template defines",
                    span,
                    hint=did_you_mean(group, groups) or f"groups: {', '.join(sorted(groups))}",
                )
            names = [k for g, k in missed if g in ("default", "_shared_") or g in groups]
            if not names:
                continue
            names = [k for k in names if k not in known] or names
            what = ", ".join(f"`{n}`" for n in names) or "its keys"
            hint = " ".join(filter(None, (did_you_mean(n, known) for n in names)))
            diags.error(
                "E0213",
                f"`{override.describe()}` sets {what}, which no template of this build defines",
                span,
                hint=(hint + " " if hint else "") + "or pass --allow-new-params to add it to DEFAULT",
            )
            continue
        if was_used:
            continue
        if override.group is not None and override.group not in groups and override.group != "default":
            diags.error(
                "E0214",
                f"`{override.describe()}` names group `{override.group}`, which no template defines",
                span,
                hint=did_you_mean(override.group, groups) or f"groups: {', '.join(sorted(groups))}",
            )
            continue
        hint = did_you_mean(override.key or "", known)
        diags.error(
            "E0213",
            f"`{override.describe()}` sets `{override.key}`, which no template of this build defines",
            span,
            hint=(hint + " " if hint else "") + "(or pass --allow-new-params to add it to DEFAULT)",
        )


# --------------------------------------------------------------------------- Jinja


class TemplateRaised(Exception):
    """The `raise_error` filter was used: the template itself refused these parameters."""


def _cumsum(values: Any) -> list[Any]:
    from itertools import accumulate

    return list(accumulate(values))


def _flags(flags: Any) -> int:
    if flags is None:
        return 0
    if isinstance(flags, str):
        flags = [flags]
    value = 0
    for name in flags:
        value |= re.RegexFlag[str(name).upper()]
    return value


def _regex_escape(value: str) -> str:
    return re.escape(value)


def _regex_replace(value: str, pattern: str, replacement: str = "", flags: Any = None) -> str:
    return re.compile(pattern, _flags(flags)).sub(replacement, value)


def _regex_findall(value: str, pattern: str, flags: Any = None) -> list[str]:
    return re.compile(pattern, _flags(flags)).findall(value)


def _regex_search(value: str, pattern: str, flags: Any = None) -> str | None:
    match = re.compile(pattern, _flags(flags)).search(value)
    return match.group(0) if match else None


def _raise_error(message: Any) -> None:
    raise TemplateRaised(str(message))


def _print_value(value: Any) -> Any:
    print(value, file=sys.stderr)  # stderr: stdout may carry formatted output
    return value


FILTERS = {
    "cumsum": _cumsum,
    "regex_escape": _regex_escape,
    "regex_replace": _regex_replace,
    "regex_findall": _regex_findall,
    "regex_search": _regex_search,
    "raise_error": _raise_error,
    "print_value": _print_value,
}

_ENV = None
_TEMPLATE_CACHE: dict[str, Any] = {}

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
