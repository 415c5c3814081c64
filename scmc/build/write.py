"""The atomic write: all files into a temporary sibling directory, then swapped into place; staging
directories of killed builds are cleaned up by the next build of the same destination."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scmc.build.destination import _through_link, foreign_files, guard_destination, is_leftover
from scmc.build.request import Plan
from scmc.diagnostics import fail
from scmc.load import display_path


def default_output(name: str) -> Path:
    return Path("artifacts") / name


def write_package(plan: Plan, destination: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Write all files into a temporary sibling directory, then swap it into place.

    What may be replaced is decided by `guard_destination` first (with `force`: only a package
    scmc wrote, never the working directory or a folder holding one of `inputs`). The swap is
    one atomic exchange of the two directories where the system has it (Linux renameat2), else
    two renames. SIGINT/SIGTERM are held while files are written and swapped; after SIGKILL,
    what is left is a `.<name>.tmp-<pid>-*` (or, between the two renames, `.<name>.old-<pid>`)
    sibling, which the next build of the same destination removes (or puts back in place) once
    that process is gone.
    """
    destination = _through_link(destination)
    parent = destination.parent
    if parent.is_dir():
        _recover_stale(parent, destination)
    guard_destination(destination, force, inputs)
    blocking = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise fail(
            "E0903",
            f"cannot create {display_path(parent)}: {display_path(blocking)} is a file, not a directory",
            hint="choose another -o directory",
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(
            "E0903", f"cannot create {display_path(parent)}: {exc.strerror}", hint="choose another -o directory"
        ) from None
    if not os.access(parent, os.W_OK):
        raise fail(
            "E0903", f"cannot write to {display_path(parent)}: permission denied", hint="choose another -o directory"
        )
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise fail(
            "E0903", f"cannot write to {display_path(parent)}: {exc.strerror}", hint="choose another -o directory"
        ) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the package is an ordinary folder
    old = parent / f".{destination.name}.old-{os.getpid()}"
    blocked = _block_signals()
    written = False
    try:
        for rel, data in sorted(plan.files.items()):
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if destination.exists():
            if _exchange(staging, destination):
                old = staging  # the old package now sits where the new one was staged
            else:
                os.replace(destination, old)
                os.replace(staging, destination)
        else:
            os.replace(staging, destination)
        written = True
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if not written:
            shutil.rmtree(staging, ignore_errors=True)
            if old.exists() and not destination.exists():
                os.replace(old, destination)
        raise fail("E0904", f"writing {display_path(destination)} failed: {exc.strerror or exc}") from None
    finally:
        _restore_signals(blocked)  # a Ctrl-C that came while writing is dropped: the package is complete


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def _recover_stale(parent: Path, destination: Path) -> None:
    """Remove the staging directories a killed build of `destination` left behind, and put back
    an old package that a build killed between its two renames had moved aside."""
    for entry in sorted(parent.iterdir()):
        match = _STALE.match(entry.name)
        if not match or match["name"] != destination.name or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue  # another build of the same destination is running: leave its files alone
        if not _laid_out_as_package(entry):
            continue  # named like a staging directory, but holds what scmc does not write: not ours
        try:
            if match["kind"] == "old" and not destination.exists():
                os.replace(entry, destination)
            else:
                shutil.rmtree(entry)
        except OSError:
            pass  # not ours to fix (permissions); the build goes on and may report its own error


def _laid_out_as_package(directory: Path) -> bool:
    """Whether everything in `directory` is what a (partly written) scmc package holds."""
    src = directory / "src"
    try:
        names = [d.name for d in src.iterdir() if not is_leftover((d.name,))] if src.is_dir() else []
    except OSError:
        return False
    if len(names) > 1:
        return False
    return not foreign_files(directory, names[0] if names else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


_RENAMEAT2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _RENAMEAT2
    if not sys.platform.startswith("linux"):
        return False
    if _RENAMEAT2 is None:
        import ctypes

        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
            _RENAMEAT2 = function
        except (OSError, AttributeError):
            _RENAMEAT2 = False
    if not _RENAMEAT2:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return _RENAMEAT2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def write_text_atomic(path: Path, text: str) -> None:
    """Write one file through a temporary sibling and a rename."""
    path = path.absolute()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary file would be created (mkstemp makes 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise fail("E0904", f"writing {display_path(path)} failed: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):  # failed or interrupted: no temporary file is left
            os.unlink(tmp)


def _block_signals() -> Any:
    """Hold SIGINT/SIGTERM while the package is written and swapped, so it is never half done.

    Python-level handlers that only take note, rather than a signal mask: a mask set in the main
    thread does not stop a signal delivered to one of torch's worker threads."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    received: list[int] = []
    return {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }


def _restore_signals(previous: Any) -> None:
    if previous is not None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
