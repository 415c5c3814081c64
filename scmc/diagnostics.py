"""Source positions, diagnostics and their rendering.

Every user-facing problem is a :class:`Diagnostic` with a code, a message, a source span
and an optional hint. Stages collect them in a :class:`Diagnostics` list and raise
:class:`CompileError` once, at the end of the stage, so a template with three mistakes
reports all three.

A rendered diagnostic shows the line it points at, but only from a file the build read as a
template (the command line's templates, and the CFG includes that passed the confinement
check in lower/files.py): :func:`note_source` records their text as read, and rendering never
opens a file itself, so a span can never make scmc print a line of some other file (a secret
next to a template, ``/etc/passwd``). What is shown is bounded: a source line is cut to a
window of ``MAX_LINE_CHARS`` characters around the caret and a message or hint to
``MAX_MESSAGE_CHARS``, with ``...`` where text was left out, and control characters (ANSI
escapes, bidirectional overrides) are spelled out, so a hostile template cannot flood or
repaint the terminal.
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

MAX_LINE_CHARS = 200  # characters of a source line shown around the caret
MAX_MESSAGE_CHARS = 1_000  # characters of a message, a hint or a note
MAX_SOURCES = 64  # template texts kept for rendering (the most recently read)

# display path -> text of a file the build read as a template (see note_source)
_sources: OrderedDict[str, str] = OrderedDict()
_lines: dict[str, list[str]] = {}

# C0 and C1 controls (tab and newline included: they would break the caret's alignment or the
# one-line layout), DEL, and the bidirectional formatting characters of "Trojan source".
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Span:
    """A position in a source file: 1-based line and column."""

    path: str
    line: int = 0
    col: int = 0
    note: str = ""  # e.g. "in the output of the Jinja block"

    def __str__(self) -> str:
        if self.line <= 0:
            return self.path
        return f"{self.path}:{self.line}:{max(self.col, 1)}"


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    hint: str = ""
    severity: str = "error"

    def render(self) -> str:
        """``path:line:col: error[CODE]: message``, the source line with a caret (for a file read
        as a template: lines come from the texts recorded by :func:`note_source`), and ``= help:``."""
        where = f"{self.span}: " if self.span else ""
        text = f"{where}{self.severity}[{self.code}]: {shorten(self.message)}"
        if self.span and self.span.note:
            text += f" ({shorten(self.span.note)})"
        line = source_line(self.span)
        if line is not None and self.span is not None:  # a line is found only through a span
            shown, caret = _window(line, max(self.span.col, 1))
            number = str(self.span.line)
            pad = " " * len(number)
            text += f"\n {pad} |\n {number} | {shown}\n {pad} | {' ' * caret}^"
        if self.hint:
            text += f"\n  = help: {shorten(self.hint)}"
        return text


def note_source(display: str, text: str) -> None:
    """Allow diagnostics to show lines of DISPLAY, with TEXT as the build read it. Called for the
    templates the user gave and the CFG includes that passed their path check, never for other
    files; the last ``MAX_SOURCES`` texts are kept."""
    _sources[display] = text
    _sources.move_to_end(display)
    _lines.pop(display, None)
    while len(_sources) > MAX_SOURCES:
        old, _ = _sources.popitem(last=False)
        _lines.pop(old, None)


def forget_source(display: str) -> None:
    """Stop showing lines of DISPLAY (a file read, but not one the user vouched for)."""
    _sources.pop(display, None)
    _lines.pop(display, None)


def source_line(span: Span | None) -> str | None:
    """The line SPAN points at, from a recorded template text; None for any other file."""
    if span is None or span.line <= 0 or span.path not in _sources:
        return None
    lines = _lines.get(span.path)
    if lines is None:
        lines = _lines[span.path] = _sources[span.path].splitlines()
    if span.line > len(lines):
        return None
    return lines[span.line - 1].rstrip()


def spell_out(text: str, keep_newlines: bool = False) -> str:
    """TEXT with control and bidirectional formatting characters written as escapes (``\\x1b``)."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        return repr(char)[1:-1] if char != "\t" else " "

    return _CONTROL.sub(escape, text)


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """TEXT spelled out and cut to LIMIT characters, saying how many were left out."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit:,} more characters)"
    return spell_out(text, keep_newlines=True)


def _window(line: str, col: int) -> tuple[str, int]:
    """At most MAX_LINE_CHARS characters of LINE around column COL (1-based), spelled out,
    and the caret's offset in what is shown."""
    at = min(col - 1, len(line))
    start = 0
    if len(line) > MAX_LINE_CHARS:
        start = max(0, min(at - MAX_LINE_CHARS // 2, len(line) - MAX_LINE_CHARS))
    end = start + MAX_LINE_CHARS
    head = "..." if start > 0 else ""
    tail = "..." if end < len(line) else ""
    before = head + spell_out(line[start:at])
    return before + spell_out(line[at:end]) + tail, len(before)


@dataclass
class Diagnostics:
    """An ordered, de-duplicated collection of diagnostics."""

    items: list[Diagnostic] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)  # reported, but the build goes on

    def error(self, code: str, message: str, span: Span | None = None, hint: str = "") -> None:
        diag = Diagnostic(code, message, span, hint)
        if diag not in self.items:
            self.items.append(diag)

    def warn(self, code: str, message: str, span: Span | None = None, hint: str = "") -> None:
        diag = Diagnostic(code, message, span, hint, severity="warning")
        if diag not in self.warnings:
            self.warnings.append(diag)

    def extend(self, other: Iterable[Diagnostic]) -> None:
        for diag in other:
            if diag not in self.items:
                self.items.append(diag)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self) -> Iterator[Diagnostic]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise CompileError(list(self.items))


class CompileError(Exception):
    """Raised by a stage that found user errors; carries every diagnostic it found."""

    def __init__(self, diagnostics: list[Diagnostic]):
        super().__init__("\n".join(d.message for d in diagnostics))
        self.diagnostics = diagnostics

    def render(self) -> str:
        body = "\n\n".join(d.render() for d in self.diagnostics)
        count = len(self.diagnostics)
        return f"{body}\n\n{count} error{'s' if count != 1 else ''}; nothing was written."


def render_warnings(warnings: Iterable[Diagnostic]) -> str:
    """Warnings of a build that went on, each with its source line, as errors are shown."""
    return "\n\n".join(d.render() for d in warnings)


def fail(code: str, message: str, span: Span | None = None, hint: str = "") -> CompileError:
    """A one-diagnostic error, for stages that cannot go on."""
    return CompileError([Diagnostic(code, message, span, hint)])


def printable(text: str) -> str:
    """Control characters spelled out, so a name or path cannot break a generated comment or a terminal line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint naming the closest choice, or an empty string."""
    matches = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f"did you mean `{matches[0]}`?" if matches else ""
