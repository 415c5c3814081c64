"""`scmc build --watch`: rebuild the package whenever a file the build read changes.

One process builds again and again, so torch, timm and the other layer libraries are imported
once, and black's output for a file that did not change is taken from memory
(``cache.remembering``): after a one-line edit of the model template only what changed is
compiled and formatted again. What to watch is what the build itself looked at
(``cache.observing``: the templates, CFG includes and PACKAGE presets it read, the CFG
candidates it found absent) plus the ``_file_`` layer modules; a failed build is watched through
the files it had read when it failed.

Files are polled (modification time in nanoseconds, size, inode: an editor that saves by
renaming is seen too) every ``POLL_S``; a change is rebuilt once the files have stood still for
one more poll. A failed rebuild prints its diagnostics at once and writes nothing (the last good
package stays on disk, whole); the watch goes on. Ctrl-C stops it with exit status 0. An output
problem on the first build (the directory exists without ``--force``, or holds an input) ends
the watch with status 1: no edit of a template can fix it.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

POLL_S = 0.1  # seconds between two looks at the watched files

Signature = dict[Path, tuple[int, int, int] | None]


def signature(paths: Iterable[Path]) -> Signature:
    """``(mtime_ns, size, inode)`` of each path; None for one that does not exist (now)."""
    out: Signature = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out[path] = None
        else:
            out[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


@dataclasses.dataclass
class Outcome:
    ok: bool
    fatal: bool  # an output problem: rebuilding cannot fix it
    inputs: set[Path]


def build_once(request: Any, echo: Callable[[str], None], echo_err: Callable[[str], None], quiet: bool) -> Outcome:
    """One build, reported: ``built ... (0.6 s)`` or the diagnostics. Never raises a user error."""
    import scmc
    from scmc import cache
    from scmc.build import InternalError, build, compiled_inputs
    from scmc.diagnostics import CompileError, render_warnings
    from scmc.load import display_path

    start = time.perf_counter()
    with cache.observing() as seen:
        try:
            plan, destination = build(request)
        except CompileError as exc:
            fatal = all(d.code.startswith("E09") for d in exc.diagnostics)
            kept = "nothing was written" if fatal else "nothing was written; the last good package is unchanged"
            echo_err(exc.render().replace("nothing was written", kept))
            return Outcome(False, fatal, {p.path.absolute() for p in request.parts} | seen)
        except InternalError as exc:
            echo_err(
                f"internal compiler error: {exc}\nThis is a bug in scmc {scmc.__version__}; please report it "
                f"with this output.\n--- IR ---\n{exc.ir_dump}--- traceback ---\n{traceback.format_exc()}"
            )
            return Outcome(False, False, {p.path.absolute() for p in request.parts} | seen)
    if plan.warnings:
        echo_err(render_warnings(plan.warnings))
    if not quiet:
        echo(
            f"built {plan.name} -> {display_path(destination)}  ({plan.param_count:,} parameters, "
            f"{len(plan.files)} files, {time.perf_counter() - start:.2f} s)"
        )
    inputs = {p.absolute() for p in compiled_inputs(request, plan.compiled)} | seen
    return Outcome(True, False, inputs)


def changed(before: Signature, poll: float) -> list[Path]:
    """Block until a watched file changes and then stands still for one poll; the changed paths."""
    while True:
        time.sleep(poll)
        now = signature(before)
        if now != before:
            while True:  # an editor may write in several steps: wait for the files to settle
                time.sleep(poll)
                settled = signature(before)
                if settled == now:
                    return [p for p in before if now[p] != before[p]]
                now = settled


def watch(
    request: Any,
    *,
    echo: Callable[[str], None],
    echo_err: Callable[[str], None],
    quiet: bool = False,
    verbose: bool = False,
    poll: float = POLL_S,
) -> int:
    """Build REQUEST, then rebuild it on every change of what it read, until Ctrl-C (status 0)."""
    from scmc import cache
    from scmc.load import display_path

    request = dataclasses.replace(request, cache=False)  # a hit reads nothing, so nothing would be watched
    written = False
    try:
        with cache.remembering():
            while True:
                outcome = build_once(request, echo, echo_err, quiet)
                if outcome.fatal and not written:
                    return 1
                if outcome.ok and not written:
                    written = True
                    request = dataclasses.replace(request, force=True)  # from now on, the package is ours
                watched = sorted(outcome.inputs)
                if not quiet:
                    echo(f"watching {len(watched)} files (Ctrl-C stops)")
                if verbose:
                    for path in watched:
                        echo(f"  {display_path(path)}")
                paths = changed(signature(watched), poll)
                if not quiet:
                    names = ", ".join(display_path(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
                    echo(f"{names} changed; rebuilding")
    except KeyboardInterrupt:
        echo("stopped watching")
        return 0


__all__ = ["POLL_S", "build_once", "changed", "signature", "watch"]
