"""`scmc build --watch`: one process rebuilds the package whenever a template it read changes."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scmc.watch import signature
from tests.conftest import ROOT, run_scmc

TIMEOUT_S = 120  # per step, on a loaded 2-core machine (an idle one rebuilds in about a second)


class Watcher:
    """`scmc build --watch` in a subprocess; its output lines are read by a thread as they come."""

    def __init__(self, cwd: Path, *args: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime" / "src"), *sys.path])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scmc", "build", *args, "--watch"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str) -> list[str]:
        """Lines up to and including the first that contains TEXT."""
        got: list[str] = []
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, "\n".join(self.seen)
                continue
            got.append(line)
            self.seen.append(line)
            if text in line:
                return got
        raise AssertionError(f"no line with {text!r} after {TIMEOUT_S} s:\n" + "\n".join(self.seen))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    time.sleep(0.02)  # a different mtime even on a coarse clock
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow
def test_an_edit_rebuilds_a_broken_edit_is_reported_and_keeps_the_package_and_ctrl_c_exits_0(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "cfg", tmp_path / "cfg")
    template = tmp_path / "cfg" / "models" / "ConvNeXtV2.yaml"
    out = tmp_path / "pkg"
    model = out / "src" / "convnextv2_atto" / "model.py"
    watcher = Watcher(tmp_path, "cfg/models/ConvNeXtV2.yaml", "-p", "backbone=atto", "-o", str(out))
    try:
        first = watcher.wait_for("watching")
        assert any("built convnextv2_atto" in line and "3,708,400 parameters" in line for line in first), first
        watched = int(first[-1].split()[1])
        assert watched >= 5  # the model template and the PACKAGE presets it names (loss, metric, backward, ...)

        # a one-line edit: the head gets 7 classes
        edit(template, "num_classes: 1000", "num_classes: 7")
        lines = watcher.wait_for("watching")
        assert any("ConvNeXtV2.yaml changed; rebuilding" in line for line in lines), lines
        assert any("built convnextv2_atto" in line and "parameters" in line for line in lines), lines
        assert "out_features=7" in model.read_text()
        good = model.read_text()

        # a broken edit: the diagnostic is printed, the package on disk stays the last good one
        edit(template, "num_classes: 7", "num_classes: [7")
        lines = watcher.wait_for("watching")
        assert any("error[" in line for line in lines), lines
        assert any("the last good package is unchanged" in line for line in lines), lines
        assert model.read_text() == good

        # fixed again: rebuilt
        edit(template, "num_classes: [7", "num_classes: 5")
        lines = watcher.wait_for("watching")
        assert any("built convnextv2_atto" in line for line in lines), lines
        assert "out_features=5" in model.read_text()
    finally:
        status = watcher.stop()
    assert status == 0
    time.sleep(0.5)  # the reader thread hands over the last lines
    rest = []
    while not watcher.lines.empty():
        rest.append(watcher.lines.get())
    assert rest == ["stopped watching"], rest


def test_an_existing_output_without_force_ends_the_watch_with_status_1(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    result = run_scmc(ROOT, "build", "cfg/models/ConvNeXtV2.yaml", "-o", str(out), "--watch")
    assert result.exit_code == 1
    assert "already exists" in result.output or "E09" in result.output
    assert (out / "mine.txt").read_text() == "mine"


def test_watch_and_check_do_not_go_together() -> None:
    result = run_scmc(ROOT, "build", "cfg/models/ConvNeXtV2.yaml", "--watch", "--check")
    assert result.exit_code == 2 and "--watch and --check" in result.output


def test_a_signature_sees_a_rewrite_of_the_same_size_and_a_removal(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("a: 1\n")
    before = signature([path])
    time.sleep(0.01)
    path.write_text("a: 2\n")
    assert signature([path]) != before
    path.unlink()
    assert signature([path]) == {path: None}
