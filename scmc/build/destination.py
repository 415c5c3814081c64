"""What an output may replace: decided by what is on disk (device and inode), before anything is
compiled and again right before the write."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scmc.diagnostics import fail, printable
from scmc.load import display_path

# What packaging tools leave in a package folder (`pip install <dir>`, `python -m build`):
# replaced along with the package by --force, ignored by --check.
LEFTOVER_DIRS = ("build", "dist")


def is_leftover(parts: tuple[str, ...]) -> bool:
    """A path inside a package folder (its parts) that a packaging tool or Python wrote."""
    return bool(parts) and (
        parts[0] in LEFTOVER_DIRS
        or any(p == "__pycache__" or p.endswith(".egg-info") for p in parts)
        or parts[-1].endswith(".pyc")
    )


def _output_errors(function: Any) -> Any:
    """An -o path the system cannot even look at (a name too long, a loop of links) is an E0903
    naming it, not an internal error."""
    import functools

    @functools.wraps(function)
    def checked(path: Path, *args: Any) -> Any:
        try:
            return function(path, *args)
        except (OSError, RuntimeError) as exc:  # RuntimeError: Path.resolve() in a loop of links
            reason = getattr(exc, "strerror", None) or ("a loop of symbolic links" if "loop" in str(exc) else exc)
            raise fail(
                "E0903", f"cannot use -o {printable(str(path))[:200]}: {reason}", hint="choose another -o path"
            ) from None

    return checked


def _same(a: Path, b: Path) -> bool:
    """The same file or directory (by device and inode: symlinks, `..` and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_within(path: Path, directory: Path) -> bool:
    """`path` is `directory` or lies below it, however either is spelled."""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    for spelling in {Path(os.path.abspath(path)), path.resolve()}:
        for candidate in (spelling, *spelling.parents):
            try:
                other = os.stat(candidate)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


@_output_errors
def _through_link(destination: Path) -> Path:
    """-o naming a symbolic link writes where the link points (the link itself stays as it is)."""
    given = destination
    destination = Path(os.path.abspath(destination))
    if destination.is_symlink():
        target = destination.resolve()
        if not target.is_dir():
            raise fail(
                "E0925",
                f"-o {printable(str(given))} is a symbolic link to {printable(os.readlink(destination))}, "
                "which is not a directory",
                hint="point -o at a directory, or remove the link",
            )
        return target
    return destination


def package_in(directory: Path) -> str | None:
    """The name of the package scmc wrote in `directory` (its src/<name>/manifest.json), or None."""
    src = directory / "src"
    if src.is_symlink() or not src.is_dir():
        return None
    try:
        candidates = sorted(src.iterdir())
    except OSError:
        return None
    for candidate in candidates:
        manifest_path = candidate / "manifest.json"
        if candidate.is_symlink() or manifest_path.is_symlink() or not manifest_path.is_file():
            continue
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "scmc_version" in data and data.get("package") == candidate.name:
            return candidate.name
    return None


def foreign_files(directory: Path, name: str) -> list[str]:
    """Paths in a package folder that scmc does not write (packaging leftovers aside); links count."""
    own_dirs = {"src", f"src/{name}"}
    own_files = {"pyproject.toml", "README.md", f"src/{name}/manifest.json"}
    foreign: list[str] = []

    def unreadable(error: OSError) -> None:  # what cannot be listed cannot be shown to be scmc's
        foreign.append(Path(error.filename).relative_to(directory).as_posix() + "/ (unreadable)")

    for root, dirs, files in os.walk(directory, onerror=unreadable):
        base = Path(root)
        for entry in sorted(dirs) + sorted(files):
            path = base / entry
            rel = path.relative_to(directory)
            text = rel.as_posix()
            if is_leftover(rel.parts) and not path.is_symlink():
                continue
            if path.is_symlink():
                foreign.append(text)
            elif entry in dirs:
                if text not in own_dirs:
                    foreign.append(text + "/")
            elif not (text in own_files or (rel.parent.as_posix() == f"src/{name}" and entry.endswith(".py"))):
                foreign.append(text)
        dirs[:] = [d for d in dirs if (base / d).relative_to(directory).as_posix() in own_dirs]
    return foreign


@_output_errors
def guard_destination(destination: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse, before anything is compiled or written, an -o directory that is not scmc's to replace.

    Never replaced: the working directory or a parent of it, a directory that is or holds one
    of the build's inputs, a file. Replaced with --force only: a package scmc wrote (its
    manifest), holding nothing but what scmc writes and what packaging tools leave."""
    shown = display_path(destination)
    if not os.path.lexists(destination):
        return
    cwd = Path.cwd()
    if _is_within(cwd, destination):
        what = "the working directory" if _same(cwd, destination) else "a parent of the working directory"
        raise fail(
            "E0920",
            f"{shown} is {what}; scmc never replaces it, not even with --force",
            hint="give -o a folder of its own, e.g. artifacts/<name>",
        )
    for path in inputs:
        if _is_within(path, destination):
            if not _same(path, destination):
                what = f"holds {display_path(path)}, an input of this build"
            elif display_path(path) == shown:
                what = "is an input of this build"
            else:
                what = f"is the same file as {display_path(path)}, an input of this build"
            raise fail(
                "E0921", f"{shown} {what}; scmc never writes over its inputs", hint="choose another -o directory"
            )
    if not destination.is_dir():
        raise fail("E0902", f"{shown} exists and is not a directory")
    if not force:
        raise fail(
            "E0901",
            f"{shown} already exists",
            hint="pass --force to replace it (the old package is kept until the new one is complete)",
        )
    name = package_in(destination)
    if name is None:
        raise fail(
            "E0922",
            f"{shown} is not a package scmc wrote (it has no src/<name>/manifest.json), so --force does not replace it",
            hint="choose another -o directory, or remove it yourself if it is no longer needed",
        )
    foreign = foreign_files(destination, name)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise fail(
            "E0923",
            f"{shown} holds what scmc did not write ({listed}), so --force does not replace it",
            hint="move those out of the package folder, or choose another -o directory",
        )


@_output_errors
def guard_file(path: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse a single-file output (-o of `scmc torch create`, `scmc format`) that is an input, a
    directory, or (without --force) an existing file."""
    shown = printable(str(path))  # as given: display_path would follow a link to the input
    for given in inputs:
        if _same(path, given):
            other = display_path(given)
            same = other == display_path(path) and not path.is_symlink()
            what = "an input of this command" if same else f"the same file as {other}, an input of this command"
            raise fail(
                "E0924",
                f"-o {shown} is {what}; scmc never writes over its inputs",
                hint="choose another -o file",
            )
    if path.is_dir():
        raise fail("E0902", f"{shown} is a directory; -o names the file to write")
    if os.path.lexists(path) and not force:
        raise fail("E0901", f"{shown} already exists", hint="pass --force to replace it")
