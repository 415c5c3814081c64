"""``scmc export``: a built package + a checkpoint -> ONNX, TorchScript or ``.pt2``, verified.

This stage never touches the compiler's IR: it works from what ``scmc build`` wrote
(``src/<package>/`` and its ``manifest.json``) and what training wrote (a checkpoint), so a
package built by any scmc version and trained anywhere can be exported.

The steps, in order:

1. Read the manifest (package name, input names and shapes, output names, template hashes,
   presets) and check the runtimes the requested formats need are installed.
2. Read the checkpoint with ``torch.load(weights_only=True)``: a training checkpoint (a dict
   with ``"model"`` and optionally ``"ema"``) or a bare ``state_dict``, checked by the runtime's
   ``check_checkpoint`` as ``--resume`` checks it (format version, the package that wrote it). EMA weights are used
   when present unless ``--raw``; ``--ema`` demands them.
3. Import the package from ``src/`` for the duration of the export only (``sys.modules`` and
   ``sys.path`` are restored afterwards, so an installed same-named package is not disturbed),
   build ``Model()``, load the weights strictly, switch to eval mode: the inference flow is
   what gets exported.
4. Export: ``torch.export.export`` once (batch dimension dynamic unless ``--static-batch``),
   reused by ONNX (``torch.onnx.export(..., dynamo=True)``), ``.pt2`` (``torch.export.save``) and
   ``aoti`` (an AOTInductor package compiled in a subprocess from a saved ``.pt2``, when a C++
   compiler is present; with ``--format aoti`` alone that ``.pt2`` is an internal staging file,
   neither kept nor verified); TorchScript with ``torch.jit.script`` (``torch.jit.trace`` only as
   a reported fallback). Each format's export and verification times are printed and recorded.
5. Verify every artifact as read back from disk against eager PyTorch at batch 1, 2 and 7,
   and at a second spatial size where the artifact accepts one, for every output, with
   per-dtype tolerances (:data:`TOLERANCES`). A mismatch is an error (exit 1) unless
   ``--allow-mismatch``; the report is written either way.
6. Time eager PyTorch against each exported runtime (2 threads, batch 1 and 8, interleaved
   rounds; median, min and max in ms and the median's ratio to eager) and write
   ``export_report.json`` next to the artifacts.

User mistakes (not a built package, a checkpoint of another model, a corrupt file, a missing
runtime) are :class:`~scmc.diagnostics.CompileError` diagnostics with codes ``E11xx``.

Everything read is treated as possibly hostile (docs/security.md, "Artifacts"): the manifest
and the checkpoint's ``config`` are checked against typed schemas (:class:`Manifest`,
:class:`TrainingConfig`), files must be regular files within size limits (a FIFO is refused,
never waited on), input shapes are bounded (:data:`MAX_INPUT_ELEMENTS`), and an exported file
is checked by :mod:`scmc.artifacts` before torch loads it (``--trust-artifact`` skips that).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, StringConstraints, ValidationError

import scmc
from scmc.diagnostics import CompileError, Diagnostic, Span

FORMATS = ("onnx", "torchscript", "pt2", "aoti")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt", "pt2": "model.pt2", "aoti": "model.aoti.pt2"}
REPORT_NAME = "export_report.json"

# torch.onnx's dynamo exporter emits opset 20 natively (no version conversion pass), and
# ONNX Runtime has run every opset-20 operator since 1.17; 18 is the oldest it can target.
DEFAULT_OPSET = 20
MIN_OPSET = 18

THREADS = 2
VERIFY_BATCHES = (1, 2, 7)
LATENCY_BATCHES = (1, 8)
TRACE_BATCH = 2  # batch 1 would let torch.export specialize the batch dimension to 1
SPATIAL_MULTIPLE = 32  # the second spatial size is 1.25x, rounded to this (typical total stride)
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph

# (atol, rtol) per output dtype; an element passes when |actual - expected| <= atol + rtol * |expected|.
# float32: the runtimes add in different orders and fuse differently (oneDNN/MLAS convolutions,
# LayerNorm and GELU kernels), so errors grow like sqrt(reduction length) * eps(1.2e-7) * |value|
# per layer. Over a ConvNeXt-sized network that is 1e-6..1e-5 on logits of order 1-10, so
# 1e-4 absolute and 1e-3 relative leave a 10-100x margin for trained weights and deeper models,
# while a wrong operator (a dropped bias, a transposed kernel, the wrong LayerNorm eps, a
# mis-exported GELU approximation) moves outputs by 1e-3 and more and is caught.
# Half-precision types have 2^-11 (float16) and 2^-8 (bfloat16) epsilons, scaled alike.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-8, 1e-6),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
EXACT_KINDS = ("int", "uint", "bool")  # integer and boolean outputs must match exactly

INSTALL_HINT = "pip install onnx onnxruntime onnxscript (from a checkout: pip install './[export]')"

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


# ------------------------------------------------------------------------------------------
# Requests and results


@dataclass
class ExportRequest:
    package_dir: Path
    checkpoint: Path
    formats: tuple[str, ...] = ("onnx",)
    weights: str = "auto"  # auto: EMA when present; ema: demand EMA; raw: the trained weights
    output: Path | None = None  # default: <checkpoint folder>/export
    opset: int = DEFAULT_OPSET
    static_batch: bool = False
    dynamic_spatial: bool = False
    shapes: dict[str, list[int]] = field(default_factory=dict)  # input name -> shape without batch
    allow_mismatch: bool = False
    aoti: bool = True  # False drops "aoti" from formats (--no-aoti); pt2 never implies aoti
    aoti_timeout: float = 900.0
    labels: Path | None = None  # a text file, one class label per line
    verify_only: bool = False  # re-verify artifacts already in the output folder
    latency_rounds: int = 15
    trust_artifact: bool = False  # load .pt2/TorchScript/AOTInductor files without checking them (scmc.artifacts)
    max_input_elements: int = 0  # per-sample input size limit; 0: MAX_INPUT_ELEMENTS


@dataclass
class ExportOutcome:
    report: dict[str, Any]
    report_path: Path
    errors: list[Diagnostic]  # found after the artifacts were written (numeric mismatches)
    warnings: list[str]

    @property
    def passed(self) -> bool:
        return not self.errors


def _err(code: str, message: str, path: Path | str | None = None, hint: str = "") -> CompileError:
    span = Span(str(path)) if path is not None else None
    return CompileError([Diagnostic(code, message, span, hint)])


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(exc).__name__}: {first}" if not first.startswith(type(exc).__name__) else first


# ------------------------------------------------------------------------------------------
# The built package


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


class Manifest(_Open):
    package: Identifier
    scmc_version: str | None = None
    input_shapes: Annotated[dict[Identifier, InputSpec], Field(min_length=1, max_length=64)]
    outputs: dict[str, list[str]] = {}
    classes: dict[str, Identifier] = {}
    inputs: list[TemplateHash] = []
    presets: Presets | None = None


class TrainingConfig(BaseModel):
    """The keys export reads from a checkpoint's ``config`` (the generated train.py's TrainConfig).

    Lax about containers (a checkpoint may hold tuples), strict about what is in them.
    """

    model_config = ConfigDict(extra="allow")

    image_size: Annotated[StrictInt, Field(gt=0)] | None = None
    mean: (
        Annotated[list[Annotated[StrictFloat, Field(allow_inf_nan=False)]], Field(min_length=1, max_length=64)] | None
    ) = None
    std: (
        Annotated[list[Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1, max_length=64)]
        | None
    ) = None
    data: StrictStr | None = None
    timm_dataset: StrictStr | None = None


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
    return PackageInfo(root=root, src=package_dir.parent, name=name, manifest_path=manifest_path, manifest=manifest)


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


# ------------------------------------------------------------------------------------------
# The checkpoint

PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path: Path) -> Any:
    import pickle

    import torch

    path = _require_path(
        path,
        "E1102",
        "checkpoint",
        directory=False,
        hint="training writes <out>/<run>/last.pt and best.pt; pass one of them",
    )
    if path.stat().st_size == 0:
        raise _err("E1103", f"checkpoint `{path}` is empty (0 bytes): truncated or never finished writing", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc).lower() or "weights only" in str(exc).lower():
            raise _err(
                "E1103",
                f"checkpoint `{path}` holds Python objects other than tensors and plain values, "
                "which torch.load(weights_only=True) refuses to run",
                path,
                "save {'model': model.state_dict()} (scmc never loads pickled code)",
            ) from None
        raise _err("E1103", f"checkpoint `{path}` is corrupt: {_short(exc)}", path) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # zip reader errors, EOFError, ...
        raise _err(
            "E1103",
            f"checkpoint `{path}` cannot be read, it is truncated or corrupt ({path.stat().st_size:,} bytes): "
            f"{_short(exc)}",
            path,
            "re-copy it, or use another checkpoint of the run (last.pt / best.pt)",
        ) from None


def consolidate_sharded(obj: Any, path: Path) -> Any:
    """A sharded checkpoint of ``--strategy fsdp`` (a file naming its DCP shards folder) as a plain one, with
    full tensors (``scmc_runtime.fsdp.load_consolidated``); anything else as it is. E1150 if the shards are unusable."""
    if not isinstance(obj, dict) or obj.get("sharded") is None:
        return obj
    from scmc_runtime.checkpoint import CheckpointError
    from scmc_runtime.fsdp import load_consolidated

    try:
        return load_consolidated(path)
    except CheckpointError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "the shards cannot be read"
        message = message[len(f"{path}: ") :] if message.startswith(f"{path}: ") else message
        raise _err(
            "E1150",
            f"checkpoint `{path}`: {message}",
            path,
            "a sharded checkpoint is the file and the shards folder it names, side by side: copy both",
        ) from None


def check_runtime_checkpoint(obj: Any, path: Path, package: str) -> None:
    """E1106 unless the runtime's ``check_checkpoint`` (what train.py's ``--resume`` runs) accepts OBJ.

    It checks the format version and that the checkpoint names this package, if it names one;
    nothing is required (``require=()``), so a bare state_dict passes. Key and shape mismatches
    are left to :func:`load_weights`, whose message names the tensors.
    """
    if not isinstance(obj, dict) or _is_state_dict(obj):
        return  # a bare state_dict: nothing for check_checkpoint to check; other types are E1104 later
    from scmc_runtime.checkpoint import CheckpointError, check_checkpoint

    try:
        # The model entry is select_weights' to judge (E1104 names what it holds instead).
        check_checkpoint({k: v for k, v in obj.items() if k != "model"}, path, package=package, require=())
    except CheckpointError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "the checkpoint was refused"
        prefix = f"{Path(path)}: "
        if message.startswith(prefix):
            message = message[len(prefix) :]
        raise _err(
            "E1106",
            f"checkpoint `{path}`: {message}",
            path,
            "export with the package the checkpoint was trained with (same template and -p parameters)",
        ) from None


def _is_state_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def strip_prefixes(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop DDP/``torch.compile`` wrapper prefixes (``module.``, ``_orig_mod.``) from every key."""
    out, stripped = {}, []
    for key, value in state.items():
        new = key
        while new.startswith(PREFIXES):
            prefix = next(p for p in PREFIXES if new.startswith(p))
            if prefix not in stripped:
                stripped.append(prefix)
            new = new[len(prefix) :]
        out[new] = value
    return out, stripped


def select_weights(obj: Any, weights: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state_dict to export and a description of where it came from."""
    info: dict[str, Any] = {"path": str(path)}
    if isinstance(obj, dict) and "model" in obj and not _is_state_dict(obj):
        info["kind"] = "training checkpoint"
        for key in ("package", "epoch", "global_step"):
            if isinstance(obj.get(key), (str, int)):
                info[key] = obj[key]
        ema = obj.get("ema")
        has_ema = _is_state_dict(ema)
        info["has_ema"] = has_ema
        if weights == "ema" and not has_ema:
            raise _err(
                "E1105",
                f"--ema: checkpoint `{path}` has no EMA weights"
                + (" (`ema` is None: the run trained with --no-ema)" if "ema" in obj and ema is None else ""),
                path,
                "drop --ema to export the trained weights",
            )
        if has_ema and weights != "raw":
            info["weights"] = "ema"
            state = ema
        else:
            info["weights"] = "raw"
            state = obj["model"]
        if not _is_state_dict(state):
            raise _err(
                "E1104",
                f"checkpoint `{path}`: `{info['weights'] if info['weights'] == 'ema' else 'model'}` "
                "is not a state_dict (a mapping of names to tensors)",
                path,
            )
    elif _is_state_dict(obj):
        info["kind"] = "state_dict"
        info["has_ema"] = False
        if weights == "ema":
            raise _err(
                "E1105",
                f"--ema: `{path}` is a bare state_dict, with no EMA weights",
                path,
                "drop --ema to export these weights",
            )
        info["weights"] = "raw"
        state = obj
    else:
        what = type(obj).__name__
        keys = f" with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict) else ""
        raise _err(
            "E1104",
            f"checkpoint `{path}` holds a {what}{keys}: expected a training checkpoint "
            "(a dict with a `model` state_dict) or a state_dict",
            path,
        )
    state, stripped = strip_prefixes(state)
    if stripped:
        info["stripped_prefixes"] = stripped
    return state, info


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(f"`{i}`" for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_weights(model: Any, state: dict[str, Any], checkpoint: Path, package: str, ckpt_info: dict[str, Any]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape (checkpoint vs model): {_few(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        other = ckpt_info.get("package")
        origin = f" (it was written by package `{other}`)" if isinstance(other, str) and other != package else ""
        message = (
            f"checkpoint `{checkpoint}` does not fit package `{package}`{origin}: "
            f"{len(state)} tensors in the checkpoint, {len(expected)} in the model; " + "; ".join(parts)
        )
        raise _err(
            "E1106",
            message,
            checkpoint,
            "export with the package the checkpoint was trained with (same template and -p parameters)",
        )
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------
# Labels and preprocessing (recorded in the report and the ONNX metadata; used by predict.py)


def read_labels(labels_file: Path) -> list[str]:
    """The non-blank lines of a ``--labels`` file (a regular UTF-8 file of at most MAX_LABELS_BYTES)."""
    hint = "--labels takes a UTF-8 text file, one class label per line"
    data = read_bounded(Path(labels_file), MAX_LABELS_BYTES, "E1110", "the labels file", hint)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise _err(
            "E1110", f"the labels file `{labels_file}` is not UTF-8 text: {_short(exc)}", labels_file, hint
        ) from None
    return [line.strip() for line in lines if line.strip()]


def class_labels(
    info: PackageInfo, ckpt: Any, labels_file: Path | None, num_outputs: int | None
) -> tuple[list[str] | None, str]:
    """Class labels and where they came from, or ``(None, reason)``."""
    labels: list[str] | None = None
    source = ""
    if labels_file is not None:
        labels, source = read_labels(labels_file), str(labels_file)
    elif isinstance(ckpt, dict) and _is_str_list(ckpt.get("classes")):
        labels, source = list(ckpt["classes"]), "checkpoint `classes`"
    else:
        dataset = (info.manifest.get("presets") or {}).get("dataset") or {}
        config = _config(ckpt)
        if _is_str_list(dataset.get("classes")):
            labels, source = list(dataset["classes"]), "manifest presets.dataset.classes"
        elif dataset.get("kind") == "digits" and not config.get("data") and not config.get("timm_dataset"):
            # prepare_digits writes one folder per digit and ImageFolder sorts them: "0".."9".
            labels, source = [str(i) for i in range(10)], "the digits data set (class folders 0-9)"
    if labels is None:
        return None, "unknown (pass --labels FILE, one label per line)"
    if num_outputs is not None and len(labels) != num_outputs:
        return None, f"ignored {source}: {len(labels)} labels for {num_outputs} outputs"
    return labels, source


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


def _config(ckpt: Any) -> dict[str, Any]:
    """The training configuration a checkpoint of the generated train.py carries (``config``), as checked
    by :func:`check_checkpoint_config`."""
    return ckpt["config"] if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else {}


def check_checkpoint_config(ckpt: Any, path: Path) -> None:
    """The checkpoint's ``config`` and ``classes``, where present, have the types export relies on; else E1115."""
    if not isinstance(ckpt, dict) or _is_state_dict(ckpt):
        return
    problems: list[tuple[str, str]] = []
    config = ckpt.get("config")
    if config is not None and not isinstance(config, dict):
        problems.append(("config", f"should be a mapping, not a {type(config).__name__}"))
    elif isinstance(config, dict):
        try:
            TrainingConfig.model_validate(config)
        except ValidationError as exc:
            problems += _problems(exc, "config.")
    classes = ckpt.get("classes")
    if classes is not None and not (_is_str_list(classes) and all(len(c) <= 1000 for c in classes)):
        problems.append(("classes", "should be a list of class names (strings)"))
    if problems:
        raise CompileError(
            [
                Diagnostic(
                    "E1115",
                    f"checkpoint `{path}`: `{key}`: {message}",
                    Span(str(path)),
                    "the generated train.py writes these keys; re-save the checkpoint with the right types, "
                    "or save {'model': state_dict} alone",
                )
                for key, message in problems
            ]
        )


def preprocessing(info: PackageInfo, ckpt: Any, input_shape: list[int]) -> dict[str, Any]:
    """How validation in training fed images to the model (scmc_runtime.data.ImageTransform).

    The size is the exported input's height and width (the training image size when the
    checkpoint records it, see :func:`model_inputs`); mean and std come from the checkpoint's
    training config, else the package's dataset preset, else ImageNet's.
    """
    from_config = _config(ckpt)
    dataset = (info.manifest.get("presets") or {}).get("dataset") or {}
    spatial = [int(d) for d in input_shape[1:]]
    size: Any = (spatial[0] if len(set(spatial)) == 1 else spatial) if spatial else None
    mean = from_config.get("mean") or dataset.get("mean") or [0.485, 0.456, 0.406]
    std = from_config.get("std") or dataset.get("std") or [0.229, 0.224, 0.225]
    source = (
        "checkpoint config"
        if from_config.get("mean")
        else "manifest presets" if dataset.get("mean") else "ImageNet defaults"
    )
    return {
        "image_size": size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "color": "RGB",
        "scale": "1/255",
        "resize": "bilinear, align_corners=False, antialias=True (torch.nn.functional.interpolate)",
        "mean_std_source": source,
    }


# ------------------------------------------------------------------------------------------
# Outputs and comparison


def flatten_outputs(out: Any, names: Sequence[str]) -> dict[str, Any]:
    """Model outputs as ``{name: tensor}``: dict keys (nested with dots), else manifest names by position."""
    import torch

    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str, index: list[int]) -> None:
        if isinstance(value, torch.Tensor):
            if prefix:
                key = prefix
            else:
                position = index[0]
                key = names[position] if position < len(names) else f"output_{position}"
            index[0] += 1
            flat[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k), index)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{prefix}.{i}" if prefix else "", index)
        else:
            raise TypeError(f"model output of type {type(value).__name__} cannot be exported")

    walk(out, "", [0])
    return flat


@dataclass
class OutputDiff:
    name: str
    dtype: str
    shape: list[int]
    max_abs: float
    max_rel: float
    worst: float  # max over elements of |a - e| / (atol + rtol |e|): <= 1 passes
    mismatched: int  # elements outside the tolerance
    atol: float
    rtol: float
    problem: str = ""  # a structural problem: missing output, other shape, NaN placement, ...

    @property
    def passed(self) -> bool:
        return not self.problem and self.mismatched == 0

    def as_dict(self) -> dict[str, Any]:
        out = {
            "dtype": self.dtype,
            "shape": self.shape,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "worst_over_tolerance": self.worst,
            "mismatched_elements": self.mismatched,
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
        }
        if self.problem:
            out["problem"] = self.problem
        return out


def tolerance_for(dtype: str) -> tuple[float, float]:
    if dtype.startswith(EXACT_KINDS):
        return 0.0, 0.0
    return TOLERANCES.get(dtype, TOLERANCES["float32"])


def _dtype_name(array: Any) -> str:
    import numpy as np

    if isinstance(array, np.ndarray):
        return str(array.dtype)
    return str(array.dtype).replace("torch.", "")


def _to_numpy(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def compare_outputs(expected: dict[str, Any], actual: dict[str, Any]) -> list[OutputDiff]:
    """Compare every expected output with the actual one; tolerances by the expected dtype.

    ``max_rel`` is over elements whose expected magnitude exceeds ``atol`` (below that the
    absolute tolerance decides). NaN must appear in the same places in both; +-inf must match
    exactly.
    """
    import numpy as np

    diffs = []
    for name, exp_value in expected.items():
        dtype = _dtype_name(exp_value)
        atol, rtol = tolerance_for(dtype)
        exp = _to_numpy(exp_value)
        shape = list(exp.shape)
        act = _to_numpy(actual[name]) if name in actual else None
        if act is None:
            structural = f"output `{name}` is missing (got {', '.join(actual) or 'nothing'})"
        elif list(act.shape) != shape:
            structural = f"shape {list(act.shape)} instead of {shape}"
        else:
            structural = ""
        if structural:  # nothing to compare: every element counts as mismatched
            diffs.append(OutputDiff(name, dtype, shape, math.inf, math.inf, math.inf, exp.size, atol, rtol, structural))
            continue
        e = exp.astype(np.float64)
        a = act.astype(np.float64)
        e_nan, a_nan = np.isnan(e), np.isnan(a)
        problem = ""
        if (e_nan != a_nan).any():
            problem = f"NaN in {int((e_nan != a_nan).sum())} places where the other side has a number"
        both = ~(e_nan | a_nan)
        e, a = e[both], a[both]
        with np.errstate(invalid="ignore", over="ignore"):
            inf = np.isinf(e) | np.isinf(a)
            if (inf & (e != a)).any():
                problem = problem or f"infinite values differ in {int((inf & (e != a)).sum())} places"
            e, a = e[~inf], a[~inf]
            diff = np.abs(a - e)
            bound = atol + rtol * np.abs(e)
            max_abs = float(diff.max()) if diff.size else 0.0
            big = np.abs(e) > max(atol, 1e-30)
            max_rel = float((diff[big] / np.abs(e[big])).max()) if big.any() else 0.0
            if bound.size and (bound == 0).any():  # exact dtypes
                over = diff > 0
                worst = math.inf if over.any() else 0.0
            else:
                worst = float((diff / bound).max()) if diff.size else 0.0
                over = diff > bound
        diffs.append(OutputDiff(name, dtype, shape, max_abs, max_rel, worst, int(over.sum()), atol, rtol, problem))
    for name in actual:
        if name not in expected:
            diffs.append(OutputDiff(name, "?", [], 0.0, 0.0, 0.0, 0, 0.0, 0.0, f"unexpected extra output `{name}`"))
    return diffs


# ------------------------------------------------------------------------------------------
# Runners: an exported artifact, read back from disk, as a callable of numpy/torch inputs


@dataclass
class Runner:
    fmt: str  # onnx | torchscript | pt2 | aoti
    label: str  # what the latency table calls it
    call: Callable[[list[Any]], dict[str, Any]]  # torch tensors in (input order) -> {name: array}
    dynamic_batch: bool
    dynamic_spatial: bool
    static_batch_size: int | None
    prepare: Callable[[list[Any]], Any] | None = None  # inputs -> what call_prepared takes (timing)
    call_prepared: Callable[[Any], Any] | None = None


def onnx_runner(path: Path, input_names: list[str]) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures are reported by the verification, not ORT's log
    # Idle ORT threads would otherwise spin for a while after each run, taking the cores from
    # the eager PyTorch call timed next: off, so the latency comparison is fair to both.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if sorted(names) != sorted(input_names):
        raise _err("E1112", f"`{path}` takes inputs {names}, the package takes {input_names}", path)
    outputs = [o.name for o in session.get_outputs()]
    first = session.get_inputs()[0].shape
    dynamic_batch = not isinstance(first[0], int)
    dynamic_spatial = any(not isinstance(d, int) for d in first[2:])

    def prepare(tensors: list[Any]) -> dict[str, Any]:
        return {n: _to_numpy(t) for n, t in zip(input_names, tensors)}

    def call_prepared(feed: dict[str, Any]) -> list[Any]:
        return session.run(outputs, feed)

    def call(tensors: list[Any]) -> dict[str, Any]:
        return dict(zip(outputs, call_prepared(prepare(tensors))))

    return Runner(
        "onnx",
        "onnxruntime",
        call,
        dynamic_batch,
        dynamic_spatial,
        None if dynamic_batch else int(first[0]),
        prepare,
        call_prepared,
    )


def torch_runner(
    fmt: str, module: Any, names: list[str], dynamic_batch: bool, dynamic_spatial: bool, static_batch_size: int | None
) -> Runner:
    import torch

    def call_prepared(tensors: list[Any]) -> Any:
        with torch.inference_mode():
            return module(*tensors)

    def call(tensors: list[Any]) -> dict[str, Any]:
        return flatten_outputs(call_prepared(tensors), names)

    label = {"torchscript": "torch.jit", "pt2": "torch.export", "aoti": "AOTInductor"}[fmt]
    return Runner(fmt, label, call, dynamic_batch, dynamic_spatial, static_batch_size, list, call_prepared)


def _exported_dynamic_dims(ep: Any) -> tuple[bool, bool, int | None]:
    """(batch dynamic, spatial dynamic, static batch size) of an ExportedProgram's first user input."""
    import torch

    sig = ep.graph_signature
    user_inputs = set(sig.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            shape = node.meta["val"].shape
            dyn = [not isinstance(d, int) for d in shape]
            return dyn[0], any(dyn[2:]), None if dyn[0] else int(shape[0])
    return False, False, None


def check_before_loading(fmt: str, path: Path) -> None:
    """E1113 unless loading the artifact at PATH reads data only (see :mod:`scmc.artifacts`)."""
    from scmc.artifacts import ArtifactRefused, check_artifact

    try:
        check_artifact(fmt, path)
    except ArtifactRefused as exc:
        where = f" (member `{exc.member}`)" if exc.member else ""
        raise _err(
            "E1113",
            f"refusing to load `{path}`{where}: {exc.reason}",
            path,
            "scmc loads exported files only when they hold nothing but data; export again to rewrite it, "
            "or pass --trust-artifact if you made this file yourself and mean to run what it holds",
        ) from None


def load_runner(fmt: str, path: Path, input_names: list[str], output_names: list[str], check: bool = True) -> Runner:
    """Read an artifact back from disk (what a user would load) as a Runner.

    With ``check`` (the default) the file is first checked by :func:`check_before_loading`:
    ``--verify-only`` may be pointed at files someone else wrote.
    """
    import torch

    _require_path(path, "E1112", f"the exported {fmt} file", directory=False, hint="export again to rewrite it")
    if check:
        check_before_loading(fmt, path)
    try:
        if fmt == "onnx":
            return onnx_runner(path, input_names)
        if fmt == "torchscript":
            with _quiet():
                module = torch.jit.load(str(path), map_location="cpu")
            module.eval()
            return torch_runner(fmt, module, output_names, True, True, None)
        if fmt == "pt2":
            ep = torch.export.load(str(path))
            batch, spatial, size = _exported_dynamic_dims(ep)
            return torch_runner(fmt, ep.module(), output_names, batch, spatial, size)
        if fmt == "aoti":
            import torch._inductor

            with _quiet():  # "No CUDA runtime is found" on CPU-only machines
                compiled = torch._inductor.aoti_load_package(str(path))
            meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
            return torch_runner(
                fmt,
                compiled,
                output_names,
                meta.get("dynamic_batch", True),
                meta.get("dynamic_spatial", False),
                meta.get("static_batch_size"),
            )
    except CompileError:
        raise
    except Exception as exc:
        raise _err(
            "E1112",
            f"cannot load the exported {fmt} file `{path}`: {_short(exc)}",
            path,
            "export again (without --verify-only) to rewrite it",
        ) from None
    raise ValueError(fmt)


# ------------------------------------------------------------------------------------------
# Export


@dataclass
class Inputs:
    names: list[str]
    shapes: dict[str, list[int]]  # without batch
    dtypes: dict[str, Any]

    def make(self, batch: int, seed: int, spatial: dict[str, list[int]] | None = None) -> list[Any]:
        import torch

        generator = torch.Generator().manual_seed(seed)
        tensors = []
        for name in self.names:
            shape = (spatial or {}).get(name, self.shapes[name])
            dtype = self.dtypes[name]
            if dtype.is_floating_point:
                t = torch.randn([batch, *shape], generator=generator).to(dtype)
            else:
                t = torch.randint(0, 10, [batch, *shape], generator=generator).to(dtype)
            tensors.append(t)
        return tensors

    def second_spatial(self) -> dict[str, list[int]]:
        """1.25x every dimension after the first (channels), rounded to a multiple of 32."""
        out = {}
        for name, shape in self.shapes.items():
            new = list(shape[:1])
            for d in shape[1:]:
                target = max(SPATIAL_MULTIPLE, int(round(d * 1.25 / SPATIAL_MULTIPLE)) * SPATIAL_MULTIPLE)
                new.append(target if target != d else d + SPATIAL_MULTIPLE)
            out[name] = new
        return out


def model_inputs(
    model: Any,
    info: PackageInfo,
    overrides: dict[str, list[int]],
    trained_size: Any = None,
    limit: int = MAX_INPUT_ELEMENTS,
    checkpoint: Path | None = None,
) -> tuple[Inputs, str]:
    """The inputs to trace and verify at, and a note on where their shapes came from.

    Shapes: ``-s`` first; else, for an image input (C, H, W), the image size the checkpoint was
    trained at (its ``config.image_size``), since that is the resolution the weights expect;
    else the manifest's ``input_shapes``.
    """
    import torch

    declared = info.input_shapes
    unknown = [k for k in overrides if k not in declared]
    if unknown:
        raise _err(
            "E1110",
            f"-s {unknown[0]}=...: the model has no input `{unknown[0]}` (inputs: {', '.join(declared)})",
            info.manifest_path,
        )
    note = ""
    params = [p for p in inspect.signature(model.forward).parameters if p in declared]
    names = params if sorted(params) == sorted(declared) else list(declared)
    shapes, dtypes = {}, {}
    for name in names:
        shape = list(overrides.get(name, declared[name]["shape"]))
        if len(shape) != len(declared[name]["shape"]):
            raise _err(
                "E1110",
                f"-s {name}={','.join(map(str, shape))}: the model takes {len(declared[name]['shape'])} "
                f"dimensions without the batch ({','.join(map(str, declared[name]['shape']))})",
                info.manifest_path,
            )
        if (
            name not in overrides
            and isinstance(trained_size, int)
            and trained_size > 0
            and len(shape) == 3
            and name == names[0]
            and shape[1:] != [trained_size, trained_size]
        ):
            note = (
                f"`{name}` traced at {shape[0]}x{trained_size}x{trained_size}, the training image size "
                f"(checkpoint config), not the manifest's {'x'.join(map(str, shape))}; -s {name}=C,H,W overrides"
            )
            shape = [shape[0], trained_size, trained_size]
        if name in overrides:
            source, where = f"-s {name}=...", None
        elif shape != list(declared[name]["shape"]):
            source, where = "`config.image_size` of the checkpoint", checkpoint
        else:
            source, where = f"`input_shapes.{name}.shape`", info.manifest_path
        _check_input_size(name, shape, limit, source, where)
        shapes[name] = shape
        dtype = getattr(torch, str(declared[name].get("dtype", "float32")), None)
        dtypes[name] = dtype if isinstance(dtype, torch.dtype) else torch.float32
    return Inputs(names, shapes, dtypes), note


def _check_input_size(name: str, shape: list[Any], limit: int, source: str, where: Path | None) -> None:
    """E1114 unless SHAPE is a few positive ints whose product (one sample) is at most LIMIT."""
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape) or not shape:
        raise _err("E1110", f"{source}: the shape of `{name}` must be positive integers, not {shape!r}", where)
    if len(shape) > MAX_INPUT_DIMS:
        raise _err("E1114", f"{source}: `{name}` has {len(shape)} dimensions, more than {MAX_INPUT_DIMS}", where)
    elements = math.prod(shape)
    if elements > limit:
        raise _err(
            "E1114",
            f"{source}: input `{name}` of shape {'x'.join(map(str, shape))} is {elements:,} values per sample, "
            f"over the limit of {limit:,} (verification runs it at batch 7 and at 1.25x the spatial size)",
            where,
            "pass a smaller -s NAME=C,H,W, or raise the limit with --max-input-elements N",
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.export/torch.onnx progress prints and warnings (they are not the user's problem)."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch._dynamo", "torch.utils.cpp_extension")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torch_export(model: Any, inputs: Inputs, static_batch: bool, dynamic_spatial: bool) -> tuple[Any, dict[str, Any]]:
    import torch

    batch = 1 if static_batch else TRACE_BATCH
    # With dynamic H/W, trace at the larger second size: at the smallest sizes a late feature map
    # is 1x1, and torch.export specializes sizes of 1, which would fix the shapes it derives.
    spatial = inputs.second_spatial() if dynamic_spatial else None
    example = inputs.make(batch, seed=0, spatial=spatial)
    dynamic_shapes = None
    if not static_batch or dynamic_spatial:
        batch_dim = torch.export.Dim("batch", min=1)
        dynamic_shapes = {}
        for name in inputs.names:
            spec: dict[int, Any] = {}
            if not static_batch:
                spec[0] = batch_dim
            if dynamic_spatial:
                for axis in range(2, len(inputs.shapes[name]) + 1):
                    spec[axis] = torch.export.Dim.AUTO
            dynamic_shapes[name] = spec
    start = time.perf_counter()
    try:
        with _quiet():
            ep = torch.export.export(model, tuple(example), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise _err(
            "E1108",
            f"torch.export could not trace the model: {_short(exc, 800)}",
            None,
            "a layer's forward does something torch.export cannot capture (data-dependent control flow, "
            "Python side effects); --static-batch helps when the batch size is what it specializes on",
        ) from None
    dyn_batch, dyn_spatial, size = _exported_dynamic_dims(ep)
    meta = {
        "seconds": time.perf_counter() - start,
        "dynamic_batch": dyn_batch,
        "dynamic_spatial": dyn_spatial,
        "static_batch_size": size,
        "trace_shapes": {n: list(t.shape) for n, t in zip(inputs.names, example)},
    }
    return ep, meta


def export_onnx(
    ep: Any, inputs: Inputs, output_names: list[str], opset: int, dest: Path, metadata: dict[str, str]
) -> dict[str, Any]:
    import onnx
    import torch

    start = time.perf_counter()
    try:
        with _quiet():
            program = torch.onnx.export(
                ep,
                (),
                dynamo=True,
                opset_version=opset,
                input_names=inputs.names,
                output_names=output_names,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise _err(
            "E1108",
            f"ONNX export (torch.onnx.export, dynamo=True, opset {opset}) failed: {_short(exc, 800)}",
            None,
            "an operator may have no ONNX translation at this opset; try a newer --opset, or export torchscript/pt2",
        ) from None
    params_bytes = sum(t.numel() * t.element_size() for t in ep.state_dict.values()) + sum(
        t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor)
    )
    external = params_bytes > EXTERNAL_DATA_BYTES
    try:
        with _quiet():
            program.save(str(dest), external_data=external)
    except Exception as exc:
        raise _err("E1111", f"cannot write `{dest}`: {_short(exc)}", dest) from None
    seconds = time.perf_counter() - start
    # Name the batch axis and attach metadata on the protobuf (weights stay where they are).
    model = onnx.load(str(dest), load_external_data=False)
    renamed = _rename_batch_axis(model)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dest))
    try:
        onnx.checker.check_model(str(dest), full_check=True)
    except Exception as exc:
        raise _err(
            "E1108", f"the exported ONNX model fails onnx.checker (full_check): {_short(exc, 800)}", dest
        ) from None
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    files = [dest] + ([dest.parent / loc for loc in _external_locations(model)] if external else [])
    return {
        "seconds": seconds,
        "opset": opsets.get("ai.onnx", opset),
        "opset_imports": opsets,
        "external_data": external,
        "files": [f.name for f in files],
        "batch_axis": renamed,
        "path_taken": "torch.onnx.export(dynamo=True) from torch.export",
        "checker": "onnx.checker full_check passed",
    }


def _external_locations(model: Any) -> list[str]:
    locations = []
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in locations:
                locations.append(entry.value)
    return locations


def _rename_batch_axis(model: Any) -> str | None:
    """Call the symbolic first dimension of the inputs ``batch`` everywhere it appears."""
    first = model.graph.input[0].type.tensor_type.shape.dim
    if not first or not first[0].dim_param:
        return None
    old = first[0].dim_param
    if old == "batch":
        return old
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = "batch"
    return "batch"


def export_torchscript(model: Any, inputs: Inputs, dest: Path) -> dict[str, Any]:
    import torch

    start = time.perf_counter()
    notes = []
    try:
        with _quiet():
            module = torch.jit.script(model)
        path = "torch.jit.script"
    except Exception as exc:
        notes.append(
            f"torch.jit.script failed ({_short(exc, 300)}); fell back to torch.jit.trace: "
            "control flow and shapes seen at batch 2 are baked into the graph"
        )
        try:
            with _quiet():
                module = torch.jit.trace(model, tuple(inputs.make(TRACE_BATCH, 0)), strict=False, check_trace=False)
        except Exception as exc2:
            raise _err(
                "E1108",
                f"TorchScript export failed: torch.jit.script: {_short(exc, 300)}; "
                f"torch.jit.trace: {_short(exc2, 300)}",
            ) from None
        path = "torch.jit.trace (fallback)"
    try:
        with _quiet():
            torch.jit.save(module, str(dest))
    except Exception as exc:
        raise _err("E1111", f"cannot write `{dest}`: {_short(exc)}", dest) from None
    return {"seconds": time.perf_counter() - start, "path_taken": path, "notes": notes, "files": [dest.name]}


def export_pt2(ep: Any, dest: Path) -> dict[str, Any]:
    import torch

    start = time.perf_counter()
    try:
        torch.export.save(ep, str(dest))
    except Exception as exc:
        raise _err("E1111", f"cannot write `{dest}`: {_short(exc)}", dest) from None
    return {
        "seconds": time.perf_counter() - start,
        "path_taken": "torch.export.export + torch.export.save",
        "files": [dest.name],
    }


_AOTI_SCRIPT = """
import sys, torch
ep = torch.export.load(sys.argv[1])
torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[2])
"""


def aoti_unavailable() -> str:
    """Why an AOTInductor package cannot be compiled here, or an empty string."""
    import torch

    try:
        import torch._inductor as inductor
    except Exception as exc:  # a torch build without inductor
        return f"torch._inductor cannot be imported: {_short(exc)}"
    if not hasattr(inductor, "aoti_compile_and_package") or not hasattr(inductor, "aoti_load_package"):
        return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package"
    compiler = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None or (os.environ.get("CXX") and not shutil.which(compiler)):
        return "no C++ compiler found (AOTInductor compiles a shared library; install g++ or set CXX)"
    return ""


def export_aoti(pt2: Path, dest: Path, timeout: float, meta: dict[str, Any]) -> dict[str, Any]:
    """Compile the saved ExportedProgram into an AOTInductor package in a subprocess (it can be slow).

    Returns ``{"skipped": reason}`` instead of raising: a missing compiler or a compile that does
    not finish in time never fails the export.
    """
    reason = aoti_unavailable()
    if reason:
        return {"skipped": reason}
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _AOTI_SCRIPT, str(pt2), str(dest)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {
            "skipped": f"AOTInductor compilation did not finish within {timeout:g} s (--aoti-timeout); "
            "the other formats were still written and verified"
        }
    if proc.returncode != 0 or not dest.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"AOTInductor compilation failed (exit {proc.returncode}): {tail[0][:300]}"}
    dest.with_suffix(".json").write_text(
        json.dumps({k: meta[k] for k in ("dynamic_batch", "dynamic_spatial", "static_batch_size")})
    )
    return {
        "seconds": time.perf_counter() - start,
        "path_taken": "torch._inductor.aoti_compile_and_package",
        "files": [dest.name, dest.with_suffix(".json").name],
    }


# ------------------------------------------------------------------------------------------
# Verification and latency


REFERENCE_CASE = {"batch": 2, "spatial": None, "seed": 101}


def _case_key(case: dict[str, Any]) -> str:
    return json.dumps(case, sort_keys=True)


def verification_cases(runner: Runner, inputs: Inputs) -> list[dict[str, Any]]:
    cases = []
    if runner.dynamic_batch:
        for n, batch in enumerate(VERIFY_BATCHES):
            cases.append({"batch": batch, "spatial": None, "seed": 100 + n})
    else:
        size = runner.static_batch_size or 1
        cases += [{"batch": size, "spatial": None, "seed": 100}, {"batch": size, "spatial": None, "seed": 101}]
    if runner.dynamic_spatial:
        cases.append(
            {
                "batch": cases[-1]["batch"] if not runner.dynamic_batch else 2,
                "spatial": inputs.second_spatial(),
                "seed": 200,
            }
        )
    return cases


def verify(
    runner: Runner, model: Any, inputs: Inputs, output_names: list[str], cache: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``runner`` and eager PyTorch on the same seeded inputs; compare every output.

    ``cache`` keeps eager outputs per case, so several artifacts are checked against one eager run.
    """
    import torch

    cache = {} if cache is None else cache
    results = []
    passed = True
    for case in verification_cases(runner, inputs):
        tensors = inputs.make(case["batch"], case["seed"], case["spatial"])
        key = _case_key(case)
        if key not in cache:
            with torch.no_grad():
                cache[key] = flatten_outputs(model(*tensors), output_names)
        expected = cache[key]
        shape = {n: [case["batch"], *(case["spatial"] or inputs.shapes)[n]] for n in inputs.names}
        try:
            actual = runner.call(tensors)
        except Exception as exc:
            results.append({"input_shapes": shape, "error": _short(exc, 500), "passed": False})
            passed = False
            continue
        diffs = compare_outputs(expected, actual)
        ok = all(d.passed for d in diffs)
        passed = passed and ok
        results.append({"input_shapes": shape, "outputs": {d.name: d.as_dict() for d in diffs}, "passed": ok})
    return {"passed": passed, "cases": results}


def worst_by_output(verification: dict[str, Any]) -> dict[str, dict[str, float]]:
    worst: dict[str, dict[str, float]] = {}
    for case in verification["cases"]:
        for name, d in case.get("outputs", {}).items():
            w = worst.setdefault(
                name,
                {"max_abs": 0.0, "max_rel": 0.0, "worst_over_tolerance": 0.0, "atol": d["atol"], "rtol": d["rtol"]},
            )
            for key in ("max_abs", "max_rel", "worst_over_tolerance"):
                w[key] = max(w[key], d[key])
    return worst


def measure_latency(model: Any, runners: list[Runner], inputs: Inputs, rounds: int) -> dict[str, Any]:
    """Milliseconds per call of eager PyTorch and each runner, interleaved, rotating the order per round.

    Per batch: ``median_ms``, ``min_ms`` and ``max_ms`` (each a dict by runtime, ``eager`` included),
    ``ratio_to_eager`` (median over eager's median) and ``rounds``.
    """
    import torch

    table: dict[str, Any] = {}
    for batch in LATENCY_BATCHES:
        tensors = inputs.make(batch, seed=300)
        subjects: dict[str, Callable[[], Any]] = {}

        def eager(t: list[Any] = tensors) -> Any:
            with torch.inference_mode():
                return model(*t)

        subjects["eager"] = eager
        for r in runners:
            if not r.dynamic_batch and (r.static_batch_size or 1) != batch:
                continue
            prepared = r.prepare(tensors) if r.prepare else tensors
            subjects[r.fmt] = lambda rr=r, p=prepared: rr.call_prepared(p)
        for fn in subjects.values():  # warm-up: first calls allocate, plan, profile and pick kernels
            for _ in range(3):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in subjects}
        names = list(subjects)
        for i in range(rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                start = time.perf_counter()
                subjects[name]()
                samples[name].append(time.perf_counter() - start)
        medians = {k: statistics.median(v) for k, v in samples.items()}
        table[str(batch)] = {
            "median_ms": {k: v * 1000 for k, v in medians.items()},
            "min_ms": {k: min(v) * 1000 for k, v in samples.items()},
            "max_ms": {k: max(v) * 1000 for k, v in samples.items()},
            "ratio_to_eager": {k: medians[k] / medians["eager"] for k in medians if k != "eager"},
            "rounds": rounds,
        }
    return table


# ------------------------------------------------------------------------------------------
# The whole export


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_runtimes(formats: Sequence[str]) -> None:
    needed = []
    if "onnx" in formats:
        needed += [("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")]
    missing = []
    for module, dist in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise _err(
            "E1107",
            f"--format onnx needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
            None,
            f"{INSTALL_HINT}  (or pip install {' '.join(missing)})",
        )


def _metadata(
    info: PackageInfo,
    inputs: Inputs,
    dyn: dict[str, Any],
    output_shapes: dict[str, list[Any]],
    labels: list[str] | None,
    preprocess: dict[str, Any],
    ckpt_info: dict[str, Any],
    ckpt_sha: str,
) -> dict[str, str]:
    def in_shape(name: str) -> list[Any]:
        shape: list[Any] = ["batch" if dyn["dynamic_batch"] else dyn["static_batch_size"], *inputs.shapes[name]]
        if dyn["dynamic_spatial"]:
            shape[2:] = ["dynamic"] * len(shape[2:])
        return shape

    meta = {
        "scmc.package": info.name,
        "scmc.version": str(info.manifest.get("scmc_version", "")),
        "scmc.exporter_version": scmc.__version__,
        "scmc.template_sha256": info.model_template_sha256(),
        "scmc.templates": json.dumps(info.template_hashes(), sort_keys=True),
        "scmc.inputs": json.dumps(
            {n: {"shape": in_shape(n), "dtype": str(inputs.dtypes[n]).replace("torch.", "")} for n in inputs.names}
        ),
        "scmc.outputs": json.dumps(output_shapes),
        "scmc.preprocess": json.dumps({k: v for k, v in preprocess.items() if k != "mean_std_source"}),
        "scmc.weights": ckpt_info.get("weights", ""),
        "scmc.checkpoint_sha256": ckpt_sha,
    }
    if labels is not None:
        meta["scmc.class_labels"] = json.dumps(labels)
    return meta


def export_package(request: ExportRequest, progress: Callable[[str], None] = lambda _: None) -> ExportOutcome:
    """Do the export; raise :class:`CompileError` on user errors. Mismatches come back in the outcome."""
    started = time.perf_counter()
    import torch

    formats = tuple(dict.fromkeys(request.formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise _err("E1110", f"unknown --format `{bad[0] if bad else ''}`: choose from {', '.join(FORMATS)}")
    if not request.aoti and "aoti" in formats:  # --no-aoti: drop it (kept for scripts of the pt2-implies-aoti days)
        formats = tuple(f for f in formats if f != "aoti")
        if not formats:
            raise _err("E1110", "--no-aoti with only --format aoti leaves nothing to export")
    if request.weights not in ("auto", "ema", "raw"):
        raise _err("E1110", f"weights must be auto, ema or raw, not `{request.weights}`")
    if "onnx" in formats:
        import_ok = True
        try:
            import onnx

            max_opset = onnx.defs.onnx_opset_version()
        except ImportError:
            import_ok = False
        if import_ok and not MIN_OPSET <= request.opset <= max_opset:
            raise _err("E1110", f"--opset {request.opset}: the exporter supports opsets {MIN_OPSET} to {max_opset}")
    info = read_package(request.package_dir)
    if request.labels is not None:
        read_labels(request.labels)  # a bad labels file fails now, not after the model is built and run
    check_runtimes(formats)
    checkpoint = Path(request.checkpoint)
    raw = read_checkpoint(checkpoint)
    raw = consolidate_sharded(raw, checkpoint)  # --strategy fsdp: the weights are in a DCP shards folder
    check_runtime_checkpoint(raw, checkpoint, info.name)
    check_checkpoint_config(raw, checkpoint)
    state, ckpt_info = select_weights(raw, request.weights, checkpoint)
    ckpt_sha = _sha256(checkpoint)
    ckpt_info["sha256"] = ckpt_sha
    out_dir = Path(request.output) if request.output is not None else checkpoint.resolve().parent / "export"
    warnings_: list[str] = []

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with imported_package(info) as module:
            model_cls = getattr(module, info.model_class, None)
            if model_cls is None:
                raise _err(
                    "E1101",
                    f"`{info.name}.model` has no class `{info.model_class}` (manifest classes.model)",
                    info.manifest_path,
                )
            try:
                model = model_cls()  # its random initial weights are all replaced: load_weights is strict
            except Exception as exc:
                raise _err(
                    "E1101",
                    f"`{info.name}.model.{info.model_class}()` failed: {_short(exc)}",
                    info.manifest_path.parent / "model.py",
                ) from None
            load_weights(model, state, checkpoint, info.name, ckpt_info)
            model.eval()
            model.requires_grad_(False)
            inputs, shape_note = model_inputs(
                model,
                info,
                request.shapes,
                _config(raw).get("image_size"),
                request.max_input_elements or MAX_INPUT_ELEMENTS,
                checkpoint,
            )
            notes = [shape_note] if shape_note else []
            with torch.no_grad():
                # The batch-2 verification case: its eager outputs name the outputs and are reused.
                reference = flatten_outputs(model(*inputs.make(**REFERENCE_CASE)), info.output_names)
            output_names = list(reference)
            first_out = next(iter(reference.values()))
            num_classes = int(first_out.shape[-1]) if first_out.dim() == 2 else None
            labels, labels_source = class_labels(info, raw, request.labels, num_classes)
            preprocess = preprocessing(info, raw, inputs.shapes[inputs.names[0]])
            return _export_and_verify(
                request,
                formats,
                info,
                model,
                inputs,
                output_names,
                reference,
                labels,
                labels_source,
                preprocess,
                ckpt_info,
                ckpt_sha,
                out_dir,
                warnings_,
                notes,
                started,
                time.perf_counter() - started,
                progress,
            )
    finally:
        torch.set_num_threads(threads)


def _export_and_verify(
    request: ExportRequest,
    formats: tuple[str, ...],
    info: PackageInfo,
    model: Any,
    inputs: Inputs,
    output_names: list[str],
    reference: dict[str, Any],
    labels: list[str] | None,
    labels_source: str,
    preprocess: dict[str, Any],
    ckpt_info: dict[str, Any],
    ckpt_sha: str,
    out_dir: Path,
    warnings_: list[str],
    notes: list[str],
    started: float,
    prepare_seconds: float,
    progress: Callable[[str], None],
) -> ExportOutcome:
    artifacts: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    export_meta: dict[str, Any] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _err("E1111", f"cannot create the output folder: {_short(exc)}", out_dir) from None

    # aoti is compiled from a saved .pt2, so it goes last; model.pt2 is kept and verified only when
    # pt2 was asked for too (otherwise it is a staging file, removed with the staging folder).
    plan: list[str] = [f for f in formats if f != "aoti"] + [f for f in formats if f == "aoti"]
    timings: dict[str, float] = {}
    if request.verify_only:
        for fmt in plan:
            path = out_dir / FILE_NAMES[fmt]
            if not (path.exists() or path.is_symlink()):
                raise _err("E1112", f"--verify-only: `{path}` does not exist; export it first", path)
            artifacts.append(
                {
                    "format": fmt,
                    "path": str(path),
                    "path_taken": "verified only (not exported again)",
                    "export_seconds": None,
                }
            )
    else:
        staging = Path(tempfile.mkdtemp(prefix=".scmc-export-", dir=out_dir))
        try:
            ep = None
            if {"onnx", "pt2", "aoti"} & set(formats):
                progress("torch.export ...")
                ep_start = time.perf_counter()
                ep, export_meta = torch_export(model, inputs, request.static_batch, request.dynamic_spatial)
                timings["torch_export"] = time.perf_counter() - ep_start  # shared by onnx, pt2 and aoti
                if request.dynamic_spatial and not export_meta["dynamic_spatial"]:
                    warnings_.append(
                        "--dynamic-spatial: torch.export kept the spatial sizes static (the model "
                        "specializes on them)"
                    )
            output_shapes = {n: _output_shape(t, export_meta or {"dynamic_batch": True}) for n, t in reference.items()}
            metadata = _metadata(
                info,
                inputs,
                export_meta or {"dynamic_batch": True, "dynamic_spatial": False, "static_batch_size": None},
                output_shapes,
                labels,
                preprocess,
                ckpt_info,
                ckpt_sha,
            )
            for fmt in plan:
                dest = staging / FILE_NAMES[fmt]
                progress(f"export {fmt} ...")
                fmt_start = time.perf_counter()
                if fmt == "onnx":
                    entry = export_onnx(ep, inputs, output_names, request.opset, dest, metadata)
                elif fmt == "torchscript":
                    entry = export_torchscript(model, inputs, dest)
                elif fmt == "pt2":
                    entry = export_pt2(ep, dest)
                else:
                    pt2 = staging / FILE_NAMES["pt2"]
                    if "pt2" not in formats:  # only aoti asked for: the .pt2 it compiles from stays in staging
                        export_pt2(ep, pt2)
                    entry = export_aoti(pt2, dest, request.aoti_timeout, export_meta)
                    if "skipped" in entry:
                        skipped.append(
                            {
                                "format": "aoti",
                                "reason": entry["skipped"],
                                "seconds": time.perf_counter() - fmt_start,
                            }
                        )
                        warnings_.append(f"AOTInductor package skipped: {entry['skipped']}")
                        continue
                for note in entry.get("notes", []):
                    warnings_.append(f"{fmt}: {note}")
                entry = {"format": fmt, **entry, "export_seconds": time.perf_counter() - fmt_start}
                artifacts.append(entry)
            # Move the finished files into place (same file system: renames).
            for entry in artifacts:
                for name in entry["files"]:
                    os.replace(staging / name, out_dir / name)
                entry["path"] = str(out_dir / FILE_NAMES[entry["format"]])
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    errors: list[Diagnostic] = []
    runners = []
    eager_outputs: dict[str, Any] = {_case_key(REFERENCE_CASE): reference}
    timings.update(prepare=prepare_seconds, load_and_export=time.perf_counter() - started)
    for entry in artifacts:
        verify_start = time.perf_counter()
        path = Path(entry["path"])
        entry["bytes"] = sum((path.parent / f).stat().st_size for f in entry.get("files", [path.name]))
        progress(f"verify {entry['format']} ...")
        # What --verify-only finds was not written by this run: it is checked (scmc.artifacts)
        # unless --trust-artifact. Files this run just wrote are loaded as they are.
        runner = load_runner(
            entry["format"], path, inputs.names, output_names, check=request.verify_only and not request.trust_artifact
        )
        entry["dynamic_batch"] = runner.dynamic_batch
        entry["dynamic_spatial"] = runner.dynamic_spatial
        if not runner.dynamic_batch:
            entry["static_batch_size"] = runner.static_batch_size
        entry["verification"] = verify(runner, model, inputs, output_names, eager_outputs)
        entry["worst"] = worst_by_output(entry["verification"])
        runners.append(runner)
        entry["verification"]["seconds"] = entry["verify_seconds"] = time.perf_counter() - verify_start
        if not entry["verification"]["passed"]:
            errors.append(_mismatch_diagnostic(entry, path))
    timings["verification"] = time.perf_counter() - started - timings["load_and_export"]
    latency: dict[str, Any] = {}
    if request.latency_rounds > 0 and runners:
        progress("latency ...")
        latency_start = time.perf_counter()
        latency = measure_latency(model, runners, inputs, request.latency_rounds)
        for entry in artifacts:
            fmt = entry["format"]
            entry["latency"] = {
                b: {
                    "median_ms": t["median_ms"][fmt],
                    "min_ms": t["min_ms"][fmt],
                    "max_ms": t["max_ms"][fmt],
                    "ratio_to_eager": t["ratio_to_eager"][fmt],
                    "eager": {k: t[k]["eager"] for k in ("median_ms", "min_ms", "max_ms")},
                    # the keys of earlier reports: medians and their ratio
                    "eager_ms": t["median_ms"]["eager"],
                    "runtime_ms": t["median_ms"][fmt],
                    "ratio": t["ratio_to_eager"][fmt],
                    "rounds": t["rounds"],
                }
                for b, t in latency.items()
                if fmt in t["median_ms"]
            }
        timings["latency"] = time.perf_counter() - latency_start
    report = {
        "scmc_version": scmc.__version__,
        "package": info.name,
        "package_dir": str(info.root),
        "package_scmc_version": info.manifest.get("scmc_version"),
        "templates": info.template_hashes(),
        "checkpoint": ckpt_info,
        "inputs": {
            n: {"shape": inputs.shapes[n], "dtype": str(inputs.dtypes[n]).replace("torch.", "")} for n in inputs.names
        },
        "outputs": output_names,
        "class_labels": labels,
        "class_labels_source": labels_source,
        "preprocess": preprocess,
        "tolerances": {k: {"atol": a, "rtol": r} for k, (a, r) in TOLERANCES.items()},
        "threads": THREADS,
        "torch_export": export_meta or None,
        "artifacts": artifacts,
        "latency": latency,
        "skipped": skipped,
        "warnings": warnings_,
        "notes": notes,
        "passed": not errors,
        "allow_mismatch": request.allow_mismatch,
        "seconds": time.perf_counter() - started,
        "timings": timings,
        "versions": _versions(),
    }
    report_path = out_dir / REPORT_NAME
    tmp = report_path.with_name(f".{REPORT_NAME}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, report_path)
    return ExportOutcome(report, report_path, errors, warnings_)


def _output_shape(tensor: Any, meta: dict[str, Any]) -> list[Any]:
    shape: list[Any] = list(tensor.shape)
    if shape:
        shape[0] = "batch" if meta.get("dynamic_batch") else shape[0]
    return shape


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _mismatch_diagnostic(entry: dict[str, Any], path: Path) -> Diagnostic:
    parts = []
    for case in entry["verification"]["cases"]:
        shape = ", ".join(f"{n}[{','.join(map(str, s))}]" for n, s in case["input_shapes"].items())
        if "error" in case:
            parts.append(f"at {shape} it failed to run: {case['error']}")
            continue
        for name, d in case["outputs"].items():
            if d["passed"]:
                continue
            if d.get("problem"):
                parts.append(f"`{name}` at {shape}: {d['problem']}")
            else:
                parts.append(
                    f"`{name}` at {shape}: max abs diff {d['max_abs']:.3g}, max rel diff {d['max_rel']:.3g}, "
                    f"{d['mismatched_elements']} elements outside atol {d['atol']:g} + rtol {d['rtol']:g}*|x| "
                    f"(worst {d['worst_over_tolerance']:.3g}x the tolerance)"
                )
    shown = "; ".join(parts[:4]) + (f"; ... ({len(parts) - 4} more)" if len(parts) > 4 else "")
    return Diagnostic(
        "E1109",
        f"{entry['format']} output does not match eager PyTorch: {shown}",
        Span(str(path)),
        "the report lists every case; --allow-mismatch keeps the exit status 0",
    )


# ------------------------------------------------------------------------------------------
# Human summary and the CLI entry


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _timing_line(entry: dict[str, Any]) -> str:
    """``onnx: exported in 3.2 s, verified in 1.1 s`` (torch.export's shared trace is not in the export time)."""
    exported = entry.get("export_seconds")
    done = "not exported again" if exported is None else f"exported in {exported:.1f} s"
    verified = entry.get("verify_seconds")
    return f"{entry['format']}: {done}" + (f", verified in {verified:.1f} s" if verified is not None else "")


def _spread(table: dict[str, Any], name: str) -> str:
    return f"{table['median_ms'][name]:.2f} [{table['min_ms'][name]:.2f}-{table['max_ms'][name]:.2f}]"


def summary(outcome: ExportOutcome) -> str:
    r = outcome.report
    ck = r["checkpoint"]
    lines = [
        f"exported {r['package']} ({ck.get('weights')} weights of {ck['path']}) -> {Path(outcome.report_path).parent}"
    ]
    for a in r["artifacts"]:
        batch = "dynamic batch" if a.get("dynamic_batch") else f"batch {a.get('static_batch_size')}"
        spatial = ", dynamic H/W" if a.get("dynamic_spatial") else ""
        opset = f", opset {a['opset']}" if "opset" in a else ""
        lines.append(
            f"  {a['format']:<11} {Path(a['path']).name:<15} {_size(a.get('bytes', 0)):>9}  "
            f"{a.get('path_taken', '')}{opset}, {batch}{spatial}"
        )
        cases = a["verification"]["cases"]
        shapes = "; ".join(",".join(map(str, next(iter(c["input_shapes"].values())))) for c in cases)
        for name, w in a.get("worst", {}).items():
            lines.append(
                f"      {name}: max abs {w['max_abs']:.2g}, max rel {w['max_rel']:.2g} "
                f"(tolerance atol {w['atol']:g}, rtol {w['rtol']:g}) over [{shapes}]"
            )
        lines.append(f"      parity: {'ok' if a['verification']['passed'] else 'MISMATCH'}")
        lines.append(f"      {_timing_line(a)}")
    if (r.get("timings") or {}).get("torch_export") is not None:
        lines.append(f"  torch.export: traced in {r['timings']['torch_export']:.1f} s (shared by onnx, pt2 and aoti)")
    latency = r.get("latency") or {}
    if latency:
        rounds = next(iter(latency.values()))["rounds"]
        lines.append(
            f"  latency, ms: median [min-max] of {rounds} interleaved rounds, {THREADS} threads; x eager's median"
        )
        for batch_size, t in latency.items():
            cells = [f"eager {_spread(t, 'eager')}"] + [
                f"{k} {_spread(t, k)} {t['ratio_to_eager'][k]:.2f}x" for k in t["median_ms"] if k != "eager"
            ]
            lines.append(f"    latency batch {batch_size}: " + ", ".join(cells))
    for s in r["skipped"]:
        lines.append(f"  {s['format']:<11} skipped: {s['reason']}")
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    for w in r["warnings"]:
        if not w.startswith("AOTInductor package skipped"):
            lines.append(f"warning: {w}")
    lines.append(f"report: {outcome.report_path}  ({r['seconds']:.1f} s)")
    return "\n".join(lines)


def render_errors(diagnostics: Sequence[Diagnostic], wrote_report: Path | None = None) -> str:
    cache: dict[str, list[str]] = {}
    body = "\n\n".join(d.render(cache) for d in diagnostics)
    count = len(diagnostics)
    tail = f"; the report is in {wrote_report}" if wrote_report else "; nothing was exported"
    return f"{body}\n\n{count} error{'s' if count != 1 else ''}{tail}."


def run_export(
    request: ExportRequest,
    echo: Callable[[str], None] = print,
    echo_err: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> int:
    """The ``scmc export`` command: print a summary (or the errors) and return the exit status."""
    echo_err = echo_err or (lambda text: print(text, file=sys.stderr))
    try:
        outcome = export_package(request, progress=(lambda m: None) if quiet else (lambda m: echo_err(m)))
    except CompileError as exc:
        echo_err(render_errors(exc.diagnostics))
        return 1
    if not quiet or outcome.errors:
        echo(summary(outcome))
    if outcome.errors:
        if request.allow_mismatch:
            echo_err(
                "\n\n".join(d.render().replace("error[", "warning[", 1) for d in outcome.errors)
                + "\n(--allow-mismatch: exit status 0)"
            )
            return 0
        echo_err(render_errors(outcome.errors, outcome.report_path))
        return 1
    return 0
