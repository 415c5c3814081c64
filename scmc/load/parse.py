"""YAML text -> located values, through ruamel.yaml's composer: only the standard scalar tags, aliases
counted, nesting and integer sizes bounded; and the fast path for the text a Jinja block rendered."""

from __future__ import annotations

from typing import Any

from scmc.diagnostics import CompileError, Diagnostics, Span, fail
from scmc.load.located import LDict, LList

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
