"""What ``scmc export`` is asked to do: :class:`ExportRequest`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scmc.export.common import DEFAULT_OPSET


@dataclass
class ExportRequest:
    package_dir: Path
    checkpoint: Path
    formats: tuple[str, ...] = ("onnx",)
    weights: str = "auto"  # auto: EMA when present; ema: demand EMA; raw: the trained weights
    output: Path | None = None  # default: <checkpoint folder>/export
    opset: int = DEFAULT_OPSET
    static_batch: bool = False
    dynamic_spatial: bool = False
    shapes: dict[str, list[int]] = field(default_factory=dict)  # input name -> shape without batch
    allow_mismatch: bool = False
    aoti: bool = True  # False drops "aoti" from formats (--no-aoti); pt2 never implies aoti
    aoti_timeout: float = 900.0
    labels: Path | None = None  # a text file, one class label per line
    verify_only: bool = False  # re-verify artifacts already in the output folder
    latency_rounds: int = 15
    trust_artifact: bool = False  # load .pt2/TorchScript/AOTInductor files without checking them (scmc.artifacts)
    max_input_elements: int = 0  # per-sample input size limit; 0: MAX_INPUT_ELEMENTS
