"""The TorchScript format: ``torch.jit.script``, ``torch.jit.trace`` as a reported fallback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from scmc.export.common import _err, _quiet, _short
from scmc.export.inputs import TRACE_BATCH, Inputs
from scmc.export.runner import Format, Runner, torch_runner


def export_torchscript(model: Any, inputs: Inputs, dest: Path) -> dict[str, Any]:
    import torch

    start = time.perf_counter()
    notes = []
    try:
        with _quiet():
            module = torch.jit.script(model)
        path = "torch.jit.script"
    except Exception as exc:
        notes.append(
            f"torch.jit.script failed ({_short(exc, 300)}); fell back to torch.jit.trace: "
            "control flow and shapes seen at batch 2 are baked into the graph"
        )
        try:
            with _quiet():
                module = torch.jit.trace(model, tuple(inputs.make(TRACE_BATCH, 0)), strict=False, check_trace=False)
        except Exception as exc2:
            raise _err(
                "E1108",
                f"TorchScript export failed: torch.jit.script: {_short(exc, 300)}; "
                f"torch.jit.trace: {_short(exc2, 300)}",
            ) from None
        path = "torch.jit.trace (fallback)"
    try:
        with _quiet():
            torch.jit.save(module, str(dest))
    except Exception as exc:
        raise _err("E1111", f"cannot write `{dest}`: {_short(exc)}", dest) from None
    return {"seconds": time.perf_counter() - start, "path_taken": path, "notes": notes, "files": [dest.name]}


def load_torchscript(path: Path, input_names: list[str], output_names: list[str]) -> Runner:
    import torch

    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return torch_runner("torchscript", module, output_names, True, True, None)


TORCHSCRIPT = Format(
    "torchscript",
    "model.pt",
    export=lambda job, dest: export_torchscript(job.model, job.inputs, dest),
    load=load_torchscript,
    title="TorchScript module",
)
