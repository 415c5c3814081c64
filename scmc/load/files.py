"""Reading a template file: only a regular file, within its size limit, as UTF-8; how paths are shown
in diagnostics and recorded in generated files."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scmc.diagnostics import CompileError, Span, fail, note_source, printable
from scmc.load.located import LDict
from scmc.load.parse import parse_yaml

_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_a_file(display: str, mode: int) -> CompileError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return fail(
        "E0004",
        f"{display} is {kind}, not a template file",
        hint="templates are read from regular files only; save the template to a file and pass that",
    )


def read_text(path: Path, display: str) -> str:
    """The text of a template file. Only a regular file is read (a FIFO or a device could block or
    never end), and only when its size, taken before reading, is within SCMC_MAX_TEMPLATE_BYTES."""
    from scmc.limits import exceeded, int_limit

    maximum = int_limit("SCMC_MAX_TEMPLATE_BYTES")
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_file(display, info.st_mode)
        if info.st_size > maximum:
            raise _too_large(display, info.st_size, exceeded("SCMC_MAX_TEMPLATE_BYTES"))
        # O_NONBLOCK: a FIFO put in the file's place after the stat above cannot block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise _not_a_file(display, opened.st_mode)
            chunks, size = [], 0
            while size <= maximum:  # a file that grows while it is read stops at the limit
                chunk = os.read(fd, min(1 << 20, maximum + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > maximum:
            raise _too_large(display, len(data), exceeded("SCMC_MAX_TEMPLATE_BYTES"))
    except FileNotFoundError:
        raise fail(
            "E0001",
            f"template file not found: {display}",
            hint="check the path; it is relative to the current directory",
        ) from None
    except IsADirectoryError:
        raise fail("E0001", f"{display} is a directory, not a template file") from None
    except PermissionError:
        raise fail(
            "E0002", f"cannot read {display}: permission denied", hint="make the file readable (chmod +r)"
        ) from None
    except OSError as exc:
        raise fail("E0002", f"cannot read {display}: {exc.strerror or exc}") from None
    from scmc import cache

    cache.note_read(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - data.rfind(b"\n", 0, exc.start)
        raise fail(
            "E0003",
            f"the template is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            Span(display, line, col),
            hint="save the template as UTF-8",
        ) from None
    note_source(display, text)  # a template: its lines may be shown in diagnostics
    return text


def _too_large(display: str, size: int, how: str) -> CompileError:
    return fail(
        "E0005",
        f"{display} is {size:,} bytes, too large for a template",
        hint=f"templates describe layers in a few kilobytes; {how}",
    )


@dataclass
class Source:
    """One template file as read from disk."""

    path: Path  # resolved absolute path
    display: str  # the path as shown in diagnostics (relative to the working directory when possible)
    text: str
    data: Any

    @property
    def directory(self) -> Path:
        return self.path.parent


def display_path(path: Path) -> str:
    """The path as diagnostics and generated headers show it: relative to the working directory
    when possible, with control characters (a newline in a file name) spelled out."""
    try:
        text = str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return printable(text)


def recorded_path(path: Path | str) -> str:
    """How a generated file names an input: relative to the working directory when it lies inside
    it (normalized: no `..`, `/` separators), else by its file name alone, so that no path of the
    build machine ends up in a package. Control characters are spelled out."""
    path = Path(path)
    cwd = Path.cwd()
    for spelling, base in ((Path(os.path.abspath(path)), Path(os.path.abspath(cwd))), (path.resolve(), cwd.resolve())):
        try:
            text = spelling.relative_to(base).as_posix()
            break
        except ValueError:
            continue
    else:
        text = path.name
    return printable(text)


def read_template(path: Path) -> Source:
    display = display_path(path)
    text = read_text(path, display)
    data = parse_yaml(text, display)
    if not isinstance(data, LDict):
        raise fail("E0104", "a template must be a YAML mapping at the top level", Span(display, 1, 1))
    return Source(path.resolve(), display, text, data)
