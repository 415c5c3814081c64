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
file per key (and one file per formatted text), written atomically, the least recently used
removed beyond ``MAX_ENTRIES`` (``MAX_FORMATTED``). Entries hold
generated text only (no pickles): a tampered entry can at worst produce a wrong package,
which is why the directory is created private to the user.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

FORMAT = 1  # bump when the entry layout or the key's meaning changes
MAX_ENTRIES = 256
MAX_FORMATTED = 1024

# While a cached build compiles: the files it read (resolved path -> sha256 of the bytes,
# None: probed, absent) and the environment fingerprint, which also keys formatted text.
_reads: dict[str, str | None] | None = None
_session: str | None = None


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


def note_absent(path: Path) -> None:
    """Record a path the build looked for and did not find (a CFG search candidate)."""
    if _reads is not None:
        _reads.setdefault(str(path.resolve()), None)


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


def formatted(source: str, line_length: int, produce: Callable[[str], str]) -> str:
    """``produce(source)`` (black), or its output for the same text from an earlier build in the
    same environment; outside a cached build, always ``produce(source)``."""
    if _session is None:
        return produce(source)
    h = hashlib.sha256(f"{_session}\0{line_length}\0".encode() + source.encode("utf-8", "surrogatepass"))
    path = cache_dir() / f"v{FORMAT}" / "formatted" / f"{h.hexdigest()}.py"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        text = produce(source)
        _write_atomic(path, text, MAX_FORMATTED)
    else:
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used texts are the last to be evicted
    return text


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


@dataclass
class Entry:
    name: str
    files: dict[str, bytes]
    param_count: int


def _entry_path(key: str) -> Path:
    return cache_dir() / f"v{FORMAT}" / f"{key}.json"


def _unchanged(path: str, digest: str | None) -> bool:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return digest is None
    except OSError:
        return False
    return digest is not None and hashlib.sha256(data).hexdigest() == digest


def load(key: str) -> Entry | None:
    """The stored build for KEY if every file it read is unchanged, else None."""
    path = _entry_path(key)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT or raw.get("key") != key:
            return None
        if not all(_unchanged(p, d) for p, d in raw["reads"].items()):
            return None
        files = {rel: base64.b64decode(data) for rel, data in raw["files"].items()}
        entry = Entry(str(raw["name"]), files, int(raw["param_count"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, unreadable or damaged: compile
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used entries are the last to be evicted
    return entry


def store(key: str, reads: dict[str, str | None], name: str, files: dict[str, bytes], param_count: int) -> None:
    """Keep a successful build; best effort (a read-only or full disk only loses the cache)."""
    payload = {
        "format": FORMAT,
        "key": key,
        "name": name,
        "param_count": param_count,
        "reads": reads,
        "files": {rel: base64.b64encode(data).decode("ascii") for rel, data in sorted(files.items())},
    }
    _write_atomic(_entry_path(key), json.dumps(payload), MAX_ENTRIES)


def _write_atomic(path: Path, text: str, keep: int) -> None:
    """Write PATH whole or not at all, then drop the least recently used files beyond KEEP
    in its directory. Errors only lose the cache."""
    tmp = None
    try:
        root = cache_dir()
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(exist_ok=True, mode=0o700)  # private: entries decide what a build writes
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".new-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
        tmp = None
        _evict(path.parent, path.suffix, keep)
    except (OSError, ValueError):
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _evict(directory: Path, suffix: str, keep: int) -> None:
    entries = []
    for p in directory.glob(f"*{suffix}"):
        with contextlib.suppress(OSError):
            entries.append((p.stat().st_mtime, p))
    for _, p in sorted(entries)[: max(0, len(entries) - keep)]:
        with contextlib.suppress(OSError):
            p.unlink()
