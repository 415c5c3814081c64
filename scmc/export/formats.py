"""The formats: reading an exported artifact back from disk (checked first) as a :class:`Runner`."""

from __future__ import annotations

import json
from pathlib import Path

from scmc.diagnostics import CompileError
from scmc.export.common import _err, _quiet, _short
from scmc.export.onnx import onnx_runner
from scmc.export.package import _require_path
from scmc.export.pt2 import _exported_dynamic_dims
from scmc.export.runner import Runner, torch_runner


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
    import torch

    _require_path(path, "E1112", f"the exported {fmt} file", directory=False, hint="export again to rewrite it")
    if check:
        check_before_loading(fmt, path)
    try:
        if fmt == "onnx":
            return onnx_runner(path, input_names)
        if fmt == "torchscript":
            with _quiet():
                module = torch.jit.load(str(path), map_location="cpu")
            module.eval()
            return torch_runner(fmt, module, output_names, True, True, None)
        if fmt == "pt2":
            ep = torch.export.load(str(path))
            batch, spatial, size = _exported_dynamic_dims(ep)
            return torch_runner(fmt, ep.module(), output_names, batch, spatial, size)
        if fmt == "aoti":
            import torch._inductor

            with _quiet():  # "No CUDA runtime is found" on CPU-only machines
                compiled = torch._inductor.aoti_load_package(str(path))
            meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
            return torch_runner(
                fmt,
                compiled,
                output_names,
                meta.get("dynamic_batch", True),
                meta.get("dynamic_spatial", False),
                meta.get("static_batch_size"),
            )
    except CompileError:
        raise
    except Exception as exc:
        raise _err(
            "E1112",
            f"cannot load the exported {fmt} file `{path}`: {_short(exc)}",
            path,
            "export again (without --verify-only) to rewrite it",
        ) from None
    raise ValueError(fmt)
