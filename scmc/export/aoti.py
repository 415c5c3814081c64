"""The AOTInductor format: a package compiled from a saved ``.pt2`` in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scmc.export.common import THREADS, _quiet, _short
from scmc.export.pt2 import PT2, export_pt2
from scmc.export.runner import Format, FormatJob, Runner, torch_runner

_AOTI_SCRIPT = """
import sys, torch
ep = torch.export.load(sys.argv[1])
torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[2])
"""


def aoti_unavailable() -> str:
    """Why an AOTInductor package cannot be compiled here, or an empty string."""
    import torch

    try:
        import torch._inductor as inductor
    except Exception as exc:  # a torch build without inductor
        return f"torch._inductor cannot be imported: {_short(exc)}"
    if not hasattr(inductor, "aoti_compile_and_package") or not hasattr(inductor, "aoti_load_package"):
        return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package"
    compiler = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None or (os.environ.get("CXX") and not shutil.which(compiler)):
        return "no C++ compiler found (AOTInductor compiles a shared library; install g++ or set CXX)"
    return ""


def export_aoti(pt2: Path, dest: Path, timeout: float, meta: dict[str, Any]) -> dict[str, Any]:
    """Compile the saved ExportedProgram into an AOTInductor package in a subprocess (it can be slow).

    Returns ``{"skipped": reason}`` instead of raising: a missing compiler or a compile that does
    not finish in time never fails the export.
    """
    reason = aoti_unavailable()
    if reason:
        return {"skipped": reason}
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _AOTI_SCRIPT, str(pt2), str(dest)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {
            "skipped": f"AOTInductor compilation did not finish within {timeout:g} s (--aoti-timeout); "
            "the other formats were still written and verified"
        }
    if proc.returncode != 0 or not dest.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"AOTInductor compilation failed (exit {proc.returncode}): {tail[0][:300]}"}
    dest.with_suffix(".json").write_text(
        json.dumps({k: meta[k] for k in ("dynamic_batch", "dynamic_spatial", "static_batch_size")})
    )
    return {
        "seconds": time.perf_counter() - start,
        "path_taken": "torch._inductor.aoti_compile_and_package",
        "files": [dest.name, dest.with_suffix(".json").name],
    }


def _export(job: FormatJob, dest: Path) -> dict[str, Any]:
    pt2 = job.staging / PT2.file_name
    if "pt2" not in job.formats:  # only aoti asked for: the .pt2 it compiles from stays in staging
        export_pt2(job.ep, pt2)
    return export_aoti(pt2, dest, job.aoti_timeout, job.export_meta)


def load_aoti(path: Path, input_names: list[str], output_names: list[str]) -> Runner:
    import torch._inductor

    with _quiet():  # "No CUDA runtime is found" on CPU-only machines
        compiled = torch._inductor.aoti_load_package(str(path))
    meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
    return torch_runner(
        "aoti",
        compiled,
        output_names,
        meta.get("dynamic_batch", True),
        meta.get("dynamic_spatial", False),
        meta.get("static_batch_size"),
    )


AOTI = Format(
    "aoti", "model.aoti.pt2", export=_export, load=load_aoti, traced=True, last=True, title="AOTInductor package"
)
