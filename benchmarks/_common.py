"""Shared helpers for the benchmark scripts: paths, robust statistics, subprocess timing,
machine description and the result format every script hands to ``run.py``.

A benchmark script builds a *result*: a plain dict that survives ``json.dump``::

    {"name": "build", "title": "...", "sections": [{"title", "columns", "rows", "note"}],
     "goals": [{"goal", "value", "met"}], "notes": [...], "seconds": 12.3}

``render_markdown`` turns it into the table printed on stdout and written to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
VENV_BIN = ROOT / ".venv" / "bin"
# The interpreter running the benchmarks is the one measured (make bench uses .venv/bin/python).
PYTHON = sys.executable
SCMC = str(VENV_BIN / "scmc") if (VENV_BIN / "scmc").exists() else None

Result = Dict[str, Any]

# Every benchmarked `scmc build` compiles unless a benchmark points it at a cache of its own
# (bench_build's cache-hit rows): a hit from the user's ~/.cache would measure a copy.
os.environ["SCMC_NO_CACHE"] = "1"


# --------------------------------------------------------------------------- statistics


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def spread(values: Sequence[float]) -> str:
    """``min-max`` of a sample, for the reader to judge the noise next to a median."""
    return f"{_num(min(values))}-{_num(max(values))}"


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def median_ci(values: Sequence[float], z: float = 1.96) -> Tuple[float, float]:
    """Distribution-free ~95% confidence interval of the median: the order statistics
    ``k`` and ``n - 1 - k`` with ``k = floor((n - z sqrt(n)) / 2)`` (the whole range for n < 6)."""
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor((n - z * math.sqrt(n)) / 2))
    return ordered[k], ordered[n - 1 - k]


def judge(values: Sequence[float], limit: float) -> Union[bool, str]:
    """``True`` if the median's confidence interval lies at or under ``limit``, ``False`` if it
    lies above it, ``"inconclusive"`` if it straddles it (the noise is larger than the margin)."""
    lo, hi = median_ci(values)
    if hi <= limit:
        return True
    if lo > limit:
        return False
    return "inconclusive"


def rotate(items: Sequence[Any], k: int) -> List[Any]:
    """``items`` rotated left by ``k``: the order changes every round so drift hits all alike."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, float]:
    """Ordinary least squares ``y = slope * x + intercept`` and its R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2}


# --------------------------------------------------------------------------- timing


def measure_process(
    argv: Sequence[str], *, cwd: Path = ROOT, env: Optional[Dict[str, str]] = None, output: bool = False
) -> Tuple[Any, ...]:
    """``(wall, cpu)`` seconds of one subprocess, start-up included (``(wall, cpu, stdout)``
    with ``output=True``); raises if it fails.

    ``cpu`` is the child's user + system time: on a loaded machine it stays close to what the
    wall time would be on an idle one (for single-threaded work such as imports and compiling),
    while the wall time also counts the waits for a core."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return (elapsed, cpu, proc.stdout) if output else (elapsed, cpu)


def time_process(argv: Sequence[str], *, cwd: Path = ROOT, env: Optional[Dict[str, str]] = None) -> float:
    """Wall-clock seconds of one subprocess, start-up included; raises if it fails."""
    return measure_process(argv, cwd=cwd, env=env)[0]


def run_process(argv: Sequence[str], *, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a subprocess whose output the benchmark reads; raises if it fails."""
    proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-4000:]}")
    return proc


def interleaved(subjects: Dict[str, Callable[[], Any]], rounds: int, *, log: bool = True) -> Dict[str, List[Any]]:
    """Call every subject once per round, in an order that rotates each round; returns every
    subject's results in call order. A result is a number or a tuple whose first item is
    printed in the progress line."""
    names = list(subjects)
    samples: Dict[str, List[Any]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotate(names, r):
            samples[name].append(subjects[name]())
        if log:
            status = ", ".join(f"{n} {_first(samples[n][-1]):.3f}" for n in names)
            progress(f"  round {r + 1}/{rounds}: {status}")
    return samples


def _first(value: Any) -> float:
    return value[0] if isinstance(value, (tuple, list)) else value


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed
        return "not installed"


def machine() -> Dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "torchvision": package_version("torchvision"),
        "timm": package_version("timm"),
        "scmc": package_version("scmc"),
        "scmc_runtime": package_version("scmc-runtime"),
        "platform": platform.platform(),
        "load_average": load,
    }


# --------------------------------------------------------------------------- result format


def goal(text: str, value: str, met: Union[bool, str, None]) -> Dict[str, Any]:
    return {"goal": text, "value": value, "met": met}


def verdict(met: Union[bool, str, None]) -> str:
    if met == "inconclusive":
        return "inconclusive (noise > margin)"
    return {True: "met", False: "**not met**", None: "n/a"}[met]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in columns]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def render_markdown(result: Result, level: int = 2) -> str:
    hashes = "#" * level
    parts = [f"{hashes} {result['title']}", ""]
    if result.get("description"):
        parts += [result["description"], ""]
    for section in result["sections"]:
        if section.get("title"):
            parts += [f"{hashes}# {section['title']}", ""]
        if section.get("rows"):
            parts += [markdown_table(section["columns"], section["rows"]), ""]
        if section.get("note"):
            parts += [section["note"], ""]
    if result.get("goals"):
        parts += [f"{hashes}# Goals", ""]
        rows = [[g["goal"], g["value"], verdict(g["met"])] for g in result["goals"]]
        parts += [markdown_table(["goal", "measured", "verdict"], rows), ""]
    if result.get("notes"):
        parts += [f"- {note}" for note in result["notes"]] + [""]
    if "seconds" in result:
        parts += [f"_(benchmark took {result['seconds']:.0f} s)_", ""]
    return "\n".join(parts)


def main_for(name: str, run: Callable[[bool], Result], description: str) -> None:
    """Command-line entry shared by the bench scripts: ``--quick`` and ``--json PATH``."""
    parser = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.quick)
    result["seconds"] = time.perf_counter() - start
    result["quick"] = args.quick
    print(render_markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
