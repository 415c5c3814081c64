"""What an export reports, as typed records: each artifact, each skipped format, the whole report.

:meth:`Report.to_json` is what ``export_report.json`` holds (its keys and their order are those of
the reports scmc has always written); the summary printed by ``scmc export`` reads the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scmc.diagnostics import Diagnostic

VERIFIED_ONLY = "verified only (not exported again)"


@dataclass
class Skipped:
    """A format that could not be made here (an AOTInductor package without a C++ compiler)."""

    format: str
    reason: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "reason": self.reason, "seconds": self.seconds}


@dataclass
class Artifact:
    """One exported file (with its side files), then as verified and timed."""

    format: str
    path: str
    exported: dict[str, Any] | None = None  # what the exporter reported; None: found by --verify-only
    export_seconds: float | None = None
    bytes: int = 0
    dynamic_batch: bool = True
    dynamic_spatial: bool = False
    static_batch_size: int | None = None
    verification: dict[str, Any] = field(default_factory=dict)  # scmc.export.verify.verify's result
    worst: dict[str, dict[str, float]] = field(default_factory=dict)  # per output, over the cases
    verify_seconds: float | None = None
    latency: dict[str, dict[str, Any]] | None = None  # per batch size; None: not timed

    @property
    def path_taken(self) -> str:
        return VERIFIED_ONLY if self.exported is None else str(self.exported.get("path_taken", ""))

    @property
    def files(self) -> list[str]:
        """The file and its side files (ONNX external data, the AOTInductor metadata), by name."""
        if self.exported is None:
            return [Path(self.path).name]
        return list(self.exported["files"])

    @property
    def opset(self) -> int | None:
        return None if self.exported is None else self.exported.get("opset")

    @property
    def passed(self) -> bool:
        return bool(self.verification.get("passed"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format}
        if self.exported is None:
            out.update(path=self.path, path_taken=VERIFIED_ONLY, export_seconds=None)
        else:
            out.update(self.exported, export_seconds=self.export_seconds, path=self.path)
        out.update(bytes=self.bytes, dynamic_batch=self.dynamic_batch, dynamic_spatial=self.dynamic_spatial)
        if not self.dynamic_batch:
            out["static_batch_size"] = self.static_batch_size
        out.update(verification=self.verification, worst=self.worst, verify_seconds=self.verify_seconds)
        if self.latency is not None:
            out["latency"] = self.latency
        return out


@dataclass
class Report:
    """``export_report.json``, field by field in the order it is written."""

    scmc_version: str
    package: str
    package_dir: str
    package_scmc_version: Any
    templates: list[dict[str, str]]
    checkpoint: dict[str, Any]  # path, weights (ema/raw), sha256, what the checkpoint said about itself
    inputs: dict[str, dict[str, Any]]  # name -> shape (without batch), dtype
    outputs: list[str]
    class_labels: list[str] | None
    class_labels_source: str
    preprocess: dict[str, Any]
    tolerances: dict[str, dict[str, float]]
    threads: int
    torch_export: dict[str, Any] | None  # the shared trace: seconds, dynamic dims, trace shapes
    artifacts: list[Artifact]
    latency: dict[str, dict[str, Any]]  # per batch size (a string key): median/min/max ms per runtime, ratio to eager
    skipped: list[Skipped]
    warnings: list[str]
    notes: list[str]
    passed: bool
    allow_mismatch: bool
    seconds: float
    timings: dict[str, float]
    versions: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["artifacts"] = [a.to_json() for a in self.artifacts]
        out["skipped"] = [s.to_json() for s in self.skipped]
        return out


@dataclass
class ExportOutcome:
    report: Report
    report_path: Path
    errors: list[Diagnostic]  # found after the artifacts were written (numeric mismatches)
    warnings: list[str]

    @property
    def passed(self) -> bool:
        return not self.errors
