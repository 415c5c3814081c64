"""The structcast-model spellings: ``scmc torch create model|backward`` (docs/migration.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from scmc.cli.app import main
from scmc.cli.conventions import _compile_or_exit, _shape, verbosity


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


def output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every `scmc torch create` command shares: where to write, and what to allow."""
    options = [
        click.option(
            "-o",
            "--output",
            type=click.Path(path_type=Path),
            help="The Python file to write (default: <classname>.py in snake_case).",
        ),
        click.option("--force", is_flag=True, help="Replace an existing output file (never the template itself)."),
        click.option(
            "--allow-new-params", is_flag=True, help="Let -p add keys the template does not define (to DEFAULT)."
        ),
        click.option(
            "--allow-module",
            "allow_modules",
            multiple=True,
            metavar="MODULE",
            help="Widen the address allow-list. Repeatable.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


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
@output_options
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
@output_options
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
