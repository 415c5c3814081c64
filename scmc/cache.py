"""The build cache: an unchanged build is a copy, not a compilation.

A package is a pure function of its inputs: the command line, the working directory (paths
in generated headers are relative to it), every file the build read, and the installed
software (Python, torch, timm, black, ... and scmc itself). A successful ``scmc build``
stores its files under a key made of everything but the files read; the entry lists those
files with their sha256. A later build with the same key re-hashes them, and if every one is
unchanged (and every path that was probed and absent is still absent) it writes the stored
files instead of compiling: no torch or timm import, which dominate a cold build (see
benchmarks/RESULTS.md). Anything else is a miss and compiles as usual; a cache that cannot be
read or written never fails a build.

The same directory keeps black's output for each text a cached build formats (keyed by the
text and the environment fingerprint): a rebuild after a template edit still formats the
unchanged train.py, predict.py, loss and metric modules for free, and formatting is about
a third of a build's own work.

What is not cached: failed builds, builds with ``--allow-module`` (trusted user code runs at
build time and may depend on anything), ``--no-cache`` or ``SCMC_NO_CACHE=1``.

Where: ``$SCMC_CACHE_DIR``, else ``$XDG_CACHE_HOME/scmc``, else ``~/.cache/scmc``; one JSON
file per key (and one per formatted text), written atomically, the least recently used
removed beyond ``MAX_ENTRIES`` (``MAX_FORMATTED``).

An entry decides what a build writes, so the cache is data that is checked, never trusted
(docs/security.md, "Build cache"):

- Before anything is read or written, the directory (and its ``v<FORMAT>``, ``formatted``
  subdirectories, opened without following links) must belong to the user and be writable by
  no one else. Otherwise the build warns once (E0950, naming the directory and what to do) and
  compiles without the cache: a cache is an optimisation, never a reason to fail a build.
- Entry files are regular files, opened without following symbolic links, of bounded size.
- An entry names its files relative to the package root only (no absolute paths, no ``..``,
  no hidden or odd names), holds at most ``MAX_FILES`` files of at most ``MAX_FILE_BYTES``,
  carries the sha256 of each file and of the whole entry, and a package name scmc itself would
  accept; anything else is a miss.
- The files an entry says the build read are re-hashed only if they are regular files of
  bounded size (a FIFO or /dev/zero is a miss, not a hang).
- A formatted text is stored with the sha256 of the text it formats and of itself; it is used
  only if both match (text appended to it is a miss).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

FORMAT = 2  # bump when the entry layout or the key's meaning changes (2: digests, checked paths)
MAX_ENTRIES = 256
MAX_FORMATTED = 1024
# Bounds on what a lookup reads; an entry over them is a miss, a package over them is not cached
# (raise them here: they only decide what is cached, never whether a build succeeds).
MAX_ENTRY_BYTES = 64 * 2**20  # one entry file (JSON, base64 contents)
MAX_FILES = 64  # files in one package
MAX_FILE_BYTES = 16 * 2**20  # one generated file
MAX_READS = 10_000  # files a build read (templates, CFG includes, probed CFG candidates)
MAX_READ_BYTES = 64 * 2**20  # one of those, re-hashed on a lookup
MAX_FORMATTED_BYTES = 16 * 2**20  # one formatted text

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,99}")  # a package name build/naming.py accepts
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")  # no "", ".", "..", hidden names, separators
_HEX = re.compile(r"[0-9a-f]{64}")

# While a cached build compiles: the files it read (resolved path -> sha256 of the bytes,
# None: probed, absent) and the environment fingerprint, which also keys formatted text.
_reads: dict[str, str | None] | None = None
_session: str | None = None
_memo: dict[tuple[int, str], str] | None = None  # `remembering()`: black's outputs, in memory
_observers: list[set[Path]] = []  # `observing()` blocks (scmc build --watch): every path looked at


class Refused(Exception):
    """The cache directory is not private to the user: it is not used. Args: why, the directory."""


def disabled_by_env() -> bool:
    return os.environ.get("SCMC_NO_CACHE", "").strip().lower() not in ("", "0", "false", "no")


def cache_dir() -> Path:
    explicit = os.environ.get("SCMC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "scmc"


def note_read(path: Path, data: bytes) -> None:
    """Record a file the build read (called where templates are read)."""
    if _reads is not None:
        _reads[str(path.resolve())] = hashlib.sha256(data).hexdigest()
    for seen in _observers:
        seen.add(path.resolve())


def note_absent(path: Path) -> None:
    """Record a path the build looked for and did not find (a CFG search candidate)."""
    if _reads is not None:
        _reads.setdefault(str(path.resolve()), None)
    for seen in _observers:
        seen.add(path.resolve())


@contextlib.contextmanager
def observing() -> Iterator[set[Path]]:
    """Every file a build reads or looks for while the block runs, cached build or not, failed or
    not (`scmc build --watch` watches them)."""
    seen: set[Path] = set()
    _observers.append(seen)
    try:
        yield seen
    finally:
        _observers.remove(seen)


# --------------------------------------------------------------------------- the directory


def _check_dir(fd: int, shown: Path) -> None:
    info = os.fstat(fd)
    if not stat.S_ISDIR(info.st_mode):
        raise Refused(f"{shown} is not a directory", shown)
    if info.st_uid != os.geteuid():
        raise Refused(f"{shown} belongs to another user (uid {info.st_uid})", shown)
    if info.st_mode & 0o022:
        raise Refused(f"{shown} is writable by {'group and others' if info.st_mode & 0o002 else 'its group'}", shown)


def _open_dir(*parts: str, create: bool) -> int:
    """A descriptor of the cache directory (or of PARTS below it), each level checked to belong to
    the user and be writable by no one else; levels below the root are opened without following
    symbolic links. Raises Refused, or OSError (e.g. missing and not CREATE)."""
    root = cache_dir()
    if create and not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, 0o700)  # private: entries decide what a build writes
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    shown = root
    try:
        _check_dir(fd, shown)
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise Refused(f"{shown / part} is a symbolic link", shown / part) from None
                raise
            os.close(fd)
            fd, shown = sub, shown / part
            _check_dir(fd, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def refusal() -> str | None:
    """Why the cache directory must not be used (one line, naming it and what to do), or None
    when it is private to the user or does not exist yet (it is then created private)."""
    try:
        os.close(_open_dir(f"v{FORMAT}", "formatted", create=False))  # each level, down to the deepest there is
    except Refused as exc:
        where = exc.args[1]  # the level that failed
        return (
            f"not using the build cache: {exc.args[0]}; make it yours and private (chmod 700 {where}), "
            "set SCMC_CACHE_DIR to a private directory, or pass --no-cache"
        )
    except OSError:
        pass  # missing (created private on the first store) or unreadable (every lookup is a miss)
    return None


def _read_file(dir_fd: int, name: str, limit: int) -> bytes | None:
    """The bytes of the regular file NAME (not a link) in DIR_FD, owned by the user and at most
    LIMIT bytes; None otherwise."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _write_file(parts: tuple[str, ...], name: str, text: str, keep: int) -> None:
    """Write NAME in the checked directory PARTS whole or not at all, then drop the least recently
    used files beyond KEEP there. Errors and a refused directory only lose the cache."""
    try:
        dir_fd = _open_dir(*parts, create=True)
    except (OSError, Refused):
        return
    tmp = f".new-{secrets.token_hex(8)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        tmp = ""
        _evict(dir_fd, Path(name).suffix, keep)
    except (OSError, ValueError):
        pass
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
        os.close(dir_fd)


def _touch(parts: tuple[str, ...], name: str) -> None:
    """Mark NAME recently used (the last to be evicted)."""
    with contextlib.suppress(OSError, Refused):
        dir_fd = _open_dir(*parts, create=False)
        try:
            os.utime(name, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)


def _evict(dir_fd: int, suffix: str, keep: int) -> None:
    """Remove the least recently used of the files scmc names `<sha256><SUFFIX>`, beyond KEEP
    (nothing else in the directory is touched)."""
    entries = []
    with os.scandir(dir_fd) as it:
        for item in it:
            if item.name.endswith(suffix) and _HEX.fullmatch(item.name[: -len(suffix)] if suffix else item.name):
                with contextlib.suppress(OSError):
                    entries.append((item.stat(follow_symlinks=False).st_mtime, item.name))
    for _, name in sorted(entries)[: max(0, len(entries) - keep)]:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


# --------------------------------------------------------------------------- formatted text


@contextlib.contextmanager
def recording(fingerprint: str | None) -> Iterator[dict[str, str | None]]:
    """While a cached build (environment FINGERPRINT) compiles: record the files it reads, and
    remember and reuse black's output for the texts it formats. Without a fingerprint (the
    cache is off) nothing is recorded or remembered."""
    global _reads, _session
    previous = _reads, _session
    reads: dict[str, str | None] = {}
    _reads, _session = (reads if fingerprint is not None else None), fingerprint
    try:
        yield reads
    finally:
        _reads, _session = previous


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def formatted(source: str, line_length: int, produce: Callable[[str], str]) -> str:
    """``produce(source)`` (black), or its output for the same text from an earlier build in the
    same environment; outside a cached build, always ``produce(source)``. A stored text is used
    only if it names this SOURCE's sha256 and its own sha256 matches. Inside ``remembering()``
    (the rebuilds of `scmc build --watch`, one process) the outputs are also kept in memory."""
    if _memo is None:
        return _formatted(source, line_length, produce)
    key = (line_length, source)
    if key not in _memo:
        if len(_memo) >= MAX_FORMATTED:
            _memo.clear()
        _memo[key] = _formatted(source, line_length, produce)
    return _memo[key]


@contextlib.contextmanager
def remembering() -> Iterator[None]:
    """Keep black's outputs in this process's memory while the block runs (`scmc build --watch`)."""
    global _memo
    previous, _memo = _memo, {}
    try:
        yield
    finally:
        _memo = previous


def _formatted(source: str, line_length: int, produce: Callable[[str], str]) -> str:
    if _session is None:
        return produce(source)
    digest = _sha256(source)
    key = hashlib.sha256(f"{_session}\0{line_length}\0{digest}".encode()).hexdigest()
    parts, name = (f"v{FORMAT}", "formatted"), f"{key}.json"
    text = _cached_format(parts, name, digest, line_length)
    if text is None:
        text = produce(source)
        if len(text) <= MAX_FORMATTED_BYTES // 4:
            record = {"format": FORMAT, "line_length": line_length, "input": digest, "output": _sha256(text)}
            _write_file(parts, name, json.dumps({**record, "text": text}), MAX_FORMATTED)
    else:
        _touch(parts, name)
    return text


def _cached_format(parts: tuple[str, ...], name: str, digest: str, line_length: int) -> str | None:
    try:
        dir_fd = _open_dir(*parts, create=False)
    except (OSError, Refused):
        return None
    try:
        data = _read_file(dir_fd, name, MAX_FORMATTED_BYTES)
    finally:
        os.close(dir_fd)
    try:
        raw = json.loads(data) if data is not None else None
        if not isinstance(raw, dict):
            return None
        text = raw["text"]
        ok = (
            raw["format"] == FORMAT
            and raw["line_length"] == line_length
            and raw["input"] == digest
            and isinstance(text, str)
            and raw["output"] == _sha256(text)
        )
    except (ValueError, KeyError, TypeError, UnicodeError):
        return None
    return text if ok else None


# --------------------------------------------------------------------------- the key


def _hash_tree(h: Any, root: Path, suffixes: tuple[str, ...]) -> None:
    for path in sorted(root.rglob("*")):
        if path.suffix in suffixes and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())


def environment_fingerprint() -> str:
    """Python, every installed distribution's name and version, and the sources of scmc and
    scmc-runtime (editable installs change without a version bump)."""
    import importlib.util

    import scmc

    h = hashlib.sha256()
    h.update(f"{FORMAT}\0{sys.version}\0{sys.platform}\0".encode())
    for entry in sys.path:
        try:
            names = sorted(
                n for n in os.listdir(entry or ".") if n.endswith((".dist-info", ".egg-info", ".egg-link", ".pth"))
            )
        except OSError:
            continue
        h.update(f"{entry}\0{','.join(names)}\0".encode())
    _hash_tree(h, Path(scmc.__file__).parent, (".py", ".j2"))
    spec = importlib.util.find_spec("scmc_runtime")  # finds, does not import
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            _hash_tree(h, Path(location), (".py",))
    return h.hexdigest()


def request_key(request: Any, fingerprint: str) -> str | None:
    """The key of a build request, or None when it must not be cached."""
    if request.allow_modules:
        return None
    described = {
        "cwd": os.getcwd(),
        "parts": [[p.role, str(p.path), p.classname] for p in request.parts],
        "params": list(request.params),
        "name": request.name,
        "shapes": request.shapes,
        "structured": request.structured,
        "sublayer": request.sublayer,
        "allow_new_params": request.allow_new_params,
        "cfg_dirs": [str(Path(d).resolve()) for d in request.cfg_dirs],
        "presets": request.presets,
        "environment": fingerprint,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- package entries


@dataclass
class Entry:
    name: str
    files: dict[str, bytes]
    param_count: int


def package_path_ok(rel: object) -> bool:
    """A file name relative to the package root: `src/<name>/model.py`, `README.md`; never
    absolute, never `..`, `.` or a hidden name, no backslashes or control characters."""
    if not isinstance(rel, str) or not 0 < len(rel) <= 255:
        return False
    parts = rel.split("/")
    return len(parts) <= 8 and all(_COMPONENT.fullmatch(p) and p != ".." for p in parts)


def _entry_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _unchanged(path: str, digest: str | None) -> bool:
    """Whether the file a build read at PATH still has DIGEST (None: still absent). Only regular
    files of at most MAX_READ_BYTES are read; anything else is a change."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return digest is None
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if digest is None or not stat.S_ISREG(info.st_mode) or info.st_size > MAX_READ_BYTES:
            return False
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(MAX_READ_BYTES + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    return len(data) <= MAX_READ_BYTES and hashlib.sha256(data).hexdigest() == digest


def _valid_reads(reads: object) -> bool:
    return (
        isinstance(reads, dict)
        and len(reads) <= MAX_READS
        and all(
            isinstance(p, str)
            and os.path.isabs(p)
            and os.path.normpath(p) == p
            and "\0" not in p
            and (d is None or (isinstance(d, str) and _HEX.fullmatch(d)))
            for p, d in reads.items()
        )
    )


def _decode_files(raw: object) -> dict[str, bytes] | None:
    if not isinstance(raw, dict) or not 0 < len(raw) <= MAX_FILES:
        return None
    files = {}
    for rel, item in raw.items():
        if not package_path_ok(rel) or not isinstance(item, dict) or set(item) != {"sha256", "data"}:
            return None
        encoded = item["data"]
        if not isinstance(encoded, str) or len(encoded) > (MAX_FILE_BYTES // 3 + 1) * 4:
            return None
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return None
        if hashlib.sha256(data).hexdigest() != item["sha256"]:
            return None
        files[rel] = data
    return files


def load(key: str) -> Entry | None:
    """The stored build for KEY if the entry is well-formed and every file it read is unchanged,
    else None (any doubt is a miss: the build compiles)."""
    parts, name = (f"v{FORMAT}",), f"{key}.json"
    try:
        dir_fd = _open_dir(*parts, create=False)
    except (OSError, Refused):
        return None
    try:
        data = _read_file(dir_fd, name, MAX_ENTRY_BYTES)
    finally:
        os.close(dir_fd)
    if data is None:
        return None
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("key") != key:
            return None
        digest = raw.pop("digest", None)
        if digest != _entry_digest(raw):
            return None
        entry_name, count = raw["name"], raw["param_count"]
        if not (isinstance(entry_name, str) and _NAME.fullmatch(entry_name)):
            return None
        if type(count) is not int or count < 0 or not _valid_reads(raw["reads"]):
            return None
        files = _decode_files(raw["files"])
        if files is None or not all(_unchanged(p, d) for p, d in raw["reads"].items()):
            return None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # damaged: compile
    _touch(parts, name)
    return Entry(entry_name, files, count)


def store(key: str, reads: dict[str, str | None], name: str, files: dict[str, bytes], param_count: int) -> None:
    """Keep a successful build; best effort (a read-only or full disk, a refused directory or a
    package over the bounds only loses the cache)."""
    if not _NAME.fullmatch(name) or not 0 < len(files) <= MAX_FILES or not _valid_reads(reads):
        return
    if any(not package_path_ok(rel) or len(data) > MAX_FILE_BYTES for rel, data in files.items()):
        return
    payload: dict[str, Any] = {
        "format": FORMAT,
        "key": key,
        "name": name,
        "param_count": param_count,
        "reads": reads,
        "files": {
            rel: {"sha256": hashlib.sha256(data).hexdigest(), "data": base64.b64encode(data).decode("ascii")}
            for rel, data in sorted(files.items())
        },
    }
    payload["digest"] = _entry_digest(payload)
    text = json.dumps(payload)
    if len(text) <= MAX_ENTRY_BYTES:
        _write_file((f"v{FORMAT}",), f"{key}.json", text, MAX_ENTRIES)
