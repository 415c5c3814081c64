"""``scmc build``: flags -> a :class:`~scmc.build.BuildRequest` -> a package, ``--check`` or ``--watch``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from scmc.cli import conventions
from scmc.cli.app import main
from scmc.cli.conventions import _compile_or_exit, _echo_err, _shape, verbosity
from scmc.diagnostics import CompileError


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

        sys.exit(
            run_watch(request, echo=click.echo, echo_err=_echo_err, quiet=quiet, verbose=conventions.VERBOSITY > 0)
        )
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
        if conventions.VERBOSITY > 0:
            for rel, data in sorted(plan.files.items()):
                click.echo(f"  {rel}  ({len(data):,} bytes)")
