"""Errors of a training run: a user mistake is one message and an exit code, never a traceback.

:class:`TrainError` and :class:`UsageError` are what the flags, the data or a checkpoint got
wrong; :func:`run_main` runs a generated ``main()`` and turns them into ``prog: error: ...``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, List, NoReturn, Optional

from scmc_runtime.checkpoint import CheckpointError

__all__ = ["TrainError", "UsageError", "run_main", "note_run_dir"]


class TrainError(Exception):
    """A mistake in the flags, the data or a checkpoint: printed as its message, exit status 1."""

    exit_code = 1


class UsageError(TrainError):
    """Flags that cannot work together or hold values out of range: exit status 2, nothing created."""

    exit_code = 2


_RUN_DIR: List[Optional[Path]] = [None]  # where an internal error's traceback goes, once known


def note_run_dir(run_dir: Path) -> None:
    """The run folder, once it exists: an internal error's traceback is written there."""
    _RUN_DIR[0] = run_dir


def run_main(main: Callable[[], int], prog: str) -> NoReturn:
    """Run a generated ``main()`` and exit: user errors as one message, internal ones pointing to a log.

    ``TrainError`` and ``CheckpointError`` are the user's to fix: ``prog: error: message`` on
    stderr, exit 1 (2 for ``UsageError``). Ctrl-C outside the training loop exits 130. Anything
    else is a bug or an environment failure: its traceback is written to
    ``<run folder>/traceback.log`` (a temporary file before the run folder exists) and the
    message says so, exit 1.
    """
    from scmc_runtime.distributed import cleanup

    rank = os.environ.get("RANK", "0")
    who = prog if os.environ.get("WORLD_SIZE", "1") in ("", "1") else f"{prog} (rank {rank})"
    code = 0
    try:
        code = main()
    except (TrainError, CheckpointError) as error:
        print(f"{who}: error: {error}", file=sys.stderr, flush=True)
        code = getattr(error, "exit_code", 1)
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr, flush=True)
        code = 130
    except SystemExit:
        raise
    except BaseException as error:
        text = traceback.format_exc()
        log = _write_traceback(text, prog, rank)
        summary = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        print(
            f"{who}: internal error ({summary[:300]}); this is not a mistake in your flags. "
            f"The traceback is in {log}",
            file=sys.stderr,
            flush=True,
        )
        code = 1
    finally:
        try:
            cleanup()
        except Exception:  # a broken process group must not hide the message above
            pass
    raise SystemExit(code)


def _write_traceback(text: str, prog: str, rank: str) -> str:
    name = "traceback.log" if rank == "0" else f"traceback-rank{rank}.log"
    run_dir = _RUN_DIR[0]
    try:
        if run_dir is not None and run_dir.is_dir():
            path = run_dir / name
            path.write_text(text, encoding="utf-8")
            return str(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{prog.split()[-1].replace('.', '-')}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return tmp
    except OSError:
        sys.stderr.write(text)
        return "the output above"
