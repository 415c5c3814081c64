"""The ``scmc`` command line: parse flags, call the stages, print, set the exit code."""

from __future__ import annotations

import functools
import inspect as _pyinspect
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import click

import scmc
from scmc.diagnostics import CompileError


def _shape(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=C,H,W`` (or ``NAME:C,H,W``), optionally ``:DTYPE`` after the sizes (``tokens=16:int64``)."""
    from scmc.ir import INPUT_DTYPES

    name, sep, dims = text.partition("=")
    if not sep:
        name, sep, dims = text.partition(":")
    dims, _, dtype = dims.partition(":")
    dtype = dtype.strip() or "float32"
    try:
        shape = [int(d) for d in dims.replace("[", "").replace("]", "").split(",") if d.strip()]
    except ValueError:
        shape = []
    if not sep or not name.strip().isidentifier() or not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(
            f"`{text}`: write NAME=C,H,W (sizes without the batch dimension), e.g. image=3,224,224, "
            "optionally with a dtype, e.g. tokens=16:int64"
        )
    if dtype not in INPUT_DTYPES:
        raise click.BadParameter(f"`{text}`: dtype `{dtype}` is not supported; use one of {', '.join(INPUT_DTYPES)}")
    return name.strip(), {"shape": shape, "dtype": dtype}


# ----------------------------------------------------------------------------- output conventions

VERBOSITY = 0  # -1 with -q, the count of -v otherwise; set by every command's options
_MARKS = re.compile(r"(?m)^(?:\S+: )?(error|warning)(\[[A-Z]\d{4}\])?:|^internal compiler error:")


def use_colour(stream: Any) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def paint(text: str, colour: bool) -> str:
    """``error[...]`` in red, ``warning[...]`` in yellow, when COLOUR."""
    if not colour:
        return text

    def mark(m: re.Match) -> str:
        return click.style(m.group(0), fg="yellow" if m.group(1) == "warning" else "red", bold=True)

    return _MARKS.sub(mark, text)


def _echo_err(text: str) -> None:
    """A problem, on stderr: diagnostics are printed whatever -q says."""
    colour = use_colour(sys.stderr)
    click.echo(paint(text, colour), err=True, color=colour)


def verbosity(function: Callable[..., Any]) -> Callable[..., Any]:
    """``-v/--verbose`` and ``-q/--quiet``, with one meaning on every command: ``-q`` prints only
    what the command is for (a report, YAML, an install command) and problems, never progress or
    ``wrote ...`` lines; ``-v`` adds detail (files written, files watched, what was collapsed).
    A command whose function takes ``quiet`` gets it; the others read ``VERBOSITY``."""
    takes_quiet = "quiet" in _pyinspect.signature(function).parameters

    @functools.wraps(function)
    def wrapper(*args: Any, verbose: int, quiet: bool, **kwargs: Any) -> Any:
        global VERBOSITY
        if verbose and quiet:
            raise click.UsageError("-v and -q contradict each other; give one of them")
        VERBOSITY = -1 if quiet else verbose
        if takes_quiet:
            kwargs["quiet"] = quiet
        return function(*args, **kwargs)

    wrapper = click.option(
        "-q", "--quiet", is_flag=True, help="Print only the result and problems (no progress, no `wrote` lines)."
    )(wrapper)
    return click.option("-v", "--verbose", count=True, help="Print more detail (files written, watched, ...).")(wrapper)


EXIT_CODES = """\
\b
Exit status: 0 success; 1 a user error (one message naming the file, line or flag and what to do);
2 a usage error (an unknown or bad flag); 70 an internal error (a bug in scmc: please report it).
Colour only on a terminal and never with NO_COLOR set.
\b
Shell completion (bash; zsh_source, fish_source likewise):
  eval "$(_SCMC_COMPLETE=bash_source scmc)"
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(scmc.__version__, prog_name="scmc")
def main() -> None:
    """scmc: compile YAML layer templates into standalone PyTorch packages.

    \b
    Example:
      scmc build cfg/models/ConvNeXtV2.yaml -p backbone=femto
      scmc inspect artifacts/convnextv2_femto
    """


@main.command()
@click.argument("template", type=click.Path(path_type=Path))
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a parameter: key=value, group.key=value, or 'DEFAULT: {key: value}'. Repeatable.",
)
@click.option("--loss", type=click.Path(path_type=Path), help="Loss template (a layer graph) -> loss.py.")
@click.option("--metric", type=click.Path(path_type=Path), help="Metric template (a layer graph) -> metric.py.")
@click.option("--backward", type=click.Path(path_type=Path), help="Backward template -> backward.py.")
@click.option("--dataset", type=click.Path(path_type=Path), help="Dataset preset: defaults of the generated train.py.")
@click.option("--name", help="Package name (default: template stem + selected group, e.g. convnextv2_femto).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output directory (default: artifacts/<name>).")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing package that scmc wrote (never the working directory, a folder holding an input, "
    "or one with files scmc did not write).",
)
@click.option(
    "-s",
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=C,H,W[:DTYPE]",
    help="Input shape without batch (and dtype, default float32), e.g. tokens=16:int64; overrides INPUT_SHAPES.",
)
@click.option("-c", "--classname", default="Model", show_default=True, help="Name of the generated model class.")
@click.option("--no-structured-output", is_flag=True, help="Return a value or tuple instead of a dict.")
@click.option("--sublayer", help="Compile the named user layer (e.g. Backbone) instead of the root.")
@click.option("--allow-new-params", is_flag=True, help="Let -p add keys the templates do not define (to DEFAULT).")
@click.option(
    "--allow-module", "allow_modules", multiple=True, metavar="MODULE", help="Widen the address allow-list. Repeatable."
)
@click.option(
    "--allow-cfg-dir",
    "cfg_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="DIR",
    help="Let CFG and PACKAGE read templates from DIR too (default: only the template's folder). Repeatable.",
)
@click.option(
    "--check", is_flag=True, help="Write nothing; exit 1 with a diff summary if the package on disk is stale."
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Compile even if an identical build is cached, and cache nothing (also: SCMC_NO_CACHE=1).",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Build, then rebuild whenever a template file the build read changes (Ctrl-C stops; exit 0).",
)
@verbosity
def build(
    template: Path,
    params: tuple[str, ...],
    loss: Path | None,
    metric: Path | None,
    backward: Path | None,
    dataset: Path | None,
    name: str | None,
    output: Path | None,
    force: bool,
    shapes: tuple[str, ...],
    classname: str,
    no_structured_output: bool,
    sublayer: str | None,
    allow_new_params: bool,
    allow_modules: tuple[str, ...],
    cfg_dirs: tuple[Path, ...],
    check: bool,
    no_cache: bool,
    watch: bool,
    quiet: bool,
) -> None:
    """Compile TEMPLATE (and optional loss and metric templates) into a package.

    An identical earlier build (same command, working directory, template files and installed
    software) is reused from the build cache (~/.cache/scmc, or $SCMC_CACHE_DIR) instead of
    compiled again. With --watch one process rebuilds on every change of a file the build read.

    \b
    Examples:
      scmc build cfg/models/ConvNeXtV2.yaml -p backbone=femto -p num_classes=10
      scmc build cfg/models/ConvNeXtV2.yaml -p backbone=femto --force --watch
    """
    from scmc.build import BuildRequest, Part
    from scmc.cache import disabled_by_env

    if not classname.isidentifier():
        raise click.BadParameter(f"`{classname}` is not a Python identifier", param_hint="--classname")
    parts = [Part("model", template, classname)]
    if loss is not None:
        parts.append(Part("loss", loss, "Loss"))
    if metric is not None:
        parts.append(Part("metric", metric, "Metric"))
    if backward is not None:
        parts.append(Part("backward", backward, "Backward"))
    if dataset is not None:
        parts.append(Part("dataset", dataset, ""))
    request = BuildRequest(
        parts=parts,
        params=list(params),
        name=name,
        output=output,
        force=force,
        shapes=dict(_shape(s) for s in shapes),
        structured=False if no_structured_output else None,
        sublayer=sublayer,
        allow_new_params=allow_new_params,
        allow_modules=tuple(allow_modules),
        cfg_dirs=tuple(cfg_dirs),
        cache=not (no_cache or disabled_by_env()),
    )
    if watch:
        if check:
            raise click.UsageError("--watch and --check do not go together: --check writes nothing to watch")
        from scmc.watch import watch as run_watch

        sys.exit(run_watch(request, echo=click.echo, echo_err=_echo_err, quiet=quiet, verbose=VERBOSITY > 0))
    if check:
        run_check(request)
    else:
        run_build(request, quiet)


def run_check(request: Any) -> None:
    from scmc.build import check as do_check
    from scmc.load import display_path

    try:
        result = do_check(request)
    except CompileError as exc:
        _echo_err(exc.render().replace("nothing was written", "nothing was checked"))
        sys.exit(1)
    where = display_path(result.destination)
    if result.ok:
        click.echo(f"{where} is up to date with its templates")
        return
    _echo_err(
        f"{where} differs from what the templates produce now:\n{result.summary()}\n"
        f"rebuild with the same command and --force (without --check)"
    )
    sys.exit(1)


@main.command(name="format")
@click.argument("template", type=click.Path(path_type=Path))
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Override a parameter (as in build).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the rendered YAML here (default: stdout).")
@click.option("--allow-new-params", is_flag=True, help="Let -p add keys the template does not define (to DEFAULT).")
@click.option("--force", is_flag=True, help="Replace an existing -o file (never the template itself).")
@verbosity
def format_(template: Path, params: tuple[str, ...], output: Path | None, allow_new_params: bool, force: bool) -> None:
    """Render TEMPLATE's Jinja blocks with its parameters and print the resulting YAML.

    \b
    Example:
      scmc format cfg/models/ConvNeXtV2.yaml -p backbone=femto -o femto.yaml
    """
    import io

    from ruamel.yaml import YAML

    from scmc.build import guard_file, write_text_atomic
    from scmc.diagnostics import Diagnostics
    from scmc.load import (
        LDict,
        Parameters,
        apply_override,
        build_budget,
        check_group_overrides,
        expand,
        parameter_blocks,
        parse_override,
        plain,
        read_template,
        report_unused_overrides,
    )

    try:
        if output is not None:
            guard_file(output, force, [template])
        source = read_template(template)
        diags = Diagnostics()
        overrides = [parse_override(p) for p in params]
        blocks = parameter_blocks(source.data)
        used = [apply_override(blocks, o, allow_new_params) for o in overrides]
        report_unused_overrides(overrides, used, [source], diags)
        diags.raise_if_any()
        parameters = Parameters.from_raw(source.data.get("PARAMETERS"), source.data.span, diags)
        diags.raise_if_any()
        body = LDict({k: v for k, v in source.data.items() if k != "PARAMETERS"}, span=source.data.span)
        body.key_spans = dict(source.data.key_spans)
        with build_budget() as budget:
            rendered = plain(expand(body, parameters))
        check_group_overrides(overrides, budget.groups_used, [source], diags)
        diags.raise_if_any()
    except CompileError as exc:
        _echo_err(exc.render().replace("nothing was written", "nothing was rendered"))
        sys.exit(1)
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    buffer = io.StringIO()
    yaml.dump(rendered, buffer)
    if output is None:
        click.echo(buffer.getvalue(), nl=False)
        return
    try:
        guard_file(output, force, [template])  # again: it may have appeared while rendering
        write_text_atomic(output, buffer.getvalue())
    except CompileError as exc:
        _echo_err(exc.render())
        sys.exit(1)


@main.command(name="export")
@click.argument("package_dir", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="A checkpoint of the generated train.py (last.pt, best.pt) or a bare state_dict.",
)
@click.option("--ema", "weights", flag_value="ema", help="Export the EMA weights; an error if the checkpoint has none.")
@click.option("--raw", "weights", flag_value="raw", help="Export the trained weights even when EMA weights exist.")
@click.option(
    "--format",
    "formats",
    multiple=True,
    metavar="onnx|torchscript|pt2|aoti",
    help="What to write (repeatable, or comma-separated). Default: onnx. aoti compiles an AOTInductor "
    "package (slow: minutes; needs a C++ compiler) from the torch.export program; model.pt2 is kept only with pt2.",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Output folder (default: <checkpoint folder>/export)."
)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: 20, the dynamo exporter's own).")
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension to 1 (default: dynamic).")
@click.option("--dynamic-spatial", is_flag=True, help="Also make height and width dynamic (ONNX, pt2).")
@click.option(
    "-s",
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=C,H,W",
    help="Input shape without batch to trace and verify at (default: the training image size "
    "recorded in the checkpoint, else the manifest's).",
)
@click.option("--labels", type=click.Path(path_type=Path), help="Class labels, one per line, for the ONNX metadata.")
@click.option("--allow-mismatch", is_flag=True, help="Exit 0 even when an export does not match eager PyTorch.")
@click.option("--verify-only", is_flag=True, help="Re-verify the files already in the output folder; export nothing.")
@click.option("--no-aoti", is_flag=True, help="Drop aoti from --format (pt2 no longer implies it).")
@click.option(
    "--aoti-timeout",
    type=float,
    default=900.0,
    show_default=True,
    help="Seconds the AOTInductor compilation may take before it is skipped.",
)
@click.option(
    "--latency-rounds",
    type=click.IntRange(min=0),
    default=15,
    show_default=True,
    help="Interleaved timing rounds per batch size (0: no latency figures).",
)
@click.option(
    "--trust-artifact",
    is_flag=True,
    help="Load exported .pt2/TorchScript/AOTInductor files without checking that they hold only data "
    "(only for files you made: loading one can run code it carries).",
)
@click.option(
    "--max-input-elements",
    type=click.IntRange(min=1),
    default=None,
    help="Values one input sample may hold (default 33554432, e.g. 3x3344x3344).",
)
@verbosity
def export(
    package_dir: Path,
    checkpoint: Path,
    weights: str | None,
    formats: tuple[str, ...],
    output: Path | None,
    opset: int | None,
    static_batch: bool,
    dynamic_spatial: bool,
    shapes: tuple[str, ...],
    labels: Path | None,
    allow_mismatch: bool,
    verify_only: bool,
    no_aoti: bool,
    aoti_timeout: float,
    latency_rounds: int,
    trust_artifact: bool,
    max_input_elements: int | None,
    quiet: bool,
) -> None:
    """Export PACKAGE_DIR (built by scmc build) with CHECKPOINT's weights, verified against eager PyTorch.

    \b
    Example:
      scmc export artifacts/convnextv2_femto --checkpoint runs/demo/checkpoints/best.pt --format onnx,pt2
    """
    from scmc.export import DEFAULT_OPSET, ExportRequest, run_export

    request = ExportRequest(
        package_dir=package_dir,
        checkpoint=checkpoint,
        formats=tuple(f.strip() for spec in (formats or ("onnx",)) for f in spec.split(",") if f.strip()),
        weights=weights or "auto",
        output=output,
        opset=DEFAULT_OPSET if opset is None else opset,
        static_batch=static_batch,
        dynamic_spatial=dynamic_spatial,
        shapes={name: spec["shape"] for name, spec in (_shape(s) for s in shapes)},
        allow_mismatch=allow_mismatch,
        aoti=not no_aoti,
        aoti_timeout=aoti_timeout,
        labels=labels,
        verify_only=verify_only,
        latency_rounds=latency_rounds,
        trust_artifact=trust_artifact,
        max_input_elements=max_input_elements or 0,
    )
    try:
        status = run_export(request, echo=click.echo, echo_err=_echo_err, quiet=quiet)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # user errors are diagnostics; anything else is a bug in scmc
        _echo_err(
            f"internal error in scmc export: {type(exc).__name__}: {exc}\nThis is a bug in scmc {scmc.__version__}; "
            f"please report it with this output.\n--- traceback ---\n{traceback.format_exc()}"
        )
        status = 70
    sys.exit(status)


@main.command(name="wheel")
@click.argument("package_dir", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=Path("dist"), show_default=True, help="Folder of wheels."
)
@click.option(
    "--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True, help="Seconds each pip run may take."
)
@click.option(
    "--max-size-mib",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Largest package (MiB of files) copied into a wheel.",
)
@verbosity
def wheel(package_dir: Path, output: Path, timeout: float, max_size_mib: int, quiet: bool) -> None:
    """Write PACKAGE_DIR's wheel and the matching scmc-runtime wheel into one folder, and print
    the pip command that installs both on any machine.

    \b
    Example:
      scmc wheel artifacts/convnextv2_femto -o dist
    """
    from scmc.load import display_path
    from scmc.wheel import build_wheels

    result = _compile_or_exit(lambda: build_wheels(package_dir, output, timeout, max_size_mib * 2**20))
    if not quiet:
        for path in (result.package, result.runtime):
            click.echo(f"wrote {display_path(path)}")
    click.echo(f"install with: {result.install_command()}")


# ----------------------------------------------------------------------------- structcast-model spellings


@main.group(name="torch")
def torch_group() -> None:
    """structcast-model 1.2.0 spellings: `scmc torch create model|backward` (one generated file).

    \b
    Example:
      scmc torch create model cfg/models/ConvNeXtV2.yaml -p backbone=femto -o convnextv2.py
    """


@torch_group.group(name="create")
def torch_create() -> None:
    """Compile one template into one Python file, as `scm torch create` did (`scmc build` makes a package).

    \b
    Example:
      scmc torch create backward cfg/backwards/ConvNeXtV2.yaml -o backward.py
    """


@torch_create.command(name="model")
@click.argument("template", type=click.Path(path_type=Path))
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a parameter: 'DEFAULT: {key: value}', key=value or group.key=value. Repeatable.",
)
@click.option("-c", "--classname", default="Model", show_default=True, help="Name of the generated class.")
@click.option(
    "--structured-output/--no-structured-output",
    default=None,
    help="Return a dict {output: value} (the default, as `scm torch create model`), or a value or tuple. "
    "With --sublayer the layer's own STRUCTURED_OUTPUT decides unless one is given.",
)
@click.option("-s", "--sublayer", help="Compile the named user layer (e.g. Backbone) instead of the root.")
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=C,H,W",
    help="Input shape without batch, for templates without INPUT_SHAPES (here -s means --sublayer).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="The Python file to write (default: <classname>.py in snake_case).",
)
@click.option("--force", is_flag=True, help="Replace an existing output file (never the template itself).")
@click.option("--allow-new-params", is_flag=True, help="Let -p add keys the template does not define (to DEFAULT).")
@click.option(
    "--allow-module", "allow_modules", multiple=True, metavar="MODULE", help="Widen the address allow-list. Repeatable."
)
@verbosity
def torch_create_model(
    template: Path,
    params: tuple[str, ...],
    classname: str,
    structured_output: bool | None,
    sublayer: str | None,
    shapes: tuple[str, ...],
    output: Path | None,
    force: bool,
    allow_new_params: bool,
    allow_modules: tuple[str, ...],
    quiet: bool,
) -> None:
    """Write the model class of TEMPLATE (a layer graph) to one Python file.

    \b
    Example:
      scmc torch create model cfg/models/ConvNeXtV2.yaml -p backbone=femto -s Backbone -o backbone.py
    """
    from scmc.build import BuildRequest, Part

    request = BuildRequest(
        parts=[Part("model", template, classname)],
        params=list(params),
        shapes=dict(_shape(s) for s in shapes),
        structured=compat_structured(structured_output, sublayer),
        sublayer=sublayer,
        allow_new_params=allow_new_params,
        allow_modules=tuple(allow_modules),
    )
    run_create(request, output, force, quiet)


def compat_structured(flag: bool | None, sublayer: str | None) -> bool | None:
    """structcast-model's `create model --structured-output` defaults to true for the root class
    of any layer template (model, loss, metric, one step alike); with --sublayer it is ignored and
    the layer's own STRUCTURED_OUTPUT decides. An explicit flag applies here to either."""
    if flag is None and not sublayer:
        return True
    return flag


@torch_create.command(name="backward")
@click.argument("template", type=click.Path(path_type=Path))
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Override a parameter (as in model).")
@click.option("-c", "--classname", default="Backward", show_default=True, help="Name of the generated class.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="The Python file to write (default: <classname>.py in snake_case).",
)
@click.option("--force", is_flag=True, help="Replace an existing output file (never the template itself).")
@click.option("--allow-new-params", is_flag=True, help="Let -p add keys the template does not define (to DEFAULT).")
@click.option(
    "--allow-module", "allow_modules", multiple=True, metavar="MODULE", help="Widen the address allow-list. Repeatable."
)
@verbosity
def torch_create_backward(
    template: Path,
    params: tuple[str, ...],
    classname: str,
    output: Path | None,
    force: bool,
    allow_new_params: bool,
    allow_modules: tuple[str, ...],
    quiet: bool,
) -> None:
    """Write the optimizer/step class of TEMPLATE (a backward template) to one Python file.

    \b
    Example:
      scmc torch create backward cfg/backwards/ConvNeXtV2.yaml -o backward.py
    """
    from scmc.build import BuildRequest, Part

    request = BuildRequest(
        parts=[Part("backward", template, classname)],
        params=list(params),
        allow_new_params=allow_new_params,
        allow_modules=tuple(allow_modules),
    )
    run_create(request, output, force, quiet)


def run_create(request: Any, output: Path | None, force: bool, quiet: bool) -> None:
    from scmc.build import create_module
    from scmc.load import display_path

    part, destination = _compile_or_exit(lambda: create_module(request, output, force), request.parts[0].path)
    if not quiet:
        click.echo(
            f"wrote {part.program.root if part.program is not None else part.backward.classname} "
            f"-> {display_path(destination)}" + (f"  ({part.param_count:,} parameters)" if part.program else "")
        )


_INSPECT_TARGET = click.argument("target", type=click.Path(path_type=Path), metavar="TEMPLATE-or-PACKAGE")


def _inspect_or_exit(target: Path, params: tuple[str, ...], shapes: tuple[str, ...], **options: Any) -> Any:
    from scmc.inspection import InspectError, inspect_target

    def stage() -> Any:
        try:
            return inspect_target(target, params=list(params), shapes=dict(_shape(s) for s in shapes), **options)
        except InspectError as exc:
            _echo_err(f"error: {exc}")
            sys.exit(1)

    return _compile_or_exit(stage)


@main.command(name="inspect")
@_INSPECT_TARGET
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Override a parameter (as in build).")
@click.option("-s", "--shape", "shapes", multiple=True, metavar="NAME=C,H,W[:DTYPE]", help="Input shape without batch.")
@click.option("--depth", default=2, show_default=True, help="Levels of nested layers to list (0: the model only).")
@click.option("--batch-size", type=int, help="Also estimate training memory at this batch size.")
@click.option("--latency", is_flag=True, help="Also time a real CPU forward (at --batch-size, default 1).")
@click.option("--threads", default=1, show_default=True, help="CPU threads for --latency.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@verbosity
def inspect_(
    target: Path,
    params: tuple[str, ...],
    shapes: tuple[str, ...],
    depth: int,
    batch_size: int | None,
    latency: bool,
    threads: int,
    as_json: bool,
) -> None:
    """Layers, output shapes, parameters and FLOPs of a template or a built package; writes nothing.

    \b
    Example:
      scmc inspect cfg/models/ConvNeXtV2.yaml -p backbone=femto --batch-size 32
    """
    import json

    from scmc.inspection import render

    report = _inspect_or_exit(
        target, params, shapes, depth=depth, batch_size=batch_size, latency=latency, threads=threads
    )
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else render(report))


@main.command(name="diff")
@click.argument("left", type=click.Path(path_type=Path), metavar="A")
@click.argument("right", type=click.Path(path_type=Path), metavar="B", required=False)
@click.option("--pa", "params_a", multiple=True, metavar="KEY=VALUE", help="A parameter of side A.")
@click.option("--pb", "params_b", multiple=True, metavar="KEY=VALUE", help="A parameter of side B.")
@click.option("-s", "--shape", "shapes", multiple=True, metavar="NAME=C,H,W[:DTYPE]", help="Input shape (both sides).")
@click.option("--depth", default=2, show_default=True, help="Levels of nested layers to compare.")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
@verbosity
def diff_(
    left: Path,
    right: Path | None,
    params_a: tuple[str, ...],
    params_b: tuple[str, ...],
    shapes: tuple[str, ...],
    depth: int,
    as_json: bool,
) -> None:
    """Differences between two templates, two parameter sets of one template (B omitted), or two packages.

    \b
    Examples:
      scmc diff cfg/models/ConvNeXtV2.yaml --pa backbone=atto --pb backbone=femto
      scmc diff artifacts/convnextv2_atto artifacts/convnextv2_femto
    """
    import json

    from scmc.inspection import diff, render_diff

    a = _inspect_or_exit(left, params_a, shapes, depth=depth)
    b = _inspect_or_exit(right or left, params_b, shapes, depth=depth)
    result = diff(a, b)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else render_diff(result))


@main.command(name="graph")
@_INSPECT_TARGET
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Override a parameter (as in build).")
@click.option("-s", "--shape", "shapes", multiple=True, metavar="NAME=C,H,W[:DTYPE]", help="Input shape without batch.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="The picture to write: .svg, .png or .pdf (drawn by Graphviz's `dot`), or .dot (needs no Graphviz).",
)
@click.option("--expand", is_flag=True, help="Draw every block of a repeated run (default: one `Block xN` node).")
@click.option("--depth", type=int, default=None, help="Levels of nested user layers drawn as clusters (default: all).")
@click.option("--force", is_flag=True, help="Replace an existing -o file (never an input).")
@click.option(
    "--allow-module", "allow_modules", multiple=True, metavar="MODULE", help="Widen the address allow-list. Repeatable."
)
@verbosity
def graph_(
    target: Path,
    params: tuple[str, ...],
    shapes: tuple[str, ...],
    output: Path,
    expand: bool,
    depth: int | None,
    force: bool,
    allow_modules: tuple[str, ...],
) -> None:
    """Draw the layer graph of a template or a built package: user layers as clusters, edges
    labelled with tensor shapes, repeated blocks collapsed.

    \b
    Examples:
      scmc graph cfg/models/ConvNeXtV2.yaml -p backbone=femto -o graph.svg
      scmc graph artifacts/convnextv2_femto -o graph.dot --expand
    """
    from scmc.graph import GraphError, draw
    from scmc.inspection import InspectError
    from scmc.load import display_path

    def stage() -> Any:
        try:
            return draw(
                target,
                output,
                params=list(params),
                shapes=dict(_shape(s) for s in shapes),
                allow_modules=tuple(allow_modules),
                expand=expand,
                depth=depth,
                force=force,
            )
        except GraphError as exc:
            _echo_err(exc.render())
            sys.exit(1)
        except InspectError as exc:
            _echo_err(f"error: {exc}")
            sys.exit(1)

    drawn = _compile_or_exit(stage, target)
    if VERBOSITY >= 0:
        click.echo(
            f"wrote {display_path(output)}  ({len(drawn.units)} nodes, {len(drawn.clusters)} clusters, "
            f"{len(drawn.edges)} edges)"
        )
    if VERBOSITY > 0:
        for unit in drawn.units.values():
            if unit.kind == "repeat":
                click.echo("  collapsed " + unit.label.replace("\n", ", "))


def _compile_or_exit(stage: Any, template: Path | None = None) -> Any:
    """Run a compiler stage; user errors exit 1, bugs in scmc exit 70 with the IR and traceback."""
    from scmc.build import InternalError

    try:
        return stage()
    except CompileError as exc:
        _echo_err(exc.render())
        sys.exit(1)
    except (RecursionError, MemoryError) as exc:  # last resort: a stage without its own bound met a huge input
        from scmc.diagnostics import fail
        from scmc.load import display_path

        what = "recursed too deeply" if isinstance(exc, RecursionError) else "ran out of memory"
        where = display_path(template) if template is not None else "the templates"
        error = fail(
            "E0008",
            f"compiling {where} {what}",
            hint="the template (or a -p value) is nested too deeply or builds values too large; simplify it",
        )
        _echo_err(error.render())
        sys.exit(1)
    except InternalError as exc:
        _echo_err(
            f"internal compiler error: {exc}\nThis is a bug in scmc {scmc.__version__}; please report it with this output.\n"
            f"--- IR ---\n{exc.ir_dump}--- traceback ---\n{traceback.format_exc()}"
        )
        sys.exit(70)
    except KeyboardInterrupt:
        _echo_err("interrupted; nothing was written")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # any other exception is a bug in scmc, not a user mistake
        _echo_err(
            f"internal compiler error: {type(exc).__name__}: {exc}\nThis is a bug in scmc {scmc.__version__}; "
            f"please report it with this output.\n--- traceback ---\n{traceback.format_exc()}"
        )
        sys.exit(70)


def run_build(request: Any, quiet: bool = False) -> None:
    from scmc.build import build as do_build
    from scmc.load import display_path

    start = time.perf_counter()
    plan, destination = _compile_or_exit(lambda: do_build(request), request.parts[0].path)
    if plan.warnings:  # shown even with --quiet: they are about what the build trusted or how the parts fit
        from scmc.diagnostics import render_warnings

        _echo_err(render_warnings(plan.warnings))
    if not quiet:
        elapsed = time.perf_counter() - start
        how = "unchanged inputs, from the build cache" if plan.cached else f"{len(plan.files)} files"
        click.echo(
            f"built {plan.name} -> {display_path(destination)}  "
            f"({plan.param_count:,} parameters, {how}, {elapsed:.1f} s)"
        )
        if VERBOSITY > 0:
            for rel, data in sorted(plan.files.items()):
                click.echo(f"  {rel}  ({len(data):,} bytes)")


def run(argv: list[str] | None = None) -> None:
    """The console entry point (`scmc`, `python -m scmc`): run the command, then leave at once.

    Tearing down an interpreter that has imported torch, timm and onnx (garbage-collecting
    every module's objects) costs 2-3 s of CPU on a 2-core machine, longer than compiling
    femto. Everything a command writes is closed and renamed into place before it returns,
    so after flushing the standard streams and the logging handlers nothing is left to do:
    ``os._exit`` skips the teardown and keeps the exit status ``sys.exit`` would have given.
    Tests call ``main`` through click's runner and are unaffected.
    """
    import logging
    import os

    try:
        main(args=argv, prog_name="scmc")
        status = 0
    except SystemExit as exc:
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code
        else:  # sys.exit("message") prints the message and exits 1
            print(exc.code, file=sys.stderr)
            status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`scmc ... | head`) has nothing left to flush into
            pass
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    run()
