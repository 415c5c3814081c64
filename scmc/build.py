"""``scmc build``: templates -> a standalone package, written atomically.

The stages run in order (load, render/lower, materialize, de-duplicate, verify, emit);
each template's diagnostics are collected and reported together, and nothing is written
unless every stage succeeded. The package is assembled in a temporary directory next to
the destination and moved into place with renames, so an interrupted build never leaves a
partial package where a good one was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import scmc
from scmc.addresses import AllowList
from scmc.diagnostics import CompileError, Diagnostic, Diagnostics, Span, fail, forget_source, printable
from scmc.ir import dump, verify
from scmc.load import (
    LDict,
    Override,
    Parameters,
    Source,
    apply_override,
    check_group_overrides,
    current_budget,
    display_path,
    parameter_blocks,
    parse_override,
    plain,
    read_template,
    recorded_path,
    report_unused_overrides,
    template_kind,
)

if TYPE_CHECKING:
    from scmc.ir import Program
    from scmc.link import BuildInfo, Compiled

LAYER_ROLES = ("model", "loss", "metric")
PRESET_ROLES = ("dataset", "ema", "compile")


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


ROLE_CLASSES = {"model": "Model", "loss": "Loss", "metric": "Metric", "backward": "Backward"}
PACKAGE_KEYS = {
    "LOSS": "loss",
    "METRIC": "metric",
    "BACKWARD": "backward",
    "DATASET": "dataset",
    "EMA": "ema",
    "COMPILE": "compile",
}


def preset_parts(model: Source, given: list[Part], diags: Diagnostics) -> list[Part]:
    """Parts the model template names under PACKAGE, for roles the command line left open."""
    raw = model.data.get("PACKAGE")
    if raw is None:
        return []
    if not isinstance(raw, LDict):
        diags.error(
            "E0910",
            "PACKAGE must map LOSS, METRIC, BACKWARD, DATASET, EMA, COMPILE to template files",
            model.data.value_span("PACKAGE"),
        )
        return []
    roles = {p.role for p in given}
    out = []
    for key, value in raw.items():
        role = PACKAGE_KEYS.get(key)
        if role is None:
            from scmc.diagnostics import did_you_mean

            diags.error(
                "E0911",
                f"unknown PACKAGE key `{key}`",
                raw.key_span(key),
                did_you_mean(str(key), PACKAGE_KEYS) or f"keys: {', '.join(PACKAGE_KEYS)}",
            )
            continue
        if role in roles or value is None:
            continue
        if not isinstance(value, str):
            diags.error("E0912", f"PACKAGE.{key} must be a path to a template", raw.value_span(key))
            continue
        path = model.directory / value
        if not path.is_file():
            diags.error(
                "E0913",
                f"PACKAGE.{key} names `{value}`, which does not exist",
                raw.value_span(key),
                f"paths are relative to {display_path(model.directory)}",
            )
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
    cfg_dirs: tuple[Path, ...] = ()  # --allow-cfg-dir: folders CFG may read besides the template's
    presets: bool = True  # add the parts the model template names under PACKAGE
    cache: bool = False  # reuse and keep results in the build cache (scmc/cache.py); the CLI turns it on


@dataclass
class Plan:
    name: str
    files: dict[str, bytes]
    compiled: list[Compiled]  # empty when the plan came from the build cache
    param_count: int = 0  # the model's
    cached: bool = False
    warnings: list[Diagnostic] = field(default_factory=list)  # a build cache that is not private (E0950), W1204


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


# Modules a generated package imports besides its own: a package of the same name would hide them.
IMPORTED_BY_PACKAGES = ("torch", "torchvision", "timm", "numpy", "PIL", "onnxruntime", "onnx", "scmc", "scmc_runtime")


def package_name_problem(name: str) -> str:
    """Why `name` cannot be the import name of a generated package ('' when it can)."""
    import keyword

    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return "it is not a lowercase Python identifier"
    if keyword.iskeyword(name):
        return "it is a Python keyword"
    if name.startswith("__"):
        return "Python treats names starting with `__` specially"
    if name in ("test", "tests") or name in sys.stdlib_module_names:
        return "a module of Python's standard library has that name"
    if name.lower() in {m.lower() for m in IMPORTED_BY_PACKAGES} or name in sys.builtin_module_names:
        return "the generated code imports a module of that name"
    return ""


def class_name_problem(name: str) -> str:
    """Why `name` cannot be the class of a generated module ('' when it can)."""
    import keyword
    import unicodedata

    from scmc.emit.python import RESERVED

    if not name.isidentifier():
        return "it is not a Python identifier"
    if unicodedata.normalize("NFKC", name) != name:
        return f"Python reads it as `{unicodedata.normalize('NFKC', name)}`"
    if keyword.iskeyword(name) or name == "__debug__":
        return "it is a Python keyword"
    if name.startswith("_"):
        return "names starting with `_` are private to the generated modules"
    if name in RESERVED:
        return "the generated code uses that name (a builtin, typing or module name)"
    return ""


def check_backward_losses(bdef: Any, source: Source) -> None:
    """The generated `Backward.__call__(self, <losses>, *, last_in_epoch)` takes each loss by its
    name: a name Python treats specially, or one its body uses (self, update, last_in_epoch, the
    modules it imports), would break backward.py or train.py's keyword call."""
    import keyword

    from scmc.emit.python import RESERVED, addresses_in

    taken = set(RESERVED) | {"self", "update", "last_in_epoch", "scmc_runtime", "contextlib"}
    for opt in bdef.optimizers:
        for ctor in (opt.factory, opt.clip):
            if ctor is not None:
                taken |= {a.split(".")[0] for a in addresses_in(ctor)}
    diags = Diagnostics()
    where = source.data.key_span("BACKWARDS") if "BACKWARDS" in source.data else Span(source.display, 1, 1)
    for name in bdef.losses:
        if name.startswith("__") or keyword.iskeyword(name) or name in taken:
            diags.error(
                "E0931",
                f"loss `{name}` cannot be an argument of the generated `{bdef.classname}.__call__`: "
                + (
                    "Python treats names starting with `__` specially"
                    if name.startswith("__")
                    else "the generated code uses that name"
                ),
                where,
                f"rename the loss output `{name}` (in the loss template and in LOSS here), e.g. to `{name.strip('_')}_loss`",
            )
    diags.raise_if_any()


def compile_part(
    part: Part, source: Source, params: Parameters, request: BuildRequest, allow: AllowList, header: list[str]
) -> Compiled:
    from scmc.emit.python import RESERVED, emit_module_file
    from scmc.interp import build_program
    from scmc.link import Compiled
    from scmc.lower import Lowerer, Options
    from scmc.passes.comments import carry_comments
    from scmc.passes.dedup import deduplicate
    from scmc.passes.identity import identities
    from scmc.passes.materialize import materialize

    diags = Diagnostics()
    options = Options(
        allow=allow,
        input_shapes=request.shapes if part.role == "model" else None,
        structured=request.structured if part.role == "model" else None,
        cfg_dirs=tuple(request.cfg_dirs),
    )
    kind = template_kind(source.data, params)  # after rendering: a Jinja block may make the FLOW
    expected = "layer graph" if part.role in LAYER_ROLES else "backward" if part.role == "backward" else "preset"
    if kind != expected:
        raise fail(
            "E0914",
            f"{source.display} is a {kind} template, but it was given as the {part.role}",
            Span(source.display, 1, 1),
            f"a {part.role} template is a {expected}",
        )
    default_params = dict(params.group("default") or {})
    if part.role == "backward":
        import dataclasses

        from scmc.backward import lower_backward
        from scmc.emit.backward import emit_backward

        bdef = lower_backward(source, params, part.classname, options)
        bdef = dataclasses.replace(bdef, template=recorded_path(source.path))
        check_backward_losses(bdef, source)
        text = emit_backward(bdef, header, f"{source.path.stem} backward, compiled by scmc {scmc.__version__}.")
        return Compiled(part.role, source, None, text, 0, None, default_params, backward=bdef)
    if part.role in PRESET_ROLES:
        from scmc.load import expand

        body = LDict({k: v for k, v in source.data.items() if k != "PARAMETERS"}, span=source.data.span)
        body.key_spans = dict(source.data.key_spans)
        tree = expand(body, params)
        return Compiled(part.role, source, None, "", 0, None, default_params, config=plain(tree), tree=tree)
    lowerer = Lowerer(options, diags)
    try:
        root = lowerer.lower_root(source, params, part.classname, request.sublayer if part.role == "model" else None)
    except CompileError as exc:
        diags.extend(exc.diagnostics)
        raise CompileError(list(diags)) from None
    diags.raise_if_any()
    materialize(root, allow)
    program = deduplicate(
        root, part.classname, reserved=set(RESERVED)
    )  # a user layer `List` must not shadow typing.List
    program = identities(program)  # zero-rate dropouts (and layers left doing nothing) as torch.nn.Identity()
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
        raise InternalError(
            f"the compiled program does not construct: {type(exc).__name__}: {exc}", dump(program)
        ) from exc
    doc = f"{source.path.stem} {part.role}, compiled by scmc {scmc.__version__}."
    includes = [t for t in lowerer.templates.values() if t.path != source.path]
    commented = carry_comments(program, [source, *includes])  # the template's comments, as docstrings
    text = emit_module_file(_recorded_templates(commented, [source, *includes]), header, doc)
    return Compiled(
        part.role,
        source,
        program,
        text,
        count,
        root.input_shapes,
        default_params,
        files=dict(lowerer.files),
        includes=includes,
        output_shapes=root.output_shapes,
        macs=root.macs,
    )


def plan_package(request: BuildRequest) -> Plan:
    """Every generated file of the package, in memory; from the build cache when allowed and unchanged."""
    from scmc import cache

    warnings = []
    refused = cache.refusal() if request.cache else None  # checked before anything is read from it
    if refused is not None:
        warnings.append(Diagnostic("E0950", refused, severity="warning"))
    fingerprint = cache.environment_fingerprint() if request.cache and refused is None else None
    key = cache.request_key(request, fingerprint) if fingerprint is not None else None
    entry = cache.load(key) if key is not None else None
    if entry is not None:
        return Plan(entry.name, entry.files, [], entry.param_count, cached=True)
    with cache.recording(fingerprint) as reads:
        name, compiled, allow = compile_parts(request)
        from scmc.emit.package import package_files  # not needed by a hit
        from scmc.link import link

        package = link(name, compiled, build_info(request), allow)
        files = package_files(package)
    count = next((c.param_count for c in compiled if c.role == "model"), 0)
    if key is not None:
        cache.store(key, reads, name, files, count)
    return Plan(name, files, compiled, count, warnings=warnings + list(package.warnings))


def build_info(request: BuildRequest) -> "BuildInfo":
    from scmc.link import BuildInfo

    return BuildInfo(
        params=tuple(request.params),
        parts=tuple((p.role, p.path) for p in request.parts),
        shapes=tuple(request.shapes.items()),
        allow_modules=tuple(request.allow_modules),
    )


def compile_parts(request: BuildRequest) -> tuple[str, list[Compiled], AllowList]:
    """Every stage up to the generated module texts: (package name, compiled parts, allow-list).

    All Jinja rendering of the build shares one budget of time and output (scmc.load.Budget)."""
    from scmc.load import build_budget

    with build_budget():
        return _compile_parts(request)


def _compile_parts(request: BuildRequest) -> tuple[str, list[Compiled], AllowList]:
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
    from scmc.lower import cfg_roots

    roots = cfg_roots(sources[0], tuple(request.cfg_dirs))
    for part in preset_parts(sources[0], parts, diags) if request.presets else ():
        try:
            sources.append(read_template(part.path))
            parts.append(part)
        except CompileError as exc:
            diags.extend(exc.diagnostics)
        finally:
            if not any(part.path.resolve().is_relative_to(root) for root in roots):
                # PACKAGE names files beside the model's folder (cfg/models -> ../losses); one outside
                # its folder and --allow-cfg-dir is read, but diagnostics do not show its lines
                forget_source(display_path(part.path))
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
            if apply_override(blocks, override, request.allow_new_params and source is sources[0]):
                used[i] = True
    report_unused_overrides(overrides, used, sources, diags)
    diags.raise_if_any()

    param_sets = []
    for source in sources:
        raw = source.data.get("PARAMETERS")
        param_sets.append(
            Parameters.from_raw(raw, source.data.key_span("PARAMETERS") if raw is not None else source.data.span, diags)
        )
    diags.raise_if_any()

    name = request.name or package_name(sources[0], param_sets[0])
    problem = package_name_problem(name)
    if problem:
        raise fail(
            "E0900",
            f"package name `{name}` is not usable: {problem}",
            hint="--name takes a lowercase Python identifier of its own, e.g. convnextv2_femto",
        )
    for part in parts:
        problem = class_name_problem(part.classname) if part.classname else ""
        if problem:
            raise fail(
                "E0906",
                f"class name `{part.classname}` is not usable: {problem}",
                hint="-c/--classname takes a Python identifier that is not a keyword, builtin or module name, e.g. Model",
            )
    taken = [p.classname for p in parts if p.classname]
    clash = next((c for i, c in enumerate(taken) if c in taken[:i]), None)
    if clash is not None:
        raise fail(
            "E0906",
            f"class name `{clash}` is not usable: the package already has a class `{clash}` (the "
            f"{[p.role for p in parts if p.classname == clash][1]})",
            hint="-c/--classname takes a name the loss, metric and backward classes do not use, e.g. Model",
        )
    from scmc.emit.python import comment_text

    compiled: list[Compiled] = []
    for part, source, params in zip(parts, sources, param_sets, strict=True):
        header = [  # each entry is one comment line: newlines in -p values or file names are spelled out
            comment_text(f"Generated by scmc {scmc.__version__} from {recorded_path(source.path)} -- do not edit."),
            comment_text(f"Parameters: {' '.join(request.params) if request.params else '(template defaults)'}"),
        ]
        try:
            compiled.append(compile_part(part, source, params, request, allow, header))
        except CompileError as exc:
            diags.extend(exc.diagnostics)
    diags.raise_if_any()
    groups_used = current_budget().groups_used
    check_group_overrides(overrides, groups_used, sources, diags)  # a group value never goes unused
    diags.raise_if_any()
    for c, params in zip(compiled, param_sets, strict=True):  # the manifest records the groups really used
        c.groups = {
            g: dict(values) for g in sorted(groups_used) if g != "default" and (values := params.group(g)) is not None
        }
    return name, compiled, allow


def create_module(request: BuildRequest, output: Path | None, force: bool = False) -> tuple[Compiled, Path]:
    """`scmc torch create model|backward`: one generated Python file, as structcast-model wrote it.

    The first part of the request is compiled alone (no PACKAGE presets); its module text is
    written atomically to `output` (default: snake_case(classname).py). An existing file is
    replaced only with `force`, and never when it is one of the build's inputs."""
    request.presets = False
    if output is None:
        from scmc.names import to_snake

        output = Path(f"{to_snake(request.parts[0].classname)}.py")
    destination = output
    guard_file(destination, force, [p.path for p in request.parts])  # before compiling: no torch import yet
    _, compiled, _ = compile_parts(request)
    part = compiled[0]
    if part.files:
        stem, path = sorted(part.files.items())[0]
        raise fail(
            "E0907",
            f"`_file_` layer {display_path(path)} needs a package around the generated module",
            hint="use `scmc build`, which copies layer files into the package",
        )
    guard_file(destination, force, compiled_inputs(request, compiled))
    write_text_atomic(destination, part.text)
    return part, destination


def compiled_inputs(request: BuildRequest, compiled: list[Compiled]) -> list[Path]:
    """Every file a build read: the templates named on the command line, PACKAGE presets, CFG
    includes and `_file_` layer modules."""
    paths = [p.path for p in request.parts]
    for c in compiled:
        paths.append(c.source.path)
        paths.extend(t.path for t in c.includes)
        paths.extend(c.files.values())
    return paths


def _recorded_templates(program: Program, sources: list[Source]) -> Program:
    """The program with each class's `template` (a file's display path, `path:Layer` for a layer
    of a CFG file) and docstring spelling the files as `recorded_path` does."""
    import dataclasses

    spelled = {s.display: recorded_path(s.path) for s in sources}

    def spell(template: str) -> str:
        for display, recorded in spelled.items():
            if template == display or template.startswith(display + ":"):
                return recorded + template[len(display) :]
        return template

    def spell_doc(doc: str) -> str:  # docstrings quote the file as `path`
        for display, recorded in spelled.items():
            doc = doc.replace(f"`{display}`", f"`{recorded}`")
        return doc

    modules = tuple(dataclasses.replace(m, template=spell(m.template), doc=spell_doc(m.doc)) for m in program.modules)
    return dataclasses.replace(program, modules=modules)


# ----------------------------------------------------------------------------- writing


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


# ----------------------------------------------------------------------------- what may be replaced

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


def build(request: BuildRequest) -> tuple[Plan, Path]:
    early = request.output or _early_output(request)
    if early is not None:  # refusals that need no compiling come before torch is imported
        guard_destination(_through_link(early), request.force, [p.path for p in request.parts])
    plan = plan_package(request)
    destination = request.output or default_output(plan.name)
    write_package(plan, destination, request.force, compiled_inputs(request, plan.compiled))
    return plan, destination


def _early_output(request: BuildRequest) -> Path | None:
    """The default output directory, from the package name, read cheaply (no torch): the model
    template's DEFAULT group after -p. None where that needs more (errors are reported later)."""
    if request.name:
        return default_output(request.name)
    try:
        source = read_template(request.parts[0].path)
        blocks = parameter_blocks(source.data)
        for text in request.params:  # one for another template (-p target_loss=...) leaves the name as it is
            apply_override(blocks, parse_override(text), request.allow_new_params)
        diags = Diagnostics()
        raw = source.data.get("PARAMETERS")
        params = Parameters.from_raw(raw, source.data.span, diags)
    except CompileError:
        return None
    return None if diags else default_output(package_name(source, params))


@dataclass
class CheckResult:
    destination: Path
    missing: list[str]  # files the templates produce that are not on disk
    extra: list[str]  # files on disk the templates do not produce
    changed: dict[str, str]  # file -> unified diff (truncated)
    links: dict[str, str] = field(default_factory=dict)  # symbolic links in the package -> where they point

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed or self.links)

    def summary(self, limit: int = 40) -> str:
        lines = []
        for rel in self.missing:
            lines.append(f"  missing   {rel}")
        for rel in self.extra:
            lines.append(f"  extra     {rel}")
        for rel, target in self.links.items():
            lines.append(f"  link      {rel} -> {printable(target)} (not followed; scmc writes no links)")
        for rel, diff in self.changed.items():
            added = sum(1 for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++"))
            removed = sum(1 for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---"))
            lines.append(f"  changed   {rel} (+{added} -{removed})")
        body = "\n".join(lines)
        diffs = "\n".join(self.changed.values())
        diff_lines = diffs.splitlines()
        if len(diff_lines) > limit:
            diffs = "\n".join(diff_lines[:limit]) + f"\n  ... {len(diff_lines) - limit} more diff lines"
        return body + ("\n\n" + diffs if diffs else "")


def check(request: BuildRequest) -> CheckResult:
    """Compare the package on disk with what the templates produce now (`scmc build --check`).

    The files on disk are read without following symbolic links: a link is reported as a link
    (with where it points), never by the content of what it points to. What packaging tools
    leave in the folder (build/, dist/, *.egg-info, __pycache__) is not compared."""
    import difflib

    early = request.output or _early_output(request)
    if early is not None:
        _check_exists(early)  # before compiling: no torch import for a missing package
    plan = plan_package(request)
    destination = request.output or default_output(plan.name)
    _check_exists(destination)
    destination = _through_link(destination)
    on_disk: dict[str, Path] = {}
    links: dict[str, str] = {}
    for root, dirs, files in os.walk(destination):
        base = Path(root)
        for entry in [*dirs, *files]:
            path = base / entry
            rel = path.relative_to(destination)
            if is_leftover(rel.parts) and not path.is_symlink():
                continue
            if path.is_symlink():
                links[rel.as_posix()] = os.readlink(path)
            elif entry in files:
                on_disk[rel.as_posix()] = path
        dirs[:] = [
            d
            for d in dirs
            if not (base / d).is_symlink() and not is_leftover((base / d).relative_to(destination).parts)
        ]
    missing = sorted(set(plan.files) - set(on_disk) - set(links))
    extra = sorted(set(on_disk) - set(plan.files))
    changed: dict[str, str] = {}
    for rel in sorted(set(plan.files) & set(on_disk)):
        current = on_disk[rel].read_bytes()
        if current != plan.files[rel]:
            diff = difflib.unified_diff(
                current.decode(errors="replace").splitlines(True),
                plan.files[rel].decode().splitlines(True),
                f"on disk: {rel}",
                f"from templates: {rel}",
            )
            changed[rel] = "".join(diff)
    return CheckResult(destination, missing, extra, changed, dict(sorted(links.items())))


@_output_errors
def _check_exists(destination: Path) -> None:
    if not destination.is_dir():
        raise fail(
            "E0905",
            f"{display_path(destination)} does not exist, so there is nothing to check",
            hint="build it first, or pass -o to point at the package",
        )
