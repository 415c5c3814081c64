"""Reading a built package: the manifest (a typed schema), its files, and importing it for the export."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from scmc.diagnostics import CompileError, Diagnostic, Span
from scmc.export.common import _err, _short

# Bounds on what export reads (docs/security.md). Files: the manifest and the labels file are
# read whole, so they are capped; a package holds at most MAX_PACKAGE_FILES entries. Inputs: the
# model is run at batch 7 and at 1.25x the spatial size during verification, so one sample may
# hold at most MAX_INPUT_ELEMENTS values (3x3344x3344 float32 is 128 MiB), unless
# --max-input-elements raises it.
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_LABELS_BYTES = 16 * 2**20
MAX_SOURCE_BYTES = 64 * 2**20  # one .py file of the package
MAX_PACKAGE_FILES = 10_000
MAX_INPUT_ELEMENTS = 2**25
MAX_INPUT_DIMS = 8


@dataclass
class PackageInfo:
    root: Path  # the folder holding src/ (or the package folder itself)
    src: Path  # the folder to put on sys.path
    name: str
    manifest_path: Path
    manifest: dict[str, Any]

    @property
    def input_shapes(self) -> dict[str, dict[str, Any]]:
        return self.manifest["input_shapes"]

    @property
    def output_names(self) -> list[str]:
        return list(self.manifest.get("outputs", {}).get("model", []))

    @property
    def model_class(self) -> str:
        return self.manifest.get("classes", {}).get("model", "Model")

    def template_hashes(self) -> list[dict[str, str]]:
        return [dict(i) for i in self.manifest.get("inputs", []) if isinstance(i, dict)]

    def model_template_sha256(self) -> str:
        for item in self.template_hashes():
            if item.get("role") == "model":
                return str(item.get("sha256", ""))
        return ""


def _require_path(path: Path, code: str, what: str, directory: bool, hint: str) -> Path:
    """PATH as a Path if it exists and is a directory (or a regular file); else the error CODE.

    A FIFO, a socket or a device is refused: reading one blocks or never ends.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise _err(code, f"{what} `{path}` does not exist", path, hint) from None
    except OSError as exc:
        raise _err(code, f"{what} `{path}` cannot be read: {_short(exc)}", path, hint) from None
    if stat.S_ISDIR(mode) != directory:
        raise _err(code, f"{what} `{path}` is not a {'directory' if directory else 'file'}", path, hint)
    if not directory and not stat.S_ISREG(mode):
        raise _err(code, f"{what} `{path}` is not a regular file ({_file_kind(mode)})", path, hint)
    return path


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device")]
    kinds += [(stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def read_bounded(path: Path, limit: int, code: str, what: str, hint: str = "") -> bytes:
    """The bytes of the regular file PATH, at most LIMIT of them; else the error CODE naming PATH.

    The file is opened without blocking and checked after opening (no race between a check and
    the read): a FIFO named as a labels file or a manifest is refused at once, never waited on.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise _err(code, f"{what} `{path}` does not exist", path, hint) from None
    except OSError as exc:
        raise _err(code, f"cannot read {what} `{path}`: {_short(exc)}", path, hint) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _err(code, f"{what} `{path}` is not a regular file ({_file_kind(info.st_mode)})", path, hint)
        if info.st_size > limit:
            raise _err(code, f"{what} `{path}` is {info.st_size:,} bytes, over the limit of {limit:,}", path, hint)
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise _err(code, f"{what} `{path}` is over the limit of {limit:,} bytes", path, hint)
    return data


# The manifest as export reads it: the keys export uses are typed; the rest is the build's business.
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class InputSpec(_Open):
    shape: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1, max_length=MAX_INPUT_DIMS)]
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]


class DatasetPreset(_Open):
    image_size: Annotated[int, Field(gt=0)] | None = None
    mean: Annotated[list[Finite], Field(min_length=1, max_length=64)] | None = None
    std: (
        Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1, max_length=64)] | None
    ) = None
    classes: (
        Annotated[list[Annotated[str, Field(max_length=1000)]], Field(min_length=1, max_length=1_000_000)] | None
    ) = None
    kind: str | None = None


class Presets(_Open):
    dataset: DatasetPreset | None = None


class TemplateHash(_Open):
    path: str
    role: str
    sha256: str


# The newest manifest format this export reads (scmc.passes.stages.MODEL_FORMAT; absent: 1). 2: the
# model's repeated blocks are nn.Sequential stages, so state-dict keys differ from format 1's.
MANIFEST_FORMAT = 2


class Manifest(_Open):
    format: Annotated[int, Field(ge=1, le=MANIFEST_FORMAT)] = 1
    package: Identifier
    scmc_version: str | None = None
    input_shapes: Annotated[dict[Identifier, InputSpec], Field(min_length=1, max_length=64)]
    outputs: dict[str, list[str]] = {}
    classes: dict[str, Identifier] = {}
    inputs: list[TemplateHash] = []
    presets: Presets | None = None


def _key(loc: Sequence[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def _problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(key, message) per pydantic error, with the value shown shortly."""
    out = []
    for error in exc.errors(include_url=False):
        key = prefix + _key(error["loc"]) if error["loc"] else prefix.rstrip(".") or "(top level)"
        value = error.get("input")
        shown = json.dumps(value, default=str)[:60] if error["type"] != "missing" else ""
        message = error["msg"][0].lower() + error["msg"][1:] if error["msg"] else error["type"]
        out.append((key, f"{message}{f', not {shown}' if shown else ''}"))
    return out


def _json_line(text: str, key: str) -> int:
    """The line of the last part of KEY in the JSON TEXT (0 when it is not found): a pointer for the reader."""
    leaf = key.replace("]", "").replace("[", ".").split(".")[-1]
    if not leaf or leaf.isdigit():
        leaf = key.split("[")[0].split(".")[-1]
    needle = f'"{leaf}"'
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    return 0


def read_package(path: Path) -> PackageInfo:
    """The package at ``path`` (the folder ``scmc build -o`` wrote, or its ``src/<name>``)."""
    path = _require_path(
        path,
        "E1100",
        "package directory",
        directory=True,
        hint="pass the folder `scmc build -o` wrote (it holds pyproject.toml and src/<package>/)",
    )
    if (path / "manifest.json").exists():
        manifests = [path / "manifest.json"]
    else:
        manifests = sorted((path / "src").glob("*/manifest.json")) if (path / "src").is_dir() else []
    if not manifests:
        if (path / "pyproject.toml").is_file() or (path / "src").is_dir():
            message = (
                f"`{path}` has no src/<package>/manifest.json: the build did not finish, or it is not an scmc package"
            )
        else:
            message = f"`{path}` is not a package built by scmc (no src/<package>/manifest.json)"
        raise _err("E1100", message, path, f"build it first: scmc build TEMPLATE -o {path}")
    if len(manifests) > 1:
        names = ", ".join(m.parent.name for m in manifests)
        raise _err("E1100", f"`{path}/src` holds more than one package ({names}); pass one of them", path)
    manifest_path = manifests[0]
    rebuild = "rebuild the package with scmc build --force"
    data = read_bounded(manifest_path, MAX_MANIFEST_BYTES, "E1100", "the manifest", rebuild)
    try:
        text = data.decode("utf-8")
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CompileError(
            [
                Diagnostic(
                    "E1100",
                    f"manifest.json is not valid JSON: {exc.msg}",
                    Span(str(manifest_path), exc.lineno, exc.colno),
                    rebuild,
                )
            ]
        ) from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise _err("E1100", f"cannot read the manifest: {_short(exc)}", manifest_path, rebuild) from None
    package_dir = manifest_path.parent
    problems: list[tuple[str, str]] = []
    manifest: dict[str, Any] = {}
    if not isinstance(raw, dict):
        problems.append(("(top level)", "not a JSON object"))
    else:
        try:
            manifest = Manifest.model_validate(raw).model_dump()
        except ValidationError as exc:
            problems += _problems(exc)
    name = manifest.get("package")
    if name and name != package_dir.name:
        problems.append(("package", f"`{name}`, but the folder is `{package_dir.name}`"))
    if not problems:
        problems += [(f"{package_dir.name}/{p}", m) for p, m in _package_file_problems(package_dir)]
    if problems:
        raise CompileError(
            [
                Diagnostic(
                    "E1100",
                    f"`{manifest_path}` does not describe a complete scmc package: `{key}`: {message}",
                    Span(str(manifest_path), _json_line(text, key) if isinstance(raw, dict) else 0),
                    rebuild,
                )
                for key, message in problems
            ]
        )
    root = package_dir.parent.parent if package_dir.parent.name == "src" else package_dir.parent
    return PackageInfo(
        root=root, src=package_dir.parent, name=manifest["package"], manifest_path=manifest_path, manifest=manifest
    )


def _package_file_problems(package_dir: Path) -> list[tuple[str, str]]:
    """Files of the package that importing it could hang on, read outside it, or choke on."""
    problems = []
    for required in ("model.py", "__init__.py"):
        if not (package_dir / required).exists():
            problems.append((required, "missing"))
    base = package_dir.resolve()
    count = 0
    for entry in sorted(package_dir.rglob("*")):
        count += 1
        if count > MAX_PACKAGE_FILES:
            problems.append((".", f"more than {MAX_PACKAGE_FILES:,} files"))
            break
        rel = entry.relative_to(package_dir).as_posix()
        try:
            mode = entry.stat().st_mode
        except OSError as exc:
            problems.append((rel, f"cannot be read: {_short(exc)}"))
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(base):
            problems.append((rel, f"a link to {entry.resolve()}, outside the package"))
        elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            problems.append((rel, f"not a regular file ({_file_kind(mode)})"))
        elif stat.S_ISREG(mode) and entry.suffix == ".py" and entry.stat().st_size > MAX_SOURCE_BYTES:
            problems.append((rel, f"over the limit of {MAX_SOURCE_BYTES:,} bytes for a source file"))
    return problems


@contextlib.contextmanager
def imported_package(info: PackageInfo) -> Iterator[Any]:
    """Import ``info``'s package from its own ``src/`` for the duration of the block.

    A same-named module already imported (an installed copy, an earlier export) is set aside
    and put back afterwards, and ``sys.path`` is restored, so nothing outlives the export.
    The module stays in ``sys.modules`` inside the block: ``torch.jit.script`` reads class
    sources through it.
    """
    name = info.name

    def ours() -> list[str]:
        return [k for k in sys.modules if k == name or k.startswith(name + ".")]

    saved = {k: sys.modules.pop(k) for k in ours()}
    src = str(info.src.resolve())
    sys.path.insert(0, src)
    importlib.invalidate_caches()
    try:
        try:
            module = importlib.import_module(f"{name}.model")
        except Exception as exc:  # the package's own imports failed (e.g. scmc-runtime, timm missing)
            hint = "install the package's dependencies (pip install -e the package folder)"
            if isinstance(exc, ImportError) and getattr(exc, "name", None):
                hint = f"the package imports `{exc.name}`; install it (see {info.root / 'pyproject.toml'})"
            raise _err(
                "E1101",
                f"cannot import package `{name}` from {info.src}: {_short(exc)}",
                info.manifest_path.parent,
                hint,
            ) from None
        origin = Path(getattr(module, "__file__", "") or "").resolve()
        if Path(src) not in origin.parents:
            raise _err("E1101", f"importing `{name}` found {origin}, not the package in {info.src}", info.src)
        yield module
    finally:
        for k in ours():
            del sys.modules[k]
        sys.modules.update(saved)
        with contextlib.suppress(ValueError):
            sys.path.remove(src)
        importlib.invalidate_caches()
