"""``scmc format``: a template's Jinja blocks rendered with its parameters, printed as YAML."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from scmc.cli.app import main
from scmc.cli.conventions import _echo_err, verbosity
from scmc.diagnostics import CompileError


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
