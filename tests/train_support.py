"""A trainable package for tests: a built package plus train.py and, until the build emits one, a backward.py.

``complete_package`` renders ``train.py`` from the package's manifest when the build did not
write one, and writes a hand-written ``backward.py`` (AdamW, one-cycle schedule, optional
gradient accumulation) with exactly the interface ``train.py`` expects when the build did not
write one either. ``python_env`` gives a subprocess the paths to import the package and the
runtime from the source trees.
"""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import scmc
from scmc.emit.train import TrainContext, render_train

ROOT = Path(__file__).resolve().parents[1]

HANDWRITTEN_BACKWARD = '''\
"""Hand-written stand-in for the compiled backward: AdamW, one-cycle schedule, accumulation."""

import contextlib
import math

import torch

__all__ = ["Backward"]


class Backward:
    accumulate = {accumulate}
    autocast_dtype = None

    def __init__(self, model, *, updates_per_epoch, epochs=None, device_type="cpu"):
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{{"params": decay, "weight_decay": 0.05}}, {{"params": no_decay, "weight_decay": 0.0}}], lr=2e-3
        )
        total = max(1, updates_per_epoch * (epochs or 1))
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=2e-3, total_steps=total, pct_start=0.15
        )
        self.updates = 0
        self._pending = 0

    def autocast(self, device_type):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def will_update(self, last_in_epoch=False):
        return last_in_epoch or self._pending + 1 >= self.accumulate

    def __call__(self, ce_loss, *, last_in_epoch=False):
        update = self.will_update(last_in_epoch)
        (ce_loss / self.accumulate).backward()
        self._pending += 1
        if not update:
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler.last_epoch + 1 < self.scheduler.total_steps:
            self.scheduler.step()
        self.updates += 1
        self._pending = 0
        return True

    def end_epoch(self, epoch, metrics):
        pass

    @property
    def learning_rates(self):
        return {{"decay": self.optimizer.param_groups[0]["lr"], "no_decay": self.optimizer.param_groups[1]["lr"]}}

    def state_dict(self):
        return {{
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "updates": self.updates,
            "pending": self._pending,
        }}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates = state["updates"]
        self._pending = state["pending"]
'''


def _returns_dict(source: str, cls: str) -> bool:
    """Whether ``cls.forward`` in ``source`` is annotated to return a dict."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "forward" and item.returns is not None:
                    return ast.unparse(item.returns).lower().startswith("dict")
    return False


def _forward_args(source: str, cls: str) -> list[str]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "forward":
                    return [a.arg for a in item.args.args[1:]]
    raise LookupError(f"{cls}.forward not found")


def context_for(package_dir: Path, name: str, defaults: Optional[Mapping[str, Any]] = None) -> TrainContext:
    """The TrainContext of a built package, read from its manifest and generated sources."""
    src = package_dir / "src" / name
    manifest = json.loads((src / "manifest.json").read_text())
    model_src = (src / "model.py").read_text()
    loss_src = (src / "loss.py").read_text()
    has_metric = (src / "metric.py").exists()
    metric_src = (src / "metric.py").read_text() if has_metric else ""
    outputs = manifest["outputs"]
    model_class = manifest.get("classes", {}).get("model", "Model")
    return TrainContext(
        package=name,
        scmc_version=scmc.__version__,
        template=manifest["inputs"][0]["path"],
        model_inputs=_forward_args(model_src, model_class),
        model_outputs=list(outputs["model"]),
        model_structured=_returns_dict(model_src, model_class),
        label="label",
        loss_inputs=_forward_args(loss_src, "Loss"),
        loss_outputs=list(outputs["loss"]),
        loss_structured=_returns_dict(loss_src, "Loss"),
        metric_inputs=_forward_args(metric_src, "Metric") if has_metric else [],
        metric_outputs=list(outputs.get("metric", [])),
        metric_structured=_returns_dict(metric_src, "Metric") if has_metric else False,
        backward_losses=list(outputs["loss"][:1]),
        defaults=dict(defaults or {}),
        model_class=model_class,
    )


def complete_package(
    package_dir: Path,
    name: str,
    *,
    accumulate: int = 1,
    handwritten_backward: bool = False,
    defaults: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Add train.py and backward.py where the build did not write them; returns ``package_dir``.

    ``handwritten_backward`` replaces a compiled backward.py with the hand-written one.
    """
    src = package_dir / "src" / name
    if handwritten_backward or not (src / "backward.py").exists():
        (src / "backward.py").write_text(HANDWRITTEN_BACKWARD.format(accumulate=accumulate))
    if not (src / "train.py").exists():
        (src / "train.py").write_text(render_train(context_for(package_dir, name, defaults)))
    return package_dir


def python_env(package_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that imports the package and scmc_runtime from source."""
    paths = [str(package_dir / "src"), str(ROOT / "runtime" / "src")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONHASHSEED": "0"}
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def descendants(pid: int) -> list[int]:
    """Every live process below PID (Linux /proc: the children of each of its threads)."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            stack += kids
    return found


def children(pid: int) -> list[int]:
    """Direct child processes of PID's main thread (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def alive(pid: int) -> bool:
    """PID still runs (a zombie waiting to be reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def run_job(command: list[str], *, env: dict[str, str], cwd: Path, timeout: float):
    """``subprocess.run(command, capture_output=True, text=True)`` for torchrun jobs: on a timeout
    every process of the job is killed (``kill_tree``), not only the launcher, and the test fails
    with what the job printed."""
    import subprocess

    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        raise AssertionError(f"still running after {timeout:.0f}s, killed: {' '.join(command)}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_tree(process, timeout: float = 120) -> str:
    """SIGKILL PROCESS and every process below it, then collect its output; "" when it is gone already.

    torchrun starts each worker in a session of its own: killing the launcher (or its process group)
    alone would leave the ranks training, holding the output pipe open, so that reading it waits for
    them (a rank stuck in a collective waits out the process group's 30-minute timeout).
    """
    import signal
    import subprocess

    victims = [*descendants(process.pid), process.pid]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # not the leader of a group of its own
    if process.stdout is None or process.stdout.closed:
        process.wait(timeout=timeout)
        output = ""
    else:
        try:
            output = process.communicate(timeout=timeout)[0] or ""
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job's output stayed open {timeout:.0f}s after every process was killed")
    deadline = time.monotonic() + timeout  # reaped by torchrun before it died, or by init
    while any(alive(pid) for pid in victims):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of the job outlived SIGKILL by {timeout:.0f}s")
        time.sleep(0.05)
    return output


# Runs train.py's real entry (``run_main(main)``) once per argv in ONE interpreter, so that many
# bad-input cases cost one torch import. Prints a JSON list of {"code": exit status, "stderr": ...}.
RUNNER = """
import contextlib, importlib, io, json, sys
module = importlib.import_module(sys.argv[1] + ".train")
from scmc_runtime.train import run_main
results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_main(lambda: module.main(argv), module.PROG)
        except SystemExit as stop:
            code = stop.code
    results.append({"code": code, "stderr": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def run_many(package_dir: Path, cases: list[list[str]], cwd: Path, timeout: float = 600) -> list[dict]:
    """Exit status and stderr of ``python -m <pkg>.train ARGV`` for each argv, run in one subprocess."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", RUNNER, package_dir.name, json.dumps(cases)],
        env=python_env(package_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, f"{result.stdout}\n{result.stderr}"
    return json.loads(lines[-1][len("RESULTS ") :])
