"""``scmc export`` and ``scmc wheel``: what is done with a built package."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

import scmc
from scmc.cli.app import main
from scmc.cli.conventions import _compile_or_exit, _echo_err, _shape, verbosity


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
