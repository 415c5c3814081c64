"""``torch.export``: the shared trace (an ExportedProgram) and the ``.pt2`` format."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from scmc.export.common import _err, _quiet, _short
from scmc.export.inputs import TRACE_BATCH, Inputs
from scmc.export.runner import Format, Runner, torch_runner


def _exported_dynamic_dims(ep: Any) -> tuple[bool, bool, int | None]:
    """(batch dynamic, spatial dynamic, static batch size) of an ExportedProgram's first user input."""

    sig = ep.graph_signature
    user_inputs = set(sig.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            shape = node.meta["val"].shape
            dyn = [not isinstance(d, int) for d in shape]
            return dyn[0], any(dyn[2:]), None if dyn[0] else int(shape[0])
    return False, False, None


def torch_export(model: Any, inputs: Inputs, static_batch: bool, dynamic_spatial: bool) -> tuple[Any, dict[str, Any]]:
    import torch

    batch = 1 if static_batch else TRACE_BATCH
    # With dynamic H/W, trace at the larger second size: at the smallest sizes a late feature map
    # is 1x1, and torch.export specializes sizes of 1, which would fix the shapes it derives.
    spatial = inputs.second_spatial() if dynamic_spatial else None
    example = inputs.make(batch, seed=0, spatial=spatial)
    dynamic_shapes = None
    if not static_batch or dynamic_spatial:
        batch_dim = torch.export.Dim("batch", min=1)
        dynamic_shapes = {}
        for name in inputs.names:
            spec: dict[int, Any] = {}
            if not static_batch:
                spec[0] = batch_dim
            if dynamic_spatial:
                for axis in range(2, len(inputs.shapes[name]) + 1):
                    spec[axis] = torch.export.Dim.AUTO
            dynamic_shapes[name] = spec
    start = time.perf_counter()
    try:
        with _quiet():
            ep = torch.export.export(model, tuple(example), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise _err(
            "E1108",
            f"torch.export could not trace the model: {_short(exc, 800)}",
            None,
            "a layer's forward does something torch.export cannot capture (data-dependent control flow, "
            "Python side effects); --static-batch helps when the batch size is what it specializes on",
        ) from None
    dyn_batch, dyn_spatial, size = _exported_dynamic_dims(ep)
    meta = {
        "seconds": time.perf_counter() - start,
        "dynamic_batch": dyn_batch,
        "dynamic_spatial": dyn_spatial,
        "static_batch_size": size,
        "trace_shapes": {n: list(t.shape) for n, t in zip(inputs.names, example, strict=False)},
    }
    return ep, meta


def export_pt2(ep: Any, dest: Path) -> dict[str, Any]:
    import torch

    start = time.perf_counter()
    try:
        torch.export.save(ep, str(dest))
    except Exception as exc:
        raise _err("E1111", f"cannot write `{dest}`: {_short(exc)}", dest) from None
    return {
        "seconds": time.perf_counter() - start,
        "path_taken": "torch.export.export + torch.export.save",
        "files": [dest.name],
    }


def load_pt2(path: Path, input_names: list[str], output_names: list[str]) -> Runner:
    import torch

    ep = torch.export.load(str(path))
    batch, spatial, size = _exported_dynamic_dims(ep)
    return torch_runner("pt2", ep.module(), output_names, batch, spatial, size)


PT2 = Format(
    "pt2", "model.pt2", export=lambda job, dest: export_pt2(job.ep, dest), load=load_pt2, traced=True, title="pt2"
)
