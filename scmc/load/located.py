"""Located values: dicts and lists that remember where their keys and items came from in the YAML."""

from __future__ import annotations

from typing import Any, Iterable

from scmc.diagnostics import Span


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
