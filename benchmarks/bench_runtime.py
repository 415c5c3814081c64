"""Size of the scmc-runtime wheel and what importing it adds on top of ``import torch``.

The wheel is built from a copy of ``runtime/`` (so the tree gets no build/ or egg-info) with
``pip wheel --no-deps --no-build-isolation`` (offline: uses the venv's setuptools).

Import cost: subprocesses ``python -c "import torch"`` and ``python -c "import torch,
scmc_runtime.layers"`` alternate (order rotating per round); the difference of the medians is
the whole-process figure. The second process also times its own imports with
``time.perf_counter`` (torch, then scmc_runtime, then scmc_runtime.layers), which isolates the
increment from start-up noise.

    .venv/bin/python benchmarks/bench_runtime.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List

from _common import (
    PYTHON,
    ROOT,
    Result,
    goal,
    main_for,
    median,
    progress,
    rotate,
    run_process,
    spread,
    measure_process,
)

RUNTIME = ROOT / "runtime"

SPLIT = (
    "import time, json\n"
    "t0 = time.perf_counter()\n"
    "import torch\n"
    "t1 = time.perf_counter()\n"
    "import scmc_runtime\n"
    "t2 = time.perf_counter()\n"
    "import scmc_runtime.layers\n"
    "t3 = time.perf_counter()\n"
    "print(json.dumps([t1 - t0, t2 - t1, t3 - t2]))\n"
)


def build_wheel() -> Dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="scmc-bench-wheel-"))
    try:
        src = tmp / "runtime"
        shutil.copytree(RUNTIME, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__"))
        out = tmp / "wheel"
        run_process([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(out)])
        wheel = next(out.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            infos = zf.infolist()
        return {
            "name": wheel.name,
            "bytes": wheel.stat().st_size,
            "files": len(infos),
            "uncompressed": sum(i.file_size for i in infos),
            "largest": sorted(((i.file_size, i.filename) for i in infos), reverse=True)[:3],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool) -> Result:
    progress("bench_runtime: building the scmc-runtime wheel")
    wheel = build_wheel()
    rounds = 5 if quick else 15
    progress(f"bench_runtime: import torch vs import torch + scmc_runtime.layers, {rounds} rounds")
    whole: Dict[str, List[float]] = {"torch": [], "torch + scmc_runtime.layers": []}
    cpu: Dict[str, List[float]] = {"torch": [], "torch + scmc_runtime.layers": []}
    splits: List[List[float]] = []
    for r in range(rounds):
        for name in rotate(list(whole), r):
            if name == "torch":
                wall, used = measure_process([PYTHON, "-c", "import torch"])
            else:
                wall, used, out = measure_process([PYTHON, "-c", SPLIT], output=True)
                splits.append(json.loads(out.strip().splitlines()[-1]))
            whole[name].append(wall)
            cpu[name].append(used)
        progress(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in whole.items()))
    return report(wheel, whole, cpu, splits)


def report(
    wheel: Dict[str, Any], whole: Dict[str, List[float]], cpu: Dict[str, List[float]], splits: List[List[float]]
) -> Result:
    base = median(whole["torch"])
    subject = median(whole["torch + scmc_runtime.layers"])
    paired = [s - t for s, t in zip(whole["torch + scmc_runtime.layers"], whole["torch"])]
    cpu_base = median(cpu["torch"])
    cpu_subject = median(cpu["torch + scmc_runtime.layers"])
    in_torch = median(s[0] for s in splits)
    in_pkg = median(s[1] for s in splits)
    in_layers = median(s[2] for s in splits)
    rows_import = [
        [
            "python -c 'import torch'",
            f"{base * 1000:.0f}",
            spread([v * 1000 for v in whole["torch"]]),
            "1.000",
            f"{cpu_base * 1000:.0f}",
            "1.000",
        ],
        [
            "python -c 'import torch, scmc_runtime.layers'",
            f"{subject * 1000:.0f}",
            spread([v * 1000 for v in whole["torch + scmc_runtime.layers"]]),
            f"{subject / base:.3f}",
            f"{cpu_subject * 1000:.0f}",
            f"{cpu_subject / cpu_base:.3f}",
        ],
    ]
    rows_split = [
        ["import torch", f"{in_torch * 1000:.1f}"],
        ["then import scmc_runtime", f"{in_pkg * 1000:.2f}"],
        ["then import scmc_runtime.layers", f"{in_layers * 1000:.2f}"],
        ["scmc_runtime + layers over torch", f"{(in_pkg + in_layers) / in_torch:.2%}"],
    ]
    kb = wheel["bytes"] / 1024
    largest = ", ".join(f"{name} {size / 1024:.1f} KB" for size, name in wheel["largest"])
    return {
        "name": "runtime",
        "title": "scmc-runtime: wheel size and import cost",
        "description": "",
        "sections": [
            {
                "title": "Wheel",
                "columns": ["wheel", "size KB", "files", "uncompressed KB"],
                "rows": [[wheel["name"], f"{kb:.1f}", wheel["files"], f"{wheel['uncompressed'] / 1024:.1f}"]],
                "note": f"Largest files (uncompressed): {largest}.",
            },
            {
                "title": f"Import cost, whole process (median of {len(whole['torch'])}, interleaved)",
                "columns": ["process", "median ms", "min-max ms", "ratio", "CPU ms", "CPU ratio"],
                "rows": rows_import,
                "note": (
                    f"Difference of medians: **{(subject - base) * 1000:+.0f} ms** wall "
                    f"({(cpu_subject - cpu_base) * 1000:+.0f} ms CPU); median of per-round wall "
                    f"differences: {median(paired) * 1000:+.0f} ms. Start-up noise is larger than "
                    "the effect; the in-process split below is the precise figure."
                ),
            },
            {
                "title": "Import cost, in-process split (median over the same runs)",
                "columns": ["step", "ms"],
                "rows": rows_split,
            },
        ],
        "goals": [
            goal("runtime wheel stays small (report only)", f"{kb:.1f} KB", None),
            goal(
                "import scmc_runtime.layers adds little over import torch (report only)",
                f"{(in_pkg + in_layers) * 1000:.1f} ms in-process; whole-process ratio {subject / base:.3f}",
                None,
            ),
        ],
        "raw": {"wheel": wheel, "whole": whole, "cpu": cpu, "splits": splits},
    }


if __name__ == "__main__":
    main_for("bench_runtime", run, __doc__.splitlines()[0])
