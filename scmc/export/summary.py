"""The human summary of an export, the errors as text, and the ``scmc export`` entry point."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from scmc.diagnostics import CompileError, Diagnostic
from scmc.export.common import THREADS
from scmc.export.pipeline import export_package
from scmc.export.report import Artifact, ExportOutcome
from scmc.export.request import ExportRequest


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _timing_line(artifact: Artifact) -> str:
    """``onnx: exported in 3.2 s, verified in 1.1 s`` (torch.export's shared trace is not in the export time)."""
    exported = artifact.export_seconds
    done = "not exported again" if exported is None else f"exported in {exported:.1f} s"
    verified = artifact.verify_seconds
    return f"{artifact.format}: {done}" + (f", verified in {verified:.1f} s" if verified is not None else "")


def _spread(table: dict[str, Any], name: str) -> str:
    return f"{table['median_ms'][name]:.2f} [{table['min_ms'][name]:.2f}-{table['max_ms'][name]:.2f}]"


def summary(outcome: ExportOutcome) -> str:
    r = outcome.report
    ck = r.checkpoint
    lines = [
        f"exported {r.package} ({ck.get('weights')} weights of {ck['path']}) -> {Path(outcome.report_path).parent}"
    ]
    for a in r.artifacts:
        batch = "dynamic batch" if a.dynamic_batch else f"batch {a.static_batch_size}"
        spatial = ", dynamic H/W" if a.dynamic_spatial else ""
        opset = f", opset {a.opset}" if a.opset is not None else ""
        lines.append(
            f"  {a.format:<11} {Path(a.path).name:<15} {_size(a.bytes):>9}  {a.path_taken}{opset}, {batch}{spatial}"
        )
        cases = a.verification["cases"]
        shapes = "; ".join(",".join(map(str, next(iter(c["input_shapes"].values())))) for c in cases)
        for name, w in a.worst.items():
            lines.append(
                f"      {name}: max abs {w['max_abs']:.2g}, max rel {w['max_rel']:.2g} "
                f"(tolerance atol {w['atol']:g}, rtol {w['rtol']:g}) over [{shapes}]"
            )
        lines.append(f"      parity: {'ok' if a.passed else 'MISMATCH'}")
        lines.append(f"      {_timing_line(a)}")
    if r.timings.get("torch_export") is not None:
        lines.append(f"  torch.export: traced in {r.timings['torch_export']:.1f} s (shared by onnx, pt2 and aoti)")
    latency = r.latency
    if latency:
        rounds = next(iter(latency.values()))["rounds"]
        lines.append(
            f"  latency, ms: median [min-max] of {rounds} interleaved rounds, {THREADS} threads; x eager's median"
        )
        for batch_size, t in latency.items():
            cells = [f"eager {_spread(t, 'eager')}"] + [
                f"{k} {_spread(t, k)} {t['ratio_to_eager'][k]:.2f}x" for k in t["median_ms"] if k != "eager"
            ]
            lines.append(f"    latency batch {batch_size}: " + ", ".join(cells))
    for s in r.skipped:
        lines.append(f"  {s.format:<11} skipped: {s.reason}")
    for n in r.notes:
        lines.append(f"note: {n}")
    for warning in r.warnings:
        if not warning.startswith("AOTInductor package skipped"):
            lines.append(f"warning: {warning}")
    lines.append(f"report: {outcome.report_path}  ({r.seconds:.1f} s)")
    return "\n".join(lines)


def render_errors(diagnostics: Sequence[Diagnostic], wrote_report: Path | None = None) -> str:
    body = "\n\n".join(d.render() for d in diagnostics)
    count = len(diagnostics)
    tail = f"; the report is in {wrote_report}" if wrote_report else "; nothing was exported"
    return f"{body}\n\n{count} error{'s' if count != 1 else ''}{tail}."


def run_export(
    request: ExportRequest,
    echo: Callable[[str], None] = print,
    echo_err: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> int:
    """The ``scmc export`` command: print a summary (or the errors) and return the exit status."""
    echo_err = echo_err or (lambda text: print(text, file=sys.stderr))
    try:
        outcome = export_package(request, progress=(lambda m: None) if quiet else (lambda m: echo_err(m)))
    except CompileError as exc:
        echo_err(render_errors(exc.diagnostics))
        return 1
    if not quiet or outcome.errors:
        echo(summary(outcome))
    if outcome.errors:
        if request.allow_mismatch:
            echo_err(
                "\n\n".join(d.render().replace("error[", "warning[", 1) for d in outcome.errors)
                + "\n(--allow-mismatch: exit status 0)"
            )
            return 0
        echo_err(render_errors(outcome.errors, outcome.report_path))
        return 1
    return 0
