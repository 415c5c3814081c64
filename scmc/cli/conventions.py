"""What every command shares: how flags of shapes are read, ``-q``/``-v`` (:func:`verbosity`,
:data:`VERBOSITY`), how problems are printed (:func:`use_colour`, :func:`paint`), and how a stage's
failure becomes an exit status (:func:`_compile_or_exit`)."""

from __future__ import annotations

import functools
import inspect as _pyinspect
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

import scmc
from scmc.diagnostics import CompileError


def _shape(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=C,H,W`` (or ``NAME:C,H,W``), optionally ``:DTYPE`` after the sizes (``tokens=16:int64``)."""
    from scmc.ir import INPUT_DTYPES

    name, sep, dims = text.partition("=")
    if not sep:
        name, sep, dims = text.partition(":")
    dims, _, dtype = dims.partition(":")
    dtype = dtype.strip() or "float32"
    try:
        shape = [int(d) for d in dims.replace("[", "").replace("]", "").split(",") if d.strip()]
    except ValueError:
        shape = []
    if not sep or not name.strip().isidentifier() or not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(
            f"`{text}`: write NAME=C,H,W (sizes without the batch dimension), e.g. image=3,224,224, "
            "optionally with a dtype, e.g. tokens=16:int64"
        )
    if dtype not in INPUT_DTYPES:
        raise click.BadParameter(f"`{text}`: dtype `{dtype}` is not supported; use one of {', '.join(INPUT_DTYPES)}")
    return name.strip(), {"shape": shape, "dtype": dtype}


VERBOSITY = 0  # -1 with -q, the count of -v otherwise; set by every command's options
_MARKS = re.compile(r"(?m)^(?:\S+: )?(error|warning)(\[[A-Z]\d{4}\])?:|^internal compiler error:")


def use_colour(stream: Any) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def paint(text: str, colour: bool) -> str:
    """``error[...]`` in red, ``warning[...]`` in yellow, when COLOUR."""
    if not colour:
        return text

    def mark(m: re.Match) -> str:
        return click.style(m.group(0), fg="yellow" if m.group(1) == "warning" else "red", bold=True)

    return _MARKS.sub(mark, text)


def _echo_err(text: str) -> None:
    """A problem, on stderr: diagnostics are printed whatever -q says."""
    colour = use_colour(sys.stderr)
    click.echo(paint(text, colour), err=True, color=colour)


def verbosity(function: Callable[..., Any]) -> Callable[..., Any]:
    """``-v/--verbose`` and ``-q/--quiet``, with one meaning on every command: ``-q`` prints only
    what the command is for (a report, YAML, an install command) and problems, never progress or
    ``wrote ...`` lines; ``-v`` adds detail (files written, files watched, what was collapsed).
    A command whose function takes ``quiet`` gets it; the others read ``VERBOSITY``."""
    takes_quiet = "quiet" in _pyinspect.signature(function).parameters

    @functools.wraps(function)
    def wrapper(*args: Any, verbose: int, quiet: bool, **kwargs: Any) -> Any:
        global VERBOSITY
        if verbose and quiet:
            raise click.UsageError("-v and -q contradict each other; give one of them")
        VERBOSITY = -1 if quiet else verbose
        if takes_quiet:
            kwargs["quiet"] = quiet
        return function(*args, **kwargs)

    wrapper = click.option(
        "-q", "--quiet", is_flag=True, help="Print only the result and problems (no progress, no `wrote` lines)."
    )(wrapper)
    return click.option("-v", "--verbose", count=True, help="Print more detail (files written, watched, ...).")(wrapper)


def _compile_or_exit(stage: Any, template: Path | None = None) -> Any:
    """Run a compiler stage; user errors exit 1, bugs in scmc exit 70 with the IR and traceback."""
    from scmc.build import InternalError

    try:
        return stage()
    except CompileError as exc:
        _echo_err(exc.render())
        sys.exit(1)
    except (RecursionError, MemoryError) as exc:  # last resort: a stage without its own bound met a huge input
        from scmc.diagnostics import fail
        from scmc.load import display_path

        what = "recursed too deeply" if isinstance(exc, RecursionError) else "ran out of memory"
        where = display_path(template) if template is not None else "the templates"
        error = fail(
            "E0008",
            f"compiling {where} {what}",
            hint="the template (or a -p value) is nested too deeply or builds values too large; simplify it",
        )
        _echo_err(error.render())
        sys.exit(1)
    except InternalError as exc:
        _echo_err(
            f"internal compiler error: {exc}\nThis is a bug in scmc {scmc.__version__}; please report it with this output.\n"
            f"--- IR ---\n{exc.ir_dump}--- traceback ---\n{traceback.format_exc()}"
        )
        sys.exit(70)
    except KeyboardInterrupt:
        _echo_err("interrupted; nothing was written")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # any other exception is a bug in scmc, not a user mistake
        _echo_err(
            f"internal compiler error: {type(exc).__name__}: {exc}\nThis is a bug in scmc {scmc.__version__}; "
            f"please report it with this output.\n--- traceback ---\n{traceback.format_exc()}"
        )
        sys.exit(70)
