"""What the commands run: ``scmc build`` (:func:`build`), ``--check`` (:func:`check`) and
``scmc torch create`` (:func:`create_module`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from scmc.build.destination import _output_errors, _through_link, guard_destination, guard_file, is_leftover
from scmc.build.naming import package_name
from scmc.build.plan import plan_package
from scmc.build.request import BuildRequest, Plan
from scmc.build.stages import compile_parts, compiled_inputs
from scmc.build.write import default_output, write_package, write_text_atomic
from scmc.diagnostics import CompileError, Diagnostics, fail, printable
from scmc.load import Parameters, apply_override, display_path, parameter_blocks, parse_override, read_template
from scmc.names import to_snake

if TYPE_CHECKING:
    from scmc.link import Compiled


def create_module(request: BuildRequest, output: Path | None, force: bool = False) -> tuple[Compiled, Path]:
    """`scmc torch create model|backward`: one generated Python file, as structcast-model wrote it.

    The first part of the request is compiled alone (no PACKAGE presets); its module text is
    written atomically to `output` (default: snake_case(classname).py). An existing file is
    replaced only with `force`, and never when it is one of the build's inputs."""
    request.presets = False
    if output is None:
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
