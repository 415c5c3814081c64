"""Run every benchmark, print one table per benchmark and rewrite benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run.py            # full run (make bench): ~9 min on 2 idle cores, more under load
    .venv/bin/python benchmarks/run.py --quick    # fewer repeats, smoke test; prints only
    .venv/bin/python benchmarks/run.py --only build,runtime

Each benchmark runs in its own process (``benchmarks/bench_<name>.py --json ...``), so one
benchmark's imports and threads never colour another's figures. A full run writes
RESULTS.md; a ``--quick`` or ``--only`` run writes a file only when ``--results PATH`` names one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from _common import BENCH_DIR, PYTHON, ROOT, machine, markdown_table, render_markdown, verdict

# what a plain run (make bench) runs, in this order
BENCHMARKS = ["build", "forward", "families", "runtime", "export", "train", "inspect", "watch", "fsdp", "recipe"]


def available() -> List[str]:
    """Every ``bench_<name>.py`` here; ``--only`` may name any of them."""
    return sorted(p.stem[len("bench_") :] for p in BENCH_DIR.glob("bench_*.py"))


DEFAULT_RESULTS = BENCH_DIR / "RESULTS.md"

HOW_TO_READ = """\
## How to read

The machine is shared and noisy, so no figure here is a single run: each is the median over
repeated runs (the `min-max` column shows how noisy they were), and where a goal is a ratio
the reference was measured in the same run, interleaved with the subject in an order that
rotates every round, so drift (another job starting) hits both alike. Trust ratios over
absolute times: absolute seconds move with the machine's load (see the load averages above;
a load over the core count means every process waits for a core), ratios much less.
`CPU s` columns give a process's user + system time, which waiting for a core does not
inflate: for single-threaded work (imports, compiling) it approximates the wall time on an
idle machine. Build times are whole processes as a user sees them, torch start-up
included; `import torch` and `import torch, timm`, measured in the same run, are the floor
any build pays before compiling anything. Forward latency compares the generated model with
timm's hand-written one carrying the same weights (outputs are checked equal before timing).
A goal is **met** when the ~95% confidence interval of its median lies within it,
**not met** when it lies outside, and **inconclusive** when the noise straddles the limit:
rerun on a quieter machine. `--quick` runs use fewer repeats and are for smoke-testing only.
"""


def run_one(name: str, quick: bool, workdir: Path) -> Dict[str, Any]:
    out = workdir / f"{name}.json"
    argv = [PYTHON, str(BENCH_DIR / f"bench_{name}.py"), "--json", str(out)]
    if quick:
        argv.append("--quick")
    print(f"== bench_{name}{' (quick)' if quick else ''}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    # stderr (progress) goes straight to the terminal; stdout is the rendered table.
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        return {
            "name": name,
            "title": f"bench_{name}",
            "failed": f"exited with status {proc.returncode} after {elapsed:.0f} s",
            "sections": [],
            "goals": [],
        }
    return json.loads(out.read_text())


def render_results(results: List[Dict[str, Any]], info: Dict[str, Any], quick: bool, total: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results",
        "",
        f"Written by `benchmarks/run.py`{' --quick' if quick else ''} (`make bench`) on {now}; "
        f"the whole run took {total / 60:.1f} min. Regenerate with `make bench`.",
        "",
        "## Machine",
        "",
        markdown_table(
            ["", ""],
            [
                ["CPU", info["cpu"]],
                ["cores", f"{info['cores']} ({info['usable_cores']} usable)"],
                ["load average at start (1/5/15 min)", info["load_average"]],
                ["load average at end", info.get("load_average_end", "n/a")],
                ["Python", info["python"]],
                ["torch", info["torch"]],
                ["torchvision", info["torchvision"]],
                ["timm", info["timm"]],
                ["scmc / scmc-runtime", f"{info['scmc']} / {info['scmc_runtime']}"],
                ["platform", info["platform"]],
            ],
        ),
        "",
        HOW_TO_READ,
        "## Goals",
        "",
    ]
    rows = []
    for result in results:
        if result.get("failed"):
            rows.append([f"bench_{result['name']}", f"failed: {result['failed']}", "**failed**"])
        for g in result["goals"]:
            rows.append([g["goal"], g["value"], verdict(g["met"])])
    lines += [markdown_table(["goal", "measured", "verdict"], rows), ""]
    for result in results:
        if result.get("failed"):
            lines += [f"## bench_{result['name']}", "", f"**Failed**: {result['failed']}.", ""]
            continue
        body = dict(result)
        body.pop("goals", None)  # already in the summary above
        lines.append(render_markdown(body))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for smoke-testing")
    parser.add_argument(
        "--only", help=f"comma-separated benchmarks to run instead of {','.join(BENCHMARKS)} (any bench_<name>.py)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help=f"markdown file to write (default: {DEFAULT_RESULTS.relative_to(ROOT)} on a full run, none with --quick/--only)",
    )
    args = parser.parse_args(argv)
    names = BENCHMARKS if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in available()]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    # Only a full run of the default set replaces RESULTS.md; partial or quick runs print.
    results_path = args.results or (None if args.quick or args.only else DEFAULT_RESULTS)

    info = machine()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scmc-bench-") as tmp:
        results = [run_one(name, args.quick, Path(tmp)) for name in names]
    total = time.perf_counter() - start
    info["load_average_end"] = machine()["load_average"]

    text = render_results(results, info, args.quick, total)
    print(text)
    if results_path is not None:
        results_path.write_text(text)
        print(f"wrote {results_path}", file=sys.stderr)
    return 1 if any(r.get("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
