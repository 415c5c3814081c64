"""Source positions, diagnostics and their rendering.

Every user-facing problem is a :class:`Diagnostic` with a code, a message, a source span
and an optional hint. Stages collect them in a :class:`Diagnostics` list and raise
:class:`CompileError` once, at the end of the stage, so a template with three mistakes
reports all three.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


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

    def render(self, source_cache: dict[str, list[str]] | None = None) -> str:
        where = f"{self.span}: " if self.span else ""
        text = f"{where}{self.severity}[{self.code}]: {self.message}"
        if self.span and self.span.note:
            text += f" ({self.span.note})"
        line = _source_line(self.span, source_cache)
        if line is not None:
            number = str(self.span.line)
            pad = " " * len(number)
            text += f"\n {pad} |\n {number} | {line}\n {pad} | {' ' * max(self.span.col - 1, 0)}^"
        if self.hint:
            text += f"\n  = help: {self.hint}"
        return text


def _source_line(span: Span | None, cache: dict[str, list[str]] | None) -> str | None:
    if span is None or span.line <= 0:
        return None
    cache = {} if cache is None else cache
    if span.path not in cache:
        try:
            cache[span.path] = Path(span.path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            cache[span.path] = []
    lines = cache[span.path]
    if span.line > len(lines):
        return None
    return lines[span.line - 1].rstrip()


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
        cache: dict[str, list[str]] = {}
        body = "\n\n".join(d.render(cache) for d in self.diagnostics)
        count = len(self.diagnostics)
        return f"{body}\n\n{count} error{'s' if count != 1 else ''}; nothing was written."


def render_warnings(warnings: Iterable[Diagnostic]) -> str:
    """Warnings of a build that went on, each with its source line, as errors are shown."""
    cache: dict[str, list[str]] = {}
    return "\n\n".join(d.render(cache) for d in warnings)


def fail(code: str, message: str, span: Span | None = None, hint: str = "") -> CompileError:
    """A one-diagnostic error, for stages that cannot go on."""
    return CompileError([Diagnostic(code, message, span, hint)])


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint naming the closest choice, or an empty string."""
    matches = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f"did you mean `{matches[0]}`?" if matches else ""
