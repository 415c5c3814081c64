"""What a format module provides: a :class:`Runner` (an artifact read back as a callable) and a :class:`Format`.

Each format (``onnx``, ``torchscript``, ``pt2``, ``aoti``) is one module holding its exporter and
its runner, and one :class:`Format` object naming them; :mod:`scmc.export.formats` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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
    prepare: Callable[[list[Any]], Any]  # inputs -> what call_prepared takes (timing)
    call_prepared: Callable[[Any], Any]


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


@dataclass
class FormatJob:
    """What an exporter may use: the model and its shared ``torch.export`` trace, and the request's settings."""

    model: Any  # the eager model, weights loaded, in eval mode
    ep: Any  # the shared torch.export ExportedProgram (None when no format is traced)
    export_meta: dict[str, Any]  # what torch_export found (dynamic batch/spatial, static batch size)
    inputs: Any  # scmc.export.inputs.Inputs
    output_names: list[str]
    metadata: dict[str, str]  # recorded in the artifact where the format can hold it (ONNX)
    staging: Path  # the folder artifacts are written to before they are moved into place
    formats: tuple[str, ...]  # every format asked for
    opset: int
    aoti_timeout: float


@dataclass(frozen=True)
class Format:
    """One export format: its file, how it is exported and how it is read back."""

    name: str  # as given to --format
    file_name: str  # in the output folder
    export: Callable[[FormatJob, Path], dict[str, Any]]  # -> the report entry; {"skipped": why} when it cannot be made
    load: Callable[[Path, list[str], list[str]], Runner]  # (path, input names, output names)
    traced: bool = False  # exported from the shared torch.export trace
    last: bool = False  # exported after the others (it is built from one of their files)
    title: str = ""  # what a warning calls it when it is skipped
