"""The ONNX format: ``torch.onnx.export(dynamo=True)`` from the shared trace, and an ONNX Runtime runner."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from scmc.export.common import THREADS, _err, _quiet, _short
from scmc.export.compare import _to_numpy
from scmc.export.inputs import Inputs
from scmc.export.runner import Format, FormatJob, Runner

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph


def onnx_runner(path: Path, input_names: list[str]) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures are reported by the verification, not ORT's log
    # Idle ORT threads would otherwise spin for a while after each run, taking the cores from
    # the eager PyTorch call timed next: off, so the latency comparison is fair to both.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if sorted(names) != sorted(input_names):
        raise _err("E1112", f"`{path}` takes inputs {names}, the package takes {input_names}", path)
    outputs = [o.name for o in session.get_outputs()]
    first = session.get_inputs()[0].shape
    dynamic_batch = not isinstance(first[0], int)
    dynamic_spatial = any(not isinstance(d, int) for d in first[2:])

    def prepare(tensors: list[Any]) -> dict[str, Any]:
        return {n: _to_numpy(t) for n, t in zip(input_names, tensors, strict=False)}

    def call_prepared(feed: dict[str, Any]) -> list[Any]:
        return session.run(outputs, feed)

    def call(tensors: list[Any]) -> dict[str, Any]:
        return dict(zip(outputs, call_prepared(prepare(tensors)), strict=True))

    return Runner(
        "onnx",
        "onnxruntime",
        call,
        dynamic_batch,
        dynamic_spatial,
        None if dynamic_batch else int(first[0]),
        prepare,
        call_prepared,
    )


def export_onnx(
    ep: Any, inputs: Inputs, output_names: list[str], opset: int, dest: Path, metadata: dict[str, str]
) -> dict[str, Any]:
    import onnx
    import torch

    start = time.perf_counter()
    try:
        with _quiet():
            program = torch.onnx.export(
                ep,
                (),
                dynamo=True,
                opset_version=opset,
                input_names=inputs.names,
                output_names=output_names,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise _err(
            "E1108",
            f"ONNX export (torch.onnx.export, dynamo=True, opset {opset}) failed: {_short(exc, 800)}",
            None,
            "an operator may have no ONNX translation at this opset; try a newer --opset, or export torchscript/pt2",
        ) from None
    assert program is not None  # dynamo=True always returns an ONNXProgram
    params_bytes = sum(t.numel() * t.element_size() for t in ep.state_dict.values()) + sum(
        t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor)
    )
    external = params_bytes > EXTERNAL_DATA_BYTES
    try:
        with _quiet():
            program.save(str(dest), external_data=external)
    except Exception as exc:
        raise _err("E1111", f"cannot write `{dest}`: {_short(exc)}", dest) from None
    seconds = time.perf_counter() - start
    # Name the batch axis and attach metadata on the protobuf (weights stay where they are).
    model = onnx.load(str(dest), load_external_data=False)
    renamed = _rename_batch_axis(model)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dest))
    try:
        onnx.checker.check_model(str(dest), full_check=True)
    except Exception as exc:
        raise _err(
            "E1108", f"the exported ONNX model fails onnx.checker (full_check): {_short(exc, 800)}", dest
        ) from None
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    files = [dest] + ([dest.parent / loc for loc in _external_locations(model)] if external else [])
    return {
        "seconds": seconds,
        "opset": opsets.get("ai.onnx", opset),
        "opset_imports": opsets,
        "external_data": external,
        "files": [f.name for f in files],
        "batch_axis": renamed,
        "path_taken": "torch.onnx.export(dynamo=True) from torch.export",
        "checker": "onnx.checker full_check passed",
    }


def _external_locations(model: Any) -> list[str]:
    locations = []
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in locations:
                locations.append(entry.value)
    return locations


def _rename_batch_axis(model: Any) -> str | None:
    """Call the symbolic first dimension of the inputs ``batch`` everywhere it appears."""
    first = model.graph.input[0].type.tensor_type.shape.dim
    if not first or not first[0].dim_param:
        return None
    old = first[0].dim_param
    if old == "batch":
        return old
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = "batch"
    return "batch"


def _export(job: FormatJob, dest: Path) -> dict[str, Any]:
    return export_onnx(job.ep, job.inputs, job.output_names, job.opset, dest, job.metadata)


ONNX = Format(
    "onnx",
    "model.onnx",
    export=_export,
    load=lambda path, input_names, output_names: onnx_runner(path, input_names),
    traced=True,
    title="ONNX model",
)
