"""``scmc inspect``, ``scmc diff`` and ``scmc graph``: templates and built packages looked at, nothing built."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from scmc.cli import conventions
from scmc.cli.app import main
from scmc.cli.conventions import _compile_or_exit, _echo_err, _shape, verbosity

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
    if conventions.VERBOSITY >= 0:
        click.echo(
            f"wrote {display_path(output)}  ({len(drawn.units)} nodes, {len(drawn.clusters)} clusters, "
            f"{len(drawn.edges)} edges)"
        )
    if conventions.VERBOSITY > 0:
        for unit in drawn.units.values():
            if unit.kind == "repeat":
                click.echo("  collapsed " + unit.label.replace("\n", ", "))
