"""``scmc build``: templates -> a standalone package, written atomically.

The stages run in order (load, render/lower, materialize, de-duplicate, verify, emit);
each template's diagnostics are collected and reported together, and nothing is written
unless every stage succeeded. The package is assembled in a temporary directory next to
the destination and moved into place with renames, so an interrupted build never leaves a
partial package where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import scmc
from scmc.addresses import AllowList
from scmc.diagnostics import CompileError, Diagnostics, Span, fail
from scmc.ir import Program, dump, verify
from scmc.load import (
    LDict,
    Override,
    Parameters,
    Source,
    apply_override,
    display_path,
    parameter_blocks,
    parse_override,
    read_template,
    report_unused_overrides,
)

RUNTIME_REQUIREMENT = ">=0.1.0,<0.2"

# import root -> (distribution, lower bound) for the generated pyproject
DISTRIBUTIONS = {
    "torch": ("torch", ">=2.4"),
    "torchvision": ("torchvision", ">=0.19"),
    "timm": ("timm", ">=1.0"),
    "scmc_runtime": ("scmc-runtime", RUNTIME_REQUIREMENT),
}


class InternalError(Exception):
    """A bug in scmc: an IR invariant broke. Carries the IR dump."""

    def __init__(self, message: str, ir_dump: str = ""):
        super().__init__(message)
        self.ir_dump = ir_dump


@dataclass
class Part:
    """One template of the package and the class it becomes."""

    role: str  # model | loss | metric | backward | dataset | ema | compile
    path: Path
    classname: str


LAYER_ROLES = ("model", "loss", "metric")
PRESET_ROLES = ("dataset", "ema", "compile")
ROLE_CLASSES = {"model": "Model", "loss": "Loss", "metric": "Metric", "backward": "Backward"}
PACKAGE_KEYS = {"LOSS": "loss", "METRIC": "metric", "BACKWARD": "backward", "DATASET": "dataset", "EMA": "ema",
                "COMPILE": "compile"}


def template_kind(data: LDict) -> str:
    if "FLOW" in data:
        return "layer graph"
    if "BACKWARDS" in data:
        return "backward"
    return "preset"


def preset_parts(model: Source, given: list[Part], diags: Diagnostics) -> list[Part]:
    """Parts the model template names under PACKAGE, for roles the command line left open."""
    raw = model.data.get("PACKAGE")
    if raw is None:
        return []
    if not isinstance(raw, LDict):
        diags.error("E0910", "PACKAGE must map LOSS, METRIC, BACKWARD, DATASET, EMA, COMPILE to template files",
                    model.data.value_span("PACKAGE"))
        return []
    roles = {p.role for p in given}
    out = []
    for key, value in raw.items():
        role = PACKAGE_KEYS.get(key)
        if role is None:
            from scmc.diagnostics import did_you_mean

            diags.error("E0911", f"unknown PACKAGE key `{key}`", raw.key_span(key),
                        did_you_mean(str(key), PACKAGE_KEYS) or f"keys: {', '.join(PACKAGE_KEYS)}")
            continue
        if role in roles or value is None:
            continue
        if not isinstance(value, str):
            diags.error("E0912", f"PACKAGE.{key} must be a path to a template", raw.value_span(key))
            continue
        path = model.directory / value
        if not path.is_file():
            diags.error("E0913", f"PACKAGE.{key} names `{value}`, which does not exist", raw.value_span(key),
                        f"paths are relative to {display_path(model.directory)}")
            continue
        out.append(Part(role, path, ROLE_CLASSES.get(role, "")))
    return out


@dataclass
class BuildRequest:
    parts: list[Part]
    params: list[str] = field(default_factory=list)
    name: str | None = None
    output: Path | None = None
    force: bool = False
    shapes: dict[str, Any] = field(default_factory=dict)
    structured: bool | None = None
    sublayer: str | None = None
    allow_new_params: bool = False
    allow_modules: tuple[str, ...] = ()


@dataclass
class Compiled:
    role: str
    source: Source
    program: Program | None  # layer graphs
    text: str  # generated Python (empty for presets)
    param_count: int
    input_shapes: dict[str, Any] | None
    params: dict[str, Any]
    backward: Any = None  # scmc.backward.BackwardDef
    config: Any = None  # a rendered preset
    files: dict[str, Path] = field(default_factory=dict)  # `_file_` modules: stem -> path


@dataclass
class Plan:
    name: str
    files: dict[str, bytes]
    compiled: list[Compiled]


def package_name(model: Source, groups: Parameters) -> str:
    """`ConvNeXtV2.yaml` with DEFAULT `backbone: femto` -> `convnextv2_femto`."""
    stem = re.sub(r"[^0-9a-zA-Z]+", "_", model.path.stem).strip("_").lower() or "model"
    suffix = []
    default = groups.group("default") or {}
    for value in default.values():
        if isinstance(value, str) and value in groups.groups and value != "default":
            suffix.append(re.sub(r"[^0-9a-zA-Z]+", "_", value).lower())
    name = "_".join([stem, *suffix])
    if name[0].isdigit():
        name = "m_" + name
    return name


def compile_part(part: Part, source: Source, params: Parameters, request: BuildRequest, allow: AllowList,
                 header: list[str]) -> Compiled:
    from scmc.emit.python import emit_module_file
    from scmc.interp import build_program
    from scmc.lower import Lowerer, Options
    from scmc.passes.dedup import deduplicate
    from scmc.passes.materialize import materialize

    diags = Diagnostics()
    options = Options(allow=allow, input_shapes=request.shapes if part.role == "model" else None,
                      structured=request.structured if part.role == "model" else None)
    kind = template_kind(source.data)
    expected = "layer graph" if part.role in LAYER_ROLES else "backward" if part.role == "backward" else "preset"
    if kind != expected:
        raise fail("E0914", f"{source.display} is a {kind} template, but it was given as the {part.role}",
                   Span(source.display, 1, 1), f"a {part.role} template is a {expected}")
    default_params = dict(params.group("default") or {})
    if part.role == "backward":
        from scmc.backward import lower_backward
        from scmc.emit.backward import emit_backward

        bdef = lower_backward(source, params, part.classname, options)
        text = emit_backward(bdef, header, f"{source.path.stem} backward, compiled by scmc {scmc.__version__}.")
        return Compiled(part.role, source, None, text, 0, None, default_params, backward=bdef)
    if part.role in PRESET_ROLES:
        from scmc.load import expand, plain

        body = LDict({k: v for k, v in source.data.items() if k != "PARAMETERS"}, span=source.data.span)
        body.key_spans = dict(source.data.key_spans)
        config = plain(expand(body, params))
        return Compiled(part.role, source, None, "", 0, None, default_params, config=config)
    lowerer = Lowerer(options, diags)
    try:
        root = lowerer.lower_root(source, params, part.classname, request.sublayer if part.role == "model" else None)
    except CompileError as exc:
        diags.extend(exc.diagnostics)
        raise CompileError(list(diags)) from None
    diags.raise_if_any()
    materialize(root, allow)
    program = deduplicate(root, part.classname)
    try:
        verify(program)
    except Exception as exc:
        raise InternalError(str(exc), dump(program)) from exc
    import torch

    try:
        with torch.device("meta"):
            live = build_program(program, allow)
        count = sum(p.numel() for p in live.parameters())
    except Exception as exc:
        raise InternalError(f"the compiled program does not construct: {type(exc).__name__}: {exc}", dump(program)) from exc
    doc = f"{source.path.stem} {part.role}, compiled by scmc {scmc.__version__}."
    text = emit_module_file(program, header, doc)
    return Compiled(part.role, source, program, text, count, root.input_shapes, default_params, files=dict(lowerer.files))


def plan_package(request: BuildRequest) -> Plan:
    allow = AllowList(extra=tuple(request.allow_modules))
    diags = Diagnostics()
    sources: list[Source] = []
    parts = list(request.parts)
    for part in request.parts:
        try:
            sources.append(read_template(part.path))
        except CompileError as exc:
            diags.extend(exc.diagnostics)
    diags.raise_if_any()
    for part in preset_parts(sources[0], parts, diags):
        try:
            sources.append(read_template(part.path))
            parts.append(part)
        except CompileError as exc:
            diags.extend(exc.diagnostics)
    diags.raise_if_any()
    overrides: list[Override] = []
    for text in request.params:
        try:
            overrides.append(parse_override(text))
        except CompileError as exc:
            diags.extend(exc.diagnostics)
    diags.raise_if_any()
    used = [False] * len(overrides)
    for source in sources:
        blocks = parameter_blocks(source.data)
        if not blocks and request.allow_new_params and source is sources[0]:
            block = LDict(span=source.data.span)
            source.data["PARAMETERS"] = block
            blocks = [block]
        for i, override in enumerate(overrides):
            if apply_override(blocks, override, diags, request.allow_new_params and source is sources[0], source.display):
                used[i] = True
    report_unused_overrides(overrides, used, sources, diags)
    diags.raise_if_any()

    param_sets = []
    for source in sources:
        raw = source.data.get("PARAMETERS")
        param_sets.append(Parameters.from_raw(raw, source.data.key_span("PARAMETERS") if raw is not None else source.data.span, diags))
    diags.raise_if_any()

    name = request.name or package_name(sources[0], param_sets[0])
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or name in {"torch", "timm", "scmc", "scmc_runtime", "test", "tests"}:
        raise fail("E0900", f"package name `{name}` is not usable", hint="--name takes a lowercase Python identifier, e.g. convnextv2_femto")
    compiled: list[Compiled] = []
    for part, source, params in zip(parts, sources, param_sets):
        header = [
            f"Generated by scmc {scmc.__version__} from {source.display} -- do not edit.",
            f"Parameters: {' '.join(request.params) if request.params else '(template defaults)'}",
        ]
        try:
            compiled.append(compile_part(part, source, params, request, allow, header))
        except CompileError as exc:
            diags.extend(exc.diagnostics)
    diags.raise_if_any()
    from scmc.emit.package import package_files

    files = package_files(name, request, compiled, allow)
    return Plan(name, files, compiled)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- writing


def default_output(name: str) -> Path:
    return Path("artifacts") / name


def write_package(plan: Plan, destination: Path, force: bool) -> None:
    """Write all files into a temporary sibling directory, then swap it into place."""
    destination = destination.absolute()
    if destination.exists() and not force:
        raise fail("E0901", f"{display_path(destination)} already exists",
                   hint="pass --force to replace it (the old package is kept until the new one is complete)")
    if destination.exists() and not destination.is_dir():
        raise fail("E0902", f"{display_path(destination)} exists and is not a directory")
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail("E0903", f"cannot create {display_path(parent)}: {exc.strerror}", hint="choose another -o directory") from None
    if not os.access(parent, os.W_OK):
        raise fail("E0903", f"cannot write to {display_path(parent)}: permission denied", hint="choose another -o directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=parent))
    old = parent / f".{destination.name}.old-{os.getpid()}"
    blocked = _block_signals()
    try:
        for rel, data in sorted(plan.files.items()):
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if destination.exists():
            os.replace(destination, old)
        os.replace(staging, destination)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not destination.exists():
            os.replace(old, destination)
        raise fail("E0904", f"writing {display_path(destination)} failed: {exc.strerror or exc}") from None
    finally:
        _restore_signals(blocked)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write one file through a temporary sibling and a rename."""
    path = path.absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise fail("E0904", f"writing {display_path(path)} failed: {exc.strerror or exc}") from None


def _block_signals() -> Any:
    """Hold SIGINT/SIGTERM while the rename happens, so it is never half done."""
    if hasattr(signal, "pthread_sigmask"):
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    return None


def _restore_signals(previous: Any) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def build(request: BuildRequest) -> tuple[Plan, Path]:
    plan = plan_package(request)
    destination = request.output or default_output(plan.name)
    write_package(plan, destination, request.force)
    return plan, destination


@dataclass
class CheckResult:
    destination: Path
    missing: list[str]  # files the templates produce that are not on disk
    extra: list[str]  # files on disk the templates do not produce
    changed: dict[str, str]  # file -> unified diff (truncated)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def summary(self, limit: int = 40) -> str:
        lines = []
        for rel in self.missing:
            lines.append(f"  missing   {rel}")
        for rel in self.extra:
            lines.append(f"  extra     {rel}")
        for rel, diff in self.changed.items():
            added = sum(1 for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++"))
            removed = sum(1 for l in diff.splitlines() if l.startswith("-") and not l.startswith("---"))
            lines.append(f"  changed   {rel} (+{added} -{removed})")
        body = "\n".join(lines)
        diffs = "\n".join(self.changed.values())
        diff_lines = diffs.splitlines()
        if len(diff_lines) > limit:
            diffs = "\n".join(diff_lines[:limit]) + f"\n  ... {len(diff_lines) - limit} more diff lines"
        return body + ("\n\n" + diffs if diffs else "")


def check(request: BuildRequest) -> CheckResult:
    """Compare the package on disk with what the templates produce now (`scmc build --check`)."""
    import difflib

    plan = plan_package(request)
    destination = request.output or default_output(plan.name)
    if not destination.is_dir():
        raise fail("E0905", f"{display_path(destination)} does not exist, so there is nothing to check",
                   hint="build it first, or pass -o to point at the package")
    on_disk = {str(p.relative_to(destination)).replace(os.sep, "/"): p for p in destination.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
               and ".egg-info" not in str(p)}
    missing = sorted(set(plan.files) - set(on_disk))
    extra = sorted(set(on_disk) - set(plan.files))
    changed: dict[str, str] = {}
    for rel in sorted(set(plan.files) & set(on_disk)):
        current = on_disk[rel].read_bytes()
        if current != plan.files[rel]:
            diff = difflib.unified_diff(current.decode(errors="replace").splitlines(True),
                                        plan.files[rel].decode().splitlines(True), f"on disk: {rel}", f"from templates: {rel}")
            changed[rel] = "".join(diff)
    return CheckResult(destination, missing, extra, changed)


def manifest(name: str, request: BuildRequest, compiled: list[Compiled], dependencies: list[str]) -> dict[str, Any]:
    import torch

    inputs = []
    seen: set[str] = set()
    for c in compiled:
        for path in [c.source.path]:
            rel = c.source.display
            if rel in seen:
                continue
            seen.add(rel)
            inputs.append({"role": c.role, "path": rel.replace(os.sep, "/"), "sha256": sha256(path)})
        for stem, path in sorted(c.files.items()):
            inputs.append({"role": "layer file", "path": display_path(path).replace(os.sep, "/"), "sha256": sha256(path)})
    model = next((c for c in compiled if c.role == "model"), compiled[0])
    return {
        "package": name,
        "scmc_version": scmc.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "parameters": list(request.params),
        "resolved_parameters": _jsonable(model.params),
        "inputs": inputs,
        "classes": {c.role: c.program.root for c in compiled if c.program is not None}
        | {c.role: c.backward.classname for c in compiled if c.backward is not None},
        "input_shapes": _jsonable(model.input_shapes or {}),
        "outputs": {c.role: list(c.program.module(c.program.root).outputs) for c in compiled if c.program is not None},
        "backward": _backward_summary(next((c.backward for c in compiled if c.backward is not None), None)),
        "presets": {c.role: _jsonable(c.config) for c in compiled if c.config is not None},
        "parameter_count": model.param_count,
        "dependencies": dependencies,
        "allowed_modules": list(request.allow_modules),
    }


def _backward_summary(bdef: Any) -> dict[str, Any] | None:
    if bdef is None:
        return None
    return {"models": list(bdef.models), "losses": list(bdef.losses), "optimizers": [o.name for o in bdef.optimizers],
            "accumulate": bdef.accumulate, "autocast_dtype": bdef.autocast_dtype}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr, sort_keys=True))
