"""`scmc inspect` of the femto template as a whole process, against `scmc build` of the same.

`scmc inspect cfg/models/ConvNeXtV2.yaml -p backbone=femto` compiles the template in memory
(nothing written), builds the model on the meta device, counts FLOPs with FlopCounterMode and
MACs with ptflops on a real CPU forward. `scmc build` of the same template (its PACKAGE presets
included, build cache off, a fresh output directory each time) and `python -c "import torch,
timm"` (the import floor both pay) run interleaved with it, in an order that rotates every round.

    .venv/bin/python benchmarks/bench_inspect.py [--quick] [--json PATH]
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import List

from _common import PYTHON, SCMC, Result, interleaved, main_for, measure_process, median, median_ci, progress, spread

TEMPLATE = "cfg/models/ConvNeXtV2.yaml"
PARAMS = ["-p", "backbone=femto"]


def scmc_argv() -> List[str]:
    return [SCMC] if SCMC else [PYTHON, "-m", "scmc"]


def run(quick: bool) -> Result:
    rounds = 2 if quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="scmc-bench-inspect-"))
    count = [0]

    def build() -> tuple:
        count[0] += 1
        return measure_process([*scmc_argv(), "build", TEMPLATE, *PARAMS, "-q", "-o", str(tmp / f"pkg{count[0]}")])

    def inspect() -> tuple:
        return measure_process([*scmc_argv(), "inspect", TEMPLATE, *PARAMS])

    floor = [PYTHON, "-c", "import os, torch, timm; os._exit(0)"]
    try:
        progress(f"bench_inspect: {rounds} rounds of inspect / build / import floor")
        samples = interleaved(
            {
                "scmc inspect femto": inspect,
                "scmc build femto": build,
                "import torch, timm": lambda: measure_process(floor),
            },
            rounds,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    walls = {name: [s[0] for s in values] for name, values in samples.items()}
    cpus = {name: [s[1] for s in values] for name, values in samples.items()}
    for name in samples:
        lo, hi = median_ci(walls[name])
        rows.append(
            [
                name,
                f"{median(walls[name]):.2f}",
                f"{lo:.2f}-{hi:.2f}",
                spread(walls[name]),
                f"{median(cpus[name]):.2f}",
                f"{median(walls[name]) / median(walls['scmc build femto']):.2f}",
            ]
        )
    ratio = median(w / b for w, b in zip(walls["scmc inspect femto"], walls["scmc build femto"]))
    cpu_ratio = median(w / b for w, b in zip(cpus["scmc inspect femto"], cpus["scmc build femto"]))
    return {
        "name": "inspect",
        "title": "`scmc inspect` vs `scmc build` (femto template, whole process)",
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "sections": [
            {
                "columns": ["process", "median s", "CI of median", "min-max", "CPU s", "/ build"],
                "rows": rows,
                "note": f"{rounds} rounds. Paired ratio inspect / build: {ratio:.2f} wall, {cpu_ratio:.2f} CPU.",
            }
        ],
        "goals": [
            {
                "goal": "scmc inspect femto template, whole process, vs scmc build of it (report only)",
                "value": f"{median(walls['scmc inspect femto']):.2f} s vs {median(walls['scmc build femto']):.2f} s "
                f"(ratio {ratio:.2f} wall, {cpu_ratio:.2f} CPU)",
                "met": None,
            }
        ],
    }


if __name__ == "__main__":
    main_for("bench_inspect", run, __doc__.splitlines()[0])
