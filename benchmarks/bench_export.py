"""ONNX Runtime against eager PyTorch for the exported femto, and what `scmc export` costs.

Latency: the femto package is built, given seeded random weights (a bare state_dict) and
exported with ``scmc export --format onnx -s image=3,224,224``; the export's own gate checks
the ONNX outputs against eager first. Then, in this process, eager PyTorch
(``torch.set_num_threads(2)``, eval, ``inference_mode``) and an ONNX Runtime session
(CPUExecutionProvider, 2 intra-op threads, 1 inter-op thread, thread spinning off so idle ORT
threads do not steal the cores from the eager call timed next) are timed at batch 1 and 8, one
call each per round, in an order that rotates every round; the goal's figure is the median
over rounds of ORT/eager within the same round.

Export time: the whole ``scmc export`` process (torch import, torch.export, ONNX conversion,
onnx.checker, verification at batch 1, 2 and 7; no latency rounds), median of several runs,
with the stages as the export report times them.

    .venv/bin/python benchmarks/bench_export.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from _common import (
    PYTHON,
    ROOT,
    SCMC,
    Result,
    goal,
    main_for,
    median,
    progress,
    rotate,
    run_process,
    spread,
    time_process,
)

GOAL_RATIO = 0.85
GOAL_EXPORT_SECONDS = 20.0
THREADS = 2
BATCHES = [1, 8]
SIZE = 224


def _scmc() -> List[str]:
    return [SCMC] if SCMC else [PYTHON, "-m", "scmc"]


def build_and_checkpoint(tmp: Path) -> Dict[str, Any]:
    """The femto package and a state_dict of seeded random weights for it."""
    import torch

    sys.path.insert(0, str(ROOT))
    from scmc.export import imported_package, read_package

    package = tmp / "femto"
    run_process(
        _scmc()
        + [
            "build",
            "cfg/models/ConvNeXtV2.yaml",
            "-p",
            "backbone=femto",
            "-p",
            "num_classes=10",
            "-o",
            str(package),
            "-q",
        ]
    )
    info = read_package(package)
    with imported_package(info) as module:
        torch.manual_seed(0)
        model_cls = getattr(module, info.model_class)
        torch.save(model_cls().state_dict(), tmp / "weights.pt")
    return {"package": package, "checkpoint": tmp / "weights.pt", "info": info}


def time_exports(package: Path, checkpoint: Path, out: Path, runs: int) -> Dict[str, Any]:
    argv = _scmc() + [
        "export",
        str(package),
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "-s",
        f"image=3,{SIZE},{SIZE}",
        "-o",
        str(out),
        "--latency-rounds",
        "0",
        "-q",
    ]
    floor_argv = [PYTHON, "-c", "import torch, timm, onnx, onnxruntime, onnxscript, torch.onnx"]
    walls: List[float] = []
    floors: List[float] = []
    stages: List[Dict[str, float]] = []
    for i in range(runs):
        # The import floor, measured in the same round: what any export pays before working.
        floors.append(time_process(floor_argv))
        start = time.perf_counter()
        run_process(argv)
        walls.append(time.perf_counter() - start)
        report = json.loads((out / "export_report.json").read_text())
        onnx_entry = report["artifacts"][0]
        if not report["passed"]:
            raise AssertionError(f"the export failed its own verification: {onnx_entry['worst']}")
        stages.append(
            {
                "torch.export": report["torch_export"]["seconds"],
                "onnx conversion + save + checker": onnx_entry["seconds"],
                "verification (batch 1, 2, 7)": onnx_entry["verification"]["seconds"],
                "in-process total": report["seconds"],
            }
        )
        progress(f"bench_export: export {i + 1}/{runs}: {walls[-1]:.1f} s")
    return {"walls": walls, "floors": floors, "stages": stages, "report": report}


def time_latency(info: Any, checkpoint: Path, onnx_path: Path, rounds: int) -> Dict[int, Dict[str, List[float]]]:
    import numpy as np
    import onnxruntime as ort
    import torch

    from scmc.export import imported_package

    torch.set_num_threads(THREADS)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    per_batch: Dict[int, Dict[str, List[float]]] = {}
    with imported_package(info) as module:
        model = getattr(module, info.model_class)().eval()
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        for batch in BATCHES:
            x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
            feed = {"image": x.numpy()}
            with torch.inference_mode():
                expected = model(x)["cls"].numpy()
            got = session.run(["cls"], feed)[0]
            if not np.allclose(got, expected, atol=1e-4, rtol=1e-3):
                raise AssertionError(f"batch {batch}: ORT differs from eager by {np.abs(got - expected).max():.3g}")

            def eager() -> None:
                with torch.inference_mode():
                    model(x)

            subjects: Dict[str, Callable[[], Any]] = {"eager": eager, "onnxruntime": lambda: session.run(["cls"], feed)}
            for fn in subjects.values():
                for _ in range(3):
                    fn()
            samples: Dict[str, List[float]] = {name: [] for name in subjects}
            for r in range(rounds):
                for name in rotate(list(subjects), r):
                    start = time.perf_counter()
                    subjects[name]()
                    samples[name].append(time.perf_counter() - start)
            progress(
                f"bench_export: batch {batch}: eager {median(samples['eager']) * 1000:.1f} ms, "
                f"onnxruntime {median(samples['onnxruntime']) * 1000:.1f} ms"
            )
            per_batch[batch] = samples
    return per_batch


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(quick: bool) -> Result:
    rounds = 6 if quick else 30
    export_runs = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="scmc-bench-export-"))
    try:
        progress("bench_export: building femto and writing random weights")
        made = build_and_checkpoint(tmp)
        exports = time_exports(made["package"], made["checkpoint"], tmp / "out", export_runs)
        latency = time_latency(made["info"], made["checkpoint"], tmp / "out" / "model.onnx", rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(latency, exports, rounds)


def report(latency: Dict[int, Dict[str, List[float]]], exports: Dict[str, Any], rounds: int) -> Result:
    rows, goals = [], []
    for batch, s in latency.items():
        paired = median(o / e for o, e in zip(s["onnxruntime"], s["eager"]))
        for name, values in s.items():
            rows.append(
                [
                    batch,
                    name,
                    f"{median(values) * 1000:.2f}",
                    spread([v * 1000 for v in values]),
                    f"{median(values) / median(s['eager']):.3f}",
                    f"{min(values) / min(s['eager']):.3f}",
                    f"{paired:.3f}" if name == "onnxruntime" else "1",
                ]
            )
        goals.append(goal(f"batch {batch}: onnxruntime / eager <= {GOAL_RATIO}", f"{paired:.3f}", paired <= GOAL_RATIO))
    walls = exports["walls"]
    wall = median(walls)
    goals.append(
        goal(
            f"scmc export --format onnx (export + verification), whole process <= {GOAL_EXPORT_SECONDS:g} s",
            f"{wall:.1f} s",
            wall <= GOAL_EXPORT_SECONDS,
        )
    )
    floors = exports["floors"]
    stage_rows = [
        ["whole process", f"{wall:.1f}", spread(walls)],
        ["(python -c 'import torch, timm, onnx, onnxruntime, onnxscript')", f"{median(floors):.1f}", spread(floors)],
    ]
    for key in exports["stages"][0]:
        values = [s[key] for s in exports["stages"]]
        stage_rows.append([key, f"{median(values):.1f}", spread(values)])
    worst = exports["report"]["artifacts"][0]["worst"]["cls"]
    return {
        "name": "export",
        "title": "Export: ONNX Runtime vs eager PyTorch, and the cost of scmc export",
        "description": (
            f"femto at {SIZE}x{SIZE}, {THREADS} threads on both sides, {rounds} interleaved rounds of one call each; "
            f"the export's verification found max abs diff {worst['max_abs']:.1e} (tolerance 1e-4 + 1e-3*|x|)."
        ),
        "sections": [
            {
                "title": "Latency",
                "columns": [
                    "batch",
                    "runtime",
                    "median ms",
                    "min-max ms",
                    "ratio of medians",
                    "ratio of minimums",
                    "median paired ratio",
                ],
                "rows": rows,
                "note": (
                    "ONNX Runtime 2 intra-op threads, spinning off; eager `torch.set_num_threads(2)`, "
                    "`inference_mode`. The goal uses the median paired ratio. On a loaded machine eager PyTorch "
                    "suffers more than ONNX Runtime (its OpenMP regions wait for a descheduled thread; ORT's pool "
                    f"lets the caller do the work), so compare with the ratio of minimums; load average "
                    f"during the run: {_load()}."
                ),
            },
            {
                "title": "scmc export --format onnx",
                "columns": ["stage", "median s", "min-max s"],
                "rows": stage_rows,
                "note": f"{len(walls)} runs; the whole process includes starting Python and importing torch and onnx.",
            },
        ],
        "goals": goals,
        "raw": {
            "latency": {str(b): s for b, s in latency.items()},
            "export_walls": walls,
            "import_floor": floors,
            "stages": exports["stages"],
        },
    }


if __name__ == "__main__":
    main_for("bench_export", run, __doc__.splitlines()[0])
