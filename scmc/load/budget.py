"""The build's Jinja budget: time and rendered characters shared by every block of a build."""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from typing import Iterator

from scmc.diagnostics import CompileError, Span, fail
from scmc.load.sandbox import _set_value_limits


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
