"""The compiler's stages for every part of a package: templates read, ``-p`` applied, parameters
validated, each part lowered, materialized, de-duplicated, verified and emitted, the diagnostics of
all parts collected and reported together."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import scmc
from scmc.addresses import AllowList
from scmc.build.naming import check_backward_losses, class_name_problem, package_name, package_name_problem
from scmc.build.request import LAYER_ROLES, PACKAGE_KEYS, PRESET_ROLES, ROLE_CLASSES, BuildRequest, InternalError, Part
from scmc.diagnostics import CompileError, Diagnostics, Span, did_you_mean, fail, forget_source
from scmc.ir import dump, verify
from scmc.load import (
    LDict,
    Override,
    Parameters,
    Source,
    apply_override,
    build_budget,
    check_group_overrides,
    current_budget,
    display_path,
    expand,
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
    from scmc.link import Compiled


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
        from scmc.backward import lower_backward
        from scmc.emit.backward import emit_backward

        bdef = lower_backward(source, params, part.classname, options)
        bdef = dataclasses.replace(bdef, template=recorded_path(source.path))
        check_backward_losses(bdef, source)
        text = emit_backward(bdef, header, f"{source.path.stem} backward, compiled by scmc {scmc.__version__}.")
        return Compiled(part.role, source, None, text, 0, None, default_params, backward=bdef)
    if part.role in PRESET_ROLES:
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


def compile_parts(request: BuildRequest) -> tuple[str, list[Compiled], AllowList]:
    """Every stage up to the generated module texts: (package name, compiled parts, allow-list).

    All Jinja rendering of the build shares one budget of time and output (scmc.load.budget.Budget)."""
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
