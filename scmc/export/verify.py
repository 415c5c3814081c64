"""Verification against eager PyTorch (batch 1, 2, 7 and a second spatial size) and latency."""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from scmc.diagnostics import Diagnostic, Span
from scmc.export.common import _short
from scmc.export.compare import compare_outputs, flatten_outputs
from scmc.export.inputs import Inputs
from scmc.export.runner import Runner

VERIFY_BATCHES = (1, 2, 7)
LATENCY_BATCHES = (1, 8)


REFERENCE_CASE: dict[str, Any] = {"batch": 2, "spatial": None, "seed": 101}


def _case_key(case: dict[str, Any]) -> str:
    return json.dumps(case, sort_keys=True)


def verification_cases(runner: Runner, inputs: Inputs) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    if runner.dynamic_batch:
        for n, batch in enumerate(VERIFY_BATCHES):
            cases.append({"batch": batch, "spatial": None, "seed": 100 + n})
    else:
        size = runner.static_batch_size or 1
        cases += [{"batch": size, "spatial": None, "seed": 100}, {"batch": size, "spatial": None, "seed": 101}]
    if runner.dynamic_spatial:
        cases.append(
            {
                "batch": cases[-1]["batch"] if not runner.dynamic_batch else 2,
                "spatial": inputs.second_spatial(),
                "seed": 200,
            }
        )
    return cases


def verify(
    runner: Runner, model: Any, inputs: Inputs, output_names: list[str], cache: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``runner`` and eager PyTorch on the same seeded inputs; compare every output.

    ``cache`` keeps eager outputs per case, so several artifacts are checked against one eager run.
    """
    import torch

    cache = {} if cache is None else cache
    results = []
    passed = True
    for case in verification_cases(runner, inputs):
        tensors = inputs.make(case["batch"], case["seed"], case["spatial"])
        key = _case_key(case)
        if key not in cache:
            with torch.no_grad():
                cache[key] = flatten_outputs(model(*tensors), output_names)
        expected = cache[key]
        shape = {n: [case["batch"], *(case["spatial"] or inputs.shapes)[n]] for n in inputs.names}
        try:
            actual = runner.call(tensors)
        except Exception as exc:
            results.append({"input_shapes": shape, "error": _short(exc, 500), "passed": False})
            passed = False
            continue
        diffs = compare_outputs(expected, actual)
        ok = all(d.passed for d in diffs)
        passed = passed and ok
        results.append({"input_shapes": shape, "outputs": {d.name: d.as_dict() for d in diffs}, "passed": ok})
    return {"passed": passed, "cases": results}


def worst_by_output(verification: dict[str, Any]) -> dict[str, dict[str, float]]:
    worst: dict[str, dict[str, float]] = {}
    for case in verification["cases"]:
        for name, d in case.get("outputs", {}).items():
            w = worst.setdefault(
                name,
                {"max_abs": 0.0, "max_rel": 0.0, "worst_over_tolerance": 0.0, "atol": d["atol"], "rtol": d["rtol"]},
            )
            for key in ("max_abs", "max_rel", "worst_over_tolerance"):
                w[key] = max(w[key], d[key])
    return worst


def measure_latency(model: Any, runners: list[Runner], inputs: Inputs, rounds: int) -> dict[str, Any]:
    """Milliseconds per call of eager PyTorch and each runner, interleaved, rotating the order per round.

    Per batch: ``median_ms``, ``min_ms`` and ``max_ms`` (each a dict by runtime, ``eager`` included),
    ``ratio_to_eager`` (median over eager's median) and ``rounds``.
    """
    import torch

    table: dict[str, Any] = {}
    for batch in LATENCY_BATCHES:
        tensors = inputs.make(batch, seed=300)
        subjects: dict[str, Callable[[], Any]] = {}

        def eager(t: list[Any] = tensors) -> Any:
            with torch.inference_mode():
                return model(*t)

        subjects["eager"] = eager
        for r in runners:
            if not r.dynamic_batch and (r.static_batch_size or 1) != batch:
                continue
            subjects[r.fmt] = functools.partial(r.call_prepared, r.prepare(tensors))
        for fn in subjects.values():  # warm-up: first calls allocate, plan, profile and pick kernels
            for _ in range(3):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in subjects}
        names = list(subjects)
        for i in range(rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                start = time.perf_counter()
                subjects[name]()
                samples[name].append(time.perf_counter() - start)
        medians = {k: statistics.median(v) for k, v in samples.items()}
        table[str(batch)] = {
            "median_ms": {k: v * 1000 for k, v in medians.items()},
            "min_ms": {k: min(v) * 1000 for k, v in samples.items()},
            "max_ms": {k: max(v) * 1000 for k, v in samples.items()},
            "ratio_to_eager": {k: medians[k] / medians["eager"] for k in medians if k != "eager"},
            "rounds": rounds,
        }
    return table


def _mismatch_diagnostic(fmt: str, verification: dict[str, Any], path: Path) -> Diagnostic:
    parts = []
    for case in verification["cases"]:
        shape = ", ".join(f"{n}[{','.join(map(str, s))}]" for n, s in case["input_shapes"].items())
        if "error" in case:
            parts.append(f"at {shape} it failed to run: {case['error']}")
            continue
        for name, d in case["outputs"].items():
            if d["passed"]:
                continue
            if d.get("problem"):
                parts.append(f"`{name}` at {shape}: {d['problem']}")
            else:
                parts.append(
                    f"`{name}` at {shape}: max abs diff {d['max_abs']:.3g}, max rel diff {d['max_rel']:.3g}, "
                    f"{d['mismatched_elements']} elements outside atol {d['atol']:g} + rtol {d['rtol']:g}*|x| "
                    f"(worst {d['worst_over_tolerance']:.3g}x the tolerance)"
                )
    shown = "; ".join(parts[:4]) + (f"; ... ({len(parts) - 4} more)" if len(parts) > 4 else "")
    return Diagnostic(
        "E1109",
        f"{fmt} output does not match eager PyTorch: {shown}",
        Span(str(path)),
        "the report lists every case; --allow-mismatch keeps the exit status 0",
    )
