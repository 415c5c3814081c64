"""The whole export: request -> package, checkpoint, model -> artifacts -> verification -> report."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import scmc
from scmc.diagnostics import Diagnostic
from scmc.export.checkpoint import (
    check_runtime_checkpoint,
    consolidate_sharded,
    load_weights,
    read_checkpoint,
    select_weights,
)
from scmc.export.common import INSTALL_HINT, MIN_OPSET, REPORT_NAME, THREADS, _err, _short
from scmc.export.compare import TOLERANCES, flatten_outputs
from scmc.export.formats import BY_NAME, FILE_NAMES, FORMATS, load_runner
from scmc.export.inputs import Inputs, model_inputs
from scmc.export.package import MAX_INPUT_ELEMENTS, PackageInfo, imported_package, read_package
from scmc.export.preprocess import _config, check_checkpoint_config, class_labels, preprocessing, read_labels
from scmc.export.pt2 import torch_export
from scmc.export.report import Artifact, ExportOutcome, Report, Skipped
from scmc.export.request import ExportRequest
from scmc.export.runner import FormatJob, Runner
from scmc.export.verify import REFERENCE_CASE, _case_key, _mismatch_diagnostic, measure_latency, verify, worst_by_output


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_runtimes(formats: Sequence[str]) -> None:
    needed = []
    if "onnx" in formats:
        needed += [("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")]
    missing = []
    for module, dist in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise _err(
            "E1107",
            f"--format onnx needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
            None,
            f"{INSTALL_HINT}  (or pip install {' '.join(missing)})",
        )


def _metadata(
    info: PackageInfo,
    inputs: Inputs,
    dyn: dict[str, Any],
    output_shapes: dict[str, list[Any]],
    labels: list[str] | None,
    preprocess: dict[str, Any],
    ckpt_info: dict[str, Any],
    ckpt_sha: str,
) -> dict[str, str]:
    def in_shape(name: str) -> list[Any]:
        shape: list[Any] = ["batch" if dyn["dynamic_batch"] else dyn["static_batch_size"], *inputs.shapes[name]]
        if dyn["dynamic_spatial"]:
            shape[2:] = ["dynamic"] * len(shape[2:])
        return shape

    meta = {
        "scmc.package": info.name,
        "scmc.version": str(info.manifest.get("scmc_version", "")),
        "scmc.exporter_version": scmc.__version__,
        "scmc.template_sha256": info.model_template_sha256(),
        "scmc.templates": json.dumps(info.template_hashes(), sort_keys=True),
        "scmc.inputs": json.dumps(
            {n: {"shape": in_shape(n), "dtype": str(inputs.dtypes[n]).replace("torch.", "")} for n in inputs.names}
        ),
        "scmc.outputs": json.dumps(output_shapes),
        "scmc.preprocess": json.dumps({k: v for k, v in preprocess.items() if k != "mean_std_source"}),
        "scmc.weights": ckpt_info.get("weights", ""),
        "scmc.checkpoint_sha256": ckpt_sha,
    }
    if labels is not None:
        meta["scmc.class_labels"] = json.dumps(labels)
    return meta


def _checked_formats(request: ExportRequest) -> tuple[str, ...]:
    """The formats to export (deduplicated, --no-aoti applied); E1110 for a request that cannot be met."""
    formats = tuple(dict.fromkeys(request.formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise _err("E1110", f"unknown --format `{bad[0] if bad else ''}`: choose from {', '.join(FORMATS)}")
    if not request.aoti and "aoti" in formats:  # --no-aoti: drop it (kept for scripts of the pt2-implies-aoti days)
        formats = tuple(f for f in formats if f != "aoti")
        if not formats:
            raise _err("E1110", "--no-aoti with only --format aoti leaves nothing to export")
    if request.weights not in ("auto", "ema", "raw"):
        raise _err("E1110", f"weights must be auto, ema or raw, not `{request.weights}`")
    if "onnx" in formats:
        import_ok = True
        try:
            import onnx

            max_opset = onnx.defs.onnx_opset_version()
        except ImportError:
            import_ok = False
        if import_ok and not MIN_OPSET <= request.opset <= max_opset:
            raise _err("E1110", f"--opset {request.opset}: the exporter supports opsets {MIN_OPSET} to {max_opset}")
    return formats


def export_package(request: ExportRequest, progress: Callable[[str], None] = lambda _: None) -> ExportOutcome:
    """Do the export; raise :class:`CompileError` on user errors. Mismatches come back in the outcome."""
    started = time.perf_counter()
    import torch

    formats = _checked_formats(request)
    info = read_package(request.package_dir)
    if request.labels is not None:
        read_labels(request.labels)  # a bad labels file fails now, not after the model is built and run
    check_runtimes(formats)
    checkpoint = Path(request.checkpoint)
    raw = read_checkpoint(checkpoint)
    raw = consolidate_sharded(raw, checkpoint)  # --strategy fsdp: the weights are in a DCP shards folder
    check_runtime_checkpoint(raw, checkpoint, info.name)
    check_checkpoint_config(raw, checkpoint)
    state, ckpt_info = select_weights(raw, request.weights, checkpoint)
    ckpt_sha = _sha256(checkpoint)
    ckpt_info["sha256"] = ckpt_sha
    out_dir = Path(request.output) if request.output is not None else checkpoint.resolve().parent / "export"
    warnings_: list[str] = []

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with imported_package(info) as module:
            model_cls = getattr(module, info.model_class, None)
            if model_cls is None:
                raise _err(
                    "E1101",
                    f"`{info.name}.model` has no class `{info.model_class}` (manifest classes.model)",
                    info.manifest_path,
                )
            try:
                model = model_cls()  # its random initial weights are all replaced: load_weights is strict
            except Exception as exc:
                raise _err(
                    "E1101",
                    f"`{info.name}.model.{info.model_class}()` failed: {_short(exc)}",
                    info.manifest_path.parent / "model.py",
                ) from None
            load_weights(model, state, checkpoint, info.name, ckpt_info)
            model.eval()
            model.requires_grad_(False)
            inputs, shape_note = model_inputs(
                model,
                info,
                request.shapes,
                _config(raw).get("image_size"),
                request.max_input_elements or MAX_INPUT_ELEMENTS,
                checkpoint,
            )
            notes = [shape_note] if shape_note else []
            with torch.no_grad():
                # The batch-2 verification case: its eager outputs name the outputs and are reused.
                reference = flatten_outputs(model(*inputs.make(**REFERENCE_CASE)), info.output_names)
            output_names = list(reference)
            first_out = next(iter(reference.values()))
            num_classes = int(first_out.shape[-1]) if first_out.dim() == 2 else None
            labels, labels_source = class_labels(info, raw, request.labels, num_classes)
            preprocess = preprocessing(info, raw, inputs.shapes[inputs.names[0]])
            job = ExportJob(
                request,
                formats,
                info,
                model,
                inputs,
                output_names,
                reference,
                labels,
                labels_source,
                preprocess,
                ckpt_info,
                ckpt_sha,
                out_dir,
                warnings_,
                notes,
                started,
                time.perf_counter() - started,
            )
            return _export_and_verify(job, progress)
    finally:
        torch.set_num_threads(threads)


@dataclass
class ExportJob:
    """One export once the package, the checkpoint and the model are read: what the rest works from."""

    request: ExportRequest
    formats: tuple[str, ...]  # as asked, deduplicated, --no-aoti applied
    info: PackageInfo
    model: Any  # eval mode, the checkpoint's weights loaded
    inputs: Inputs
    output_names: list[str]
    reference: dict[str, Any]  # eager outputs of REFERENCE_CASE, by output name
    labels: list[str] | None
    labels_source: str
    preprocess: dict[str, Any]
    ckpt_info: dict[str, Any]
    ckpt_sha: str
    out_dir: Path
    warnings: list[str]
    notes: list[str]
    started: float  # time.perf_counter() when the export began
    prepare_seconds: float  # reading the package and checkpoint, building the model


def _export_and_verify(job: ExportJob, progress: Callable[[str], None]) -> ExportOutcome:
    try:
        job.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _err("E1111", f"cannot create the output folder: {_short(exc)}", job.out_dir) from None
    timings: dict[str, float] = {}
    skipped: list[Skipped] = []
    export_meta: dict[str, Any] = {}
    if job.request.verify_only:
        artifacts = _existing_artifacts(job)
    else:
        artifacts, export_meta = _write_artifacts(job, timings, skipped, progress)
    timings.update(prepare=job.prepare_seconds, load_and_export=time.perf_counter() - job.started)
    errors, runners = _verify_artifacts(job, artifacts, progress)
    timings["verification"] = time.perf_counter() - job.started - timings["load_and_export"]
    latency: dict[str, Any] = {}
    if job.request.latency_rounds > 0 and runners:
        progress("latency ...")
        latency_start = time.perf_counter()
        latency = measure_latency(job.model, runners, job.inputs, job.request.latency_rounds)
        _record_latency(artifacts, latency)
        timings["latency"] = time.perf_counter() - latency_start
    report = _report(job, export_meta, artifacts, latency, skipped, errors, timings)
    report_path = job.out_dir / REPORT_NAME
    tmp = report_path.with_name(f".{REPORT_NAME}.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    os.replace(tmp, report_path)
    return ExportOutcome(report, report_path, errors, job.warnings)


def _plan(formats: tuple[str, ...]) -> list[str]:
    """The order formats are exported in: aoti is compiled from a saved .pt2, so it goes last."""
    return [f for f in formats if not BY_NAME[f].last] + [f for f in formats if BY_NAME[f].last]


def _existing_artifacts(job: ExportJob) -> list[Artifact]:
    """--verify-only: the files already in the output folder, not exported again."""
    artifacts = []
    for fmt in _plan(job.formats):
        path = job.out_dir / FILE_NAMES[fmt]
        if not (path.exists() or path.is_symlink()):
            raise _err("E1112", f"--verify-only: `{path}` does not exist; export it first", path)
        artifacts.append(Artifact(fmt, str(path)))
    return artifacts


def _write_artifacts(
    job: ExportJob, timings: dict[str, float], skipped: list[Skipped], progress: Callable[[str], None]
) -> tuple[list[Artifact], dict[str, Any]]:
    """Export every format into a staging folder, then move the files into place: (entries, torch.export meta).

    model.pt2 is kept and verified only when pt2 was asked for (for aoti alone it is a staging file).
    """
    request = job.request
    artifacts: list[Artifact] = []
    export_meta: dict[str, Any] = {}
    staging = Path(tempfile.mkdtemp(prefix=".scmc-export-", dir=job.out_dir))
    try:
        ep = None
        if any(BY_NAME[f].traced for f in job.formats):
            progress("torch.export ...")
            ep_start = time.perf_counter()
            ep, export_meta = torch_export(job.model, job.inputs, request.static_batch, request.dynamic_spatial)
            timings["torch_export"] = time.perf_counter() - ep_start  # shared by onnx, pt2 and aoti
            if request.dynamic_spatial and not export_meta["dynamic_spatial"]:
                job.warnings.append(
                    "--dynamic-spatial: torch.export kept the spatial sizes static (the model specializes on them)"
                )
        output_shapes = {n: _output_shape(t, export_meta or {"dynamic_batch": True}) for n, t in job.reference.items()}
        metadata = _metadata(
            job.info,
            job.inputs,
            export_meta or {"dynamic_batch": True, "dynamic_spatial": False, "static_batch_size": None},
            output_shapes,
            job.labels,
            job.preprocess,
            job.ckpt_info,
            job.ckpt_sha,
        )
        format_job = FormatJob(
            job.model,
            ep,
            export_meta,
            job.inputs,
            job.output_names,
            metadata,
            staging,
            job.formats,
            request.opset,
            request.aoti_timeout,
        )
        for fmt in _plan(job.formats):
            spec = BY_NAME[fmt]
            progress(f"export {fmt} ...")
            fmt_start = time.perf_counter()
            entry = spec.export(format_job, staging / spec.file_name)
            if "skipped" in entry:
                skipped.append(Skipped(fmt, entry["skipped"], time.perf_counter() - fmt_start))
                job.warnings.append(f"{spec.title} skipped: {entry['skipped']}")
                continue
            for note in entry.get("notes", []):
                job.warnings.append(f"{fmt}: {note}")
            artifacts.append(Artifact(fmt, "", entry, time.perf_counter() - fmt_start))
        # Move the finished files into place (same file system: renames).
        for artifact in artifacts:
            for name in artifact.files:
                os.replace(staging / name, job.out_dir / name)
            artifact.path = str(job.out_dir / FILE_NAMES[artifact.format])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return artifacts, export_meta


def _verify_artifacts(
    job: ExportJob, artifacts: list[Artifact], progress: Callable[[str], None]
) -> tuple[list[Diagnostic], list[Runner]]:
    """Read each artifact back and compare it with eager PyTorch: (mismatch errors, the runners)."""
    errors: list[Diagnostic] = []
    runners = []
    eager_outputs: dict[str, Any] = {_case_key(REFERENCE_CASE): job.reference}
    for artifact in artifacts:
        verify_start = time.perf_counter()
        path = Path(artifact.path)
        artifact.bytes = sum((path.parent / f).stat().st_size for f in artifact.files)
        progress(f"verify {artifact.format} ...")
        # What --verify-only finds was not written by this run: it is checked (scmc.artifacts)
        # unless --trust-artifact. Files this run just wrote are loaded as they are.
        check = job.request.verify_only and not job.request.trust_artifact
        runner = load_runner(artifact.format, path, job.inputs.names, job.output_names, check=check)
        artifact.dynamic_batch = runner.dynamic_batch
        artifact.dynamic_spatial = runner.dynamic_spatial
        artifact.static_batch_size = runner.static_batch_size
        artifact.verification = verify(runner, job.model, job.inputs, job.output_names, eager_outputs)
        artifact.worst = worst_by_output(artifact.verification)
        runners.append(runner)
        artifact.verification["seconds"] = artifact.verify_seconds = time.perf_counter() - verify_start
        if not artifact.passed:
            errors.append(_mismatch_diagnostic(artifact.format, artifact.verification, path))
    return errors, runners


def _record_latency(artifacts: list[Artifact], latency: dict[str, Any]) -> None:
    """Each artifact's own rows of the latency table, with eager's beside them."""
    for artifact in artifacts:
        fmt = artifact.format
        artifact.latency = {
            b: {
                "median_ms": t["median_ms"][fmt],
                "min_ms": t["min_ms"][fmt],
                "max_ms": t["max_ms"][fmt],
                "ratio_to_eager": t["ratio_to_eager"][fmt],
                "eager": {k: t[k]["eager"] for k in ("median_ms", "min_ms", "max_ms")},
                # the keys of earlier reports: medians and their ratio
                "eager_ms": t["median_ms"]["eager"],
                "runtime_ms": t["median_ms"][fmt],
                "ratio": t["ratio_to_eager"][fmt],
                "rounds": t["rounds"],
            }
            for b, t in latency.items()
            if fmt in t["median_ms"]
        }


def _report(
    job: ExportJob,
    export_meta: dict[str, Any],
    artifacts: list[Artifact],
    latency: dict[str, Any],
    skipped: list[Skipped],
    errors: list[Diagnostic],
    timings: dict[str, float],
) -> Report:
    info, inputs = job.info, job.inputs
    return Report(
        scmc_version=scmc.__version__,
        package=info.name,
        package_dir=str(info.root),
        package_scmc_version=info.manifest.get("scmc_version"),
        templates=info.template_hashes(),
        checkpoint=job.ckpt_info,
        inputs={
            n: {"shape": inputs.shapes[n], "dtype": str(inputs.dtypes[n]).replace("torch.", "")} for n in inputs.names
        },
        outputs=job.output_names,
        class_labels=job.labels,
        class_labels_source=job.labels_source,
        preprocess=job.preprocess,
        tolerances={k: {"atol": a, "rtol": r} for k, (a, r) in TOLERANCES.items()},
        threads=THREADS,
        torch_export=export_meta or None,
        artifacts=artifacts,
        latency=latency,
        skipped=skipped,
        warnings=job.warnings,
        notes=job.notes,
        passed=not errors,
        allow_mismatch=job.request.allow_mismatch,
        seconds=time.perf_counter() - job.started,
        timings=timings,
        versions=_versions(),
    )


def _output_shape(tensor: Any, meta: dict[str, Any]) -> list[Any]:
    shape: list[Any] = list(tensor.shape)
    if shape:
        shape[0] = "batch" if meta.get("dynamic_batch") else shape[0]
    return shape


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out
