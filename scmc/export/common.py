"""What every part of ``scmc export`` shares: the report's name, opsets, thread count, errors, quiet torch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Iterator

from scmc.diagnostics import CompileError, Diagnostic, Span

REPORT_NAME = "export_report.json"

# torch.onnx's dynamo exporter emits opset 20 natively (no version conversion pass), and
# ONNX Runtime has run every opset-20 operator since 1.17; 18 is the oldest it can target.
DEFAULT_OPSET = 20
MIN_OPSET = 18

THREADS = 2

INSTALL_HINT = "pip install onnx onnxruntime onnxscript (from a checkout: pip install './[export]')"


def _err(code: str, message: str, path: Path | str | None = None, hint: str = "") -> CompileError:
    span = Span(str(path)) if path is not None else None
    return CompileError([Diagnostic(code, message, span, hint)])


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(exc).__name__}: {first}" if not first.startswith(type(exc).__name__) else first


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.export/torch.onnx progress prints and warnings (they are not the user's problem)."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch._dynamo", "torch.utils.cpp_extension")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
