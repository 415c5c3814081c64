"""The formats, written once: the registry of :class:`~scmc.export.runner.Format` objects, and
reading any exported artifact back from disk (checked first) as a :class:`~scmc.export.runner.Runner`."""

from __future__ import annotations

from pathlib import Path

from scmc.diagnostics import CompileError
from scmc.export.aoti import AOTI
from scmc.export.common import _err, _short
from scmc.export.onnx import ONNX
from scmc.export.package import _require_path
from scmc.export.pt2 import PT2
from scmc.export.runner import Format, Runner
from scmc.export.torchscript import TORCHSCRIPT

REGISTRY: tuple[Format, ...] = (ONNX, TORCHSCRIPT, PT2, AOTI)  # the order --format lists them in
BY_NAME: dict[str, Format] = {f.name: f for f in REGISTRY}
FORMATS = tuple(BY_NAME)
FILE_NAMES = {f.name: f.file_name for f in REGISTRY}


def check_before_loading(fmt: str, path: Path) -> None:
    """E1113 unless loading the artifact at PATH reads data only (see :mod:`scmc.artifacts`)."""
    from scmc.artifacts import ArtifactRefused, check_artifact

    try:
        check_artifact(fmt, path)
    except ArtifactRefused as exc:
        where = f" (member `{exc.member}`)" if exc.member else ""
        raise _err(
            "E1113",
            f"refusing to load `{path}`{where}: {exc.reason}",
            path,
            "scmc loads exported files only when they hold nothing but data; export again to rewrite it, "
            "or pass --trust-artifact if you made this file yourself and mean to run what it holds",
        ) from None


def load_runner(fmt: str, path: Path, input_names: list[str], output_names: list[str], check: bool = True) -> Runner:
    """Read an artifact back from disk (what a user would load) as a Runner.

    With ``check`` (the default) the file is first checked by :func:`check_before_loading`:
    ``--verify-only`` may be pointed at files someone else wrote.
    """
    spec = BY_NAME.get(fmt)
    if spec is None:
        raise ValueError(fmt)
    _require_path(path, "E1112", f"the exported {fmt} file", directory=False, hint="export again to rewrite it")
    if check:
        check_before_loading(fmt, path)
    try:
        return spec.load(path, input_names, output_names)
    except CompileError:
        raise
    except Exception as exc:
        raise _err(
            "E1112",
            f"cannot load the exported {fmt} file `{path}`: {_short(exc)}",
            path,
            "export again (without --verify-only) to rewrite it",
        ) from None
