"""Worker for bench_build.py: compile time with every import already done.

    python benchmarks/_warm_build.py ROUNDS GROUP [GROUP ...]

Imports scmc, does one untimed warm-up build (which imports torch, timm and the rest), then
times ``plan_package`` (load, render, lower, materialize, dedup, emit; no file writing) for
each group, ROUNDS times in rotating order, and prints
``{group: {"wall": [seconds, ...], "cpu": [seconds, ...]}}`` as JSON (CPU: ``process_time``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path("cfg/models/ConvNeXtV2.yaml")


def main() -> None:
    os.chdir(ROOT)  # the template path is relative to the repository root
    rounds = int(sys.argv[1])
    groups = sys.argv[2:]
    from scmc.build import BuildRequest, Part, plan_package
    from scmc.load import clear_caches

    def compile_group(group: str) -> tuple:
        request = BuildRequest(parts=[Part("model", TEMPLATE, "Model")], params=[f"backbone={group}", "num_classes=10"])
        # Untimed: start each build as a fresh process would, without the in-process memos of
        # earlier builds (rendered blocks, compiled Jinja templates) and without their garbage,
        # whose collection would otherwise be billed to whichever group comes next.
        clear_caches()
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        plan_package(request)
        return time.perf_counter() - start, time.process_time() - start_cpu

    compile_group(groups[0])  # warm-up: pays every import once
    samples = {g: {"wall": [], "cpu": []} for g in groups}
    for r in range(rounds):
        k = r % len(groups)
        for group in groups[k:] + groups[:k]:
            wall, cpu = compile_group(group)
            samples[group]["wall"].append(wall)
            samples[group]["cpu"].append(cpu)
    print(json.dumps(samples))


if __name__ == "__main__":
    main()
