"""Runners: an exported artifact, read back from disk, as a callable of torch inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from scmc.export.compare import flatten_outputs


@dataclass
class Runner:
    fmt: str  # onnx | torchscript | pt2 | aoti
    label: str  # what the latency table calls it
    call: Callable[[list[Any]], dict[str, Any]]  # torch tensors in (input order) -> {name: array}
    dynamic_batch: bool
    dynamic_spatial: bool
    static_batch_size: int | None
    prepare: Callable[[list[Any]], Any] | None = None  # inputs -> what call_prepared takes (timing)
    call_prepared: Callable[[Any], Any] | None = None


def torch_runner(
    fmt: str, module: Any, names: list[str], dynamic_batch: bool, dynamic_spatial: bool, static_batch_size: int | None
) -> Runner:
    import torch

    def call_prepared(tensors: list[Any]) -> Any:
        with torch.inference_mode():
            return module(*tensors)

    def call(tensors: list[Any]) -> dict[str, Any]:
        return flatten_outputs(call_prepared(tensors), names)

    label = {"torchscript": "torch.jit", "pt2": "torch.export", "aoti": "AOTInductor"}[fmt]
    return Runner(fmt, label, call, dynamic_batch, dynamic_spatial, static_batch_size, list, call_prepared)
