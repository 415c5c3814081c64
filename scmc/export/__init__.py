"""``scmc export``: a built package + a checkpoint -> ONNX, TorchScript or ``.pt2``, verified.

This stage never touches the compiler's IR: it works from what ``scmc build`` wrote
(``src/<package>/`` and its ``manifest.json``) and what training wrote (a checkpoint), so a
package built by any scmc version and trained anywhere can be exported.

The steps, in order:

1. Read the manifest (package name, input names and shapes, output names, template hashes,
   presets) and check the runtimes the requested formats need are installed.
2. Read the checkpoint with ``torch.load(weights_only=True)``: a training checkpoint (a dict
   with ``"model"`` and optionally ``"ema"``) or a bare ``state_dict``, checked by the runtime's
   ``check_checkpoint`` as ``--resume`` checks it (format version, the package that wrote it). EMA weights are used
   when present unless ``--raw``; ``--ema`` demands them.
3. Import the package from ``src/`` for the duration of the export only (``sys.modules`` and
   ``sys.path`` are restored afterwards, so an installed same-named package is not disturbed),
   build ``Model()``, load the weights strictly, switch to eval mode: the inference flow is
   what gets exported.
4. Export: ``torch.export.export`` once (batch dimension dynamic unless ``--static-batch``),
   reused by ONNX (``torch.onnx.export(..., dynamo=True)``), ``.pt2`` (``torch.export.save``) and
   ``aoti`` (an AOTInductor package compiled in a subprocess from a saved ``.pt2``, when a C++
   compiler is present; with ``--format aoti`` alone that ``.pt2`` is an internal staging file,
   neither kept nor verified); TorchScript with ``torch.jit.script`` (``torch.jit.trace`` only as
   a reported fallback). Each format's export and verification times are printed and recorded.
5. Verify every artifact as read back from disk against eager PyTorch at batch 1, 2 and 7,
   and at a second spatial size where the artifact accepts one, for every output, with
   per-dtype tolerances (:data:`TOLERANCES`). A mismatch is an error (exit 1) unless
   ``--allow-mismatch``; the report is written either way.
6. Time eager PyTorch against each exported runtime (2 threads, batch 1 and 8, interleaved
   rounds; median, min and max in ms and the median's ratio to eager) and write
   ``export_report.json`` next to the artifacts.

User mistakes (not a built package, a checkpoint of another model, a corrupt file, a missing
runtime) are :class:`~scmc.diagnostics.CompileError` diagnostics with codes ``E11xx``.

Everything read is treated as possibly hostile (docs/security.md, "Artifacts"): the manifest
and the checkpoint's ``config`` are checked against typed schemas (:class:`Manifest`,
:class:`TrainingConfig`), files must be regular files within size limits (a FIFO is refused,
never waited on), input shapes are bounded (:data:`MAX_INPUT_ELEMENTS`), and an exported file
is checked by :mod:`scmc.artifacts` before torch loads it (``--trust-artifact`` skips that).

The package, by concern (docs/architecture.md, "scmc/export/"):

- :mod:`~scmc.export.common`: formats, file names, thread count, the error helper;
- :mod:`~scmc.export.request`: :class:`ExportRequest`; :mod:`~scmc.export.report`: the report as typed records and :class:`ExportOutcome`;
- :mod:`~scmc.export.package`: reading a built package (the manifest schema, its files, importing it);
- :mod:`~scmc.export.checkpoint`: reading a checkpoint and loading its weights;
- :mod:`~scmc.export.preprocess`: class labels and the preprocessing recorded with an export;
- :mod:`~scmc.export.compare`: outputs compared with per-dtype tolerances;
- :mod:`~scmc.export.inputs`: the inputs traced and verified at;
- :mod:`~scmc.export.runner`: an artifact read back as a callable;
- one module per format with its exporter and its runner: :mod:`~scmc.export.pt2` (with the
  shared ``torch.export`` trace), :mod:`~scmc.export.onnx`, :mod:`~scmc.export.torchscript`,
  :mod:`~scmc.export.aoti`; :mod:`~scmc.export.formats` reads any of them back;
- :mod:`~scmc.export.verify`: verification against eager PyTorch and latency;
- :mod:`~scmc.export.pipeline`: the whole export; :mod:`~scmc.export.summary`: its text and ``run_export``.

What callers import (scmc/cli/export.py, tests) is re-exported here.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from scmc.export.aoti import AOTI, aoti_unavailable, export_aoti, load_aoti
from scmc.export.checkpoint import (
    PREFIXES,
    check_runtime_checkpoint,
    load_weights,
    read_checkpoint,
    select_weights,
    strip_prefixes,
)
from scmc.export.common import DEFAULT_OPSET, INSTALL_HINT, MIN_OPSET, REPORT_NAME, THREADS
from scmc.export.compare import EXACT_KINDS, TOLERANCES, OutputDiff, compare_outputs, flatten_outputs, tolerance_for
from scmc.export.formats import BY_NAME, FILE_NAMES, FORMATS, REGISTRY, check_before_loading, load_runner
from scmc.export.inputs import SPATIAL_MULTIPLE, TRACE_BATCH, Inputs, model_inputs
from scmc.export.onnx import EXTERNAL_DATA_BYTES, ONNX, export_onnx, onnx_runner
from scmc.export.package import (
    DTYPES,
    MAX_INPUT_DIMS,
    MAX_INPUT_ELEMENTS,
    MAX_LABELS_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_PACKAGE_FILES,
    MAX_SOURCE_BYTES,
    DatasetPreset,
    InputSpec,
    Manifest,
    PackageInfo,
    Presets,
    TemplateHash,
    imported_package,
    read_bounded,
    read_package,
)
from scmc.export.pipeline import ExportJob, check_runtimes, export_package
from scmc.export.preprocess import TrainingConfig, check_checkpoint_config, class_labels, preprocessing, read_labels
from scmc.export.pt2 import PT2, export_pt2, load_pt2, torch_export
from scmc.export.report import VERIFIED_ONLY, Artifact, ExportOutcome, Report, Skipped
from scmc.export.request import ExportRequest
from scmc.export.runner import Format, FormatJob, Runner, torch_runner
from scmc.export.summary import render_errors, run_export, summary
from scmc.export.torchscript import TORCHSCRIPT, export_torchscript, load_torchscript
from scmc.export.verify import (
    LATENCY_BATCHES,
    REFERENCE_CASE,
    VERIFY_BATCHES,
    measure_latency,
    verification_cases,
    verify,
    worst_by_output,
)

__all__ = [
    "REPORT_NAME",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "THREADS",
    "INSTALL_HINT",
    "ExportRequest",
    "VERIFIED_ONLY",
    "Skipped",
    "Artifact",
    "Report",
    "ExportOutcome",
    "MAX_MANIFEST_BYTES",
    "MAX_LABELS_BYTES",
    "MAX_SOURCE_BYTES",
    "MAX_PACKAGE_FILES",
    "MAX_INPUT_ELEMENTS",
    "MAX_INPUT_DIMS",
    "PackageInfo",
    "read_bounded",
    "DTYPES",
    "InputSpec",
    "DatasetPreset",
    "Presets",
    "TemplateHash",
    "Manifest",
    "read_package",
    "imported_package",
    "PREFIXES",
    "read_checkpoint",
    "check_runtime_checkpoint",
    "strip_prefixes",
    "select_weights",
    "load_weights",
    "TrainingConfig",
    "read_labels",
    "class_labels",
    "check_checkpoint_config",
    "preprocessing",
    "TOLERANCES",
    "EXACT_KINDS",
    "flatten_outputs",
    "OutputDiff",
    "tolerance_for",
    "compare_outputs",
    "TRACE_BATCH",
    "SPATIAL_MULTIPLE",
    "Inputs",
    "model_inputs",
    "Runner",
    "torch_runner",
    "FormatJob",
    "Format",
    "torch_export",
    "export_pt2",
    "load_pt2",
    "PT2",
    "EXTERNAL_DATA_BYTES",
    "onnx_runner",
    "export_onnx",
    "ONNX",
    "export_torchscript",
    "load_torchscript",
    "TORCHSCRIPT",
    "aoti_unavailable",
    "export_aoti",
    "load_aoti",
    "AOTI",
    "REGISTRY",
    "BY_NAME",
    "FORMATS",
    "FILE_NAMES",
    "check_before_loading",
    "load_runner",
    "VERIFY_BATCHES",
    "LATENCY_BATCHES",
    "REFERENCE_CASE",
    "verification_cases",
    "verify",
    "worst_by_output",
    "measure_latency",
    "check_runtimes",
    "export_package",
    "ExportJob",
    "VERIFIED_ONLY",
    "Skipped",
    "Artifact",
    "Report",
    "ExportOutcome",
    "summary",
    "render_errors",
    "run_export",
]

from scmc.export import onnx as _onnx

# Tunables set on the package (``scmc.export.EXTERNAL_DATA_BYTES = 0``, as a test does to take the
# external-data path with a small model) are set in the module that reads them.
_TUNABLES: dict[str, types.ModuleType] = {"EXTERNAL_DATA_BYTES": _onnx}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        home = _TUNABLES.get(name)
        if home is not None:
            setattr(home, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
