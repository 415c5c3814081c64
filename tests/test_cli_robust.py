"""The command line under stress: interrupted builds, stale staging directories, bad paths.

An interrupted build (Ctrl-C or SIGKILL at any moment) leaves at the destination either the
package that was there before, byte for byte, or the complete new one; what a killed build
leaves next to it is cleaned up by the next build of the same destination.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import scmc.build
from tests.conftest import cli, tree_bytes

NET = """\
PARAMETERS:
  DEFAULT: {width: 4}
INPUTS: [x]
INPUT_SHAPES: {x: [3]}
FLOW:
  - _jinja_yaml_: |-
      - [x, h, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ width }}}}]]
      - [h, y, act, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]
"""
DEAD_PID = 4_194_304 + 12_345  # above Linux's largest pid_max: never a running process


def build_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "scmc", "build", "net.yaml", "--name", "net", "-q", *args]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "net.yaml").write_text(NET)
    return tmp_path


def siblings(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.iterdir() if p.name not in ("net.yaml",))


# --------------------------------------------------------------------------- interruption


def test_an_interrupted_build_leaves_the_old_package_or_the_complete_new_one(workdir: Path) -> None:
    """Kill `scmc build --force` with SIGINT or SIGKILL at several moments of its run."""
    reference = workdir / "reference"
    start = time.monotonic()
    done = subprocess.run(
        build_command("-p", "width=8", "-o", str(reference)), cwd=workdir, capture_output=True, text=True
    )
    duration = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    new = tree_bytes(reference)
    assert cli(workdir, "net.yaml", "--name", "net", "-o", "out", "-q").exit_code == 0
    old = tree_bytes(workdir / "out")
    assert old != new
    outcomes = []
    for attempt, fraction in enumerate([0.3, 0.6, 0.8, 0.9, 0.97, 1.05]):
        sig = signal.SIGKILL if attempt % 2 else signal.SIGINT
        process = subprocess.Popen(
            build_command("-p", "width=8", "-o", "out", "--force"),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(duration * fraction)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
        current = tree_bytes(workdir / "out")
        assert current in (old, new), f"attempt {attempt}: a partial package is in place ({sig.name})"
        # A SIGINT that lands while Python is still importing is reported by the interpreter
        # itself ("Exception ignored in ... _bootstrap"), before scmc can handle it.
        ours = "" if "Exception ignored in" in stderr and "_bootstrap" in stderr else stderr
        assert "Traceback" not in ours and "internal compiler error" not in stderr, stderr
        if "interrupted; nothing was written" in stderr:
            assert current == old and process.returncode in (130, -signal.SIGINT), stderr
        if sig == signal.SIGINT:  # 0 or -SIGINT: the signal came after the package was complete
            assert process.returncode in (0, 130, -signal.SIGINT), stderr
        outcomes.append((sig.name, process.returncode, "new" if current == new else "old"))
        leftovers = [n for n in siblings(workdir) if n not in ("out", "reference")]
        assert all(n.startswith((".out.tmp-", ".out.old-")) for n in leftovers), leftovers
        if current == new:  # start the next attempt from the old package again
            assert cli(workdir, "net.yaml", "--name", "net", "-o", "out", "-q", "--force").exit_code == 0
            assert tree_bytes(workdir / "out") == old
    # a later successful build removes whatever the killed ones left next to the package
    assert cli(workdir, "net.yaml", "--name", "net", "-o", "out", "-q", "--force", "-p", "width=8").exit_code == 0
    assert tree_bytes(workdir / "out") == new
    assert siblings(workdir) == ["out", "reference"], outcomes


def test_a_build_cleans_the_staging_directories_of_dead_builds_only(workdir: Path) -> None:
    assert cli(workdir, "net.yaml", "-o", "out", "-q").exit_code == 0
    dead = workdir / f".out.tmp-{DEAD_PID}-abcd1234"
    (dead / "src").mkdir(parents=True)
    (dead / "src" / "half.py").write_text("# half written")
    dead_old = workdir / f".out.old-{DEAD_PID}"
    dead_old.mkdir()
    running = workdir / ".out.tmp-1-live0000"  # pid 1 is always running: another build's files are left alone
    running.mkdir()
    other = workdir / f".other.tmp-{DEAD_PID}-x"  # another destination's: not ours to touch
    other.mkdir()
    assert cli(workdir, "net.yaml", "-o", "out", "-q", "--force").exit_code == 0
    assert siblings(workdir) == [".other.tmp-" + f"{DEAD_PID}-x", ".out.tmp-1-live0000", "out"]


def test_a_build_killed_between_its_two_renames_gets_its_old_package_back(workdir: Path, monkeypatch) -> None:
    """Where the two directories cannot be exchanged atomically, the old package is moved aside
    first; a build killed right then leaves no package at the destination, and the next build
    puts the old one back before it does anything else."""
    assert cli(workdir, "net.yaml", "-o", "out", "-q").exit_code == 0
    old = tree_bytes(workdir / "out")
    monkeypatch.setattr(scmc.build, "_exchange", lambda a, b: False)
    real_replace = os.replace
    calls = []

    def killed_after_first_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise SystemExit("killed")  # as if SIGKILL struck between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(scmc.build.os, "replace", killed_after_first_rename)
    with pytest.raises(SystemExit):
        scmc.build.write_package(scmc.build.Plan("net", {"pyproject.toml": b"new"}, []), workdir / "out", force=True)
    monkeypatch.setattr(scmc.build.os, "replace", real_replace)
    assert not (workdir / "out").exists()
    aside = workdir / f".out.old-{os.getpid()}"
    assert tree_bytes(aside) == old
    for leftover in [aside, *workdir.glob(f".out.tmp-{os.getpid()}-*")]:  # the killed process is gone
        leftover.rename(workdir / leftover.name.replace(str(os.getpid()), str(DEAD_PID)))
    result = cli(workdir, "net.yaml", "-o", "out", "-q")
    assert result.exit_code == 1 and "out already exists" in result.output  # restored, so --force is needed again
    assert tree_bytes(workdir / "out") == old
    assert siblings(workdir) == ["out"]


def test_replacing_a_package_swaps_the_whole_directory(workdir: Path) -> None:
    """What an older build wrote (a layer module it no longer has) and what pip left (build/,
    *.egg-info, __pycache__) go with the old package."""
    assert cli(workdir, "net.yaml", "-o", "out", "-q").exit_code == 0
    stale = ["src/net/old_layer.py", "build/lib/net/model.py", "src/net.egg-info/PKG-INFO", "src/net/__pycache__/x.pyc"]
    for rel in stale:
        (workdir / "out" / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / "out" / rel).write_text("from the old package")
    inode = (workdir / "out").stat().st_ino
    assert cli(workdir, "net.yaml", "-o", "out", "-q", "--force", "-p", "width=5").exit_code == 0
    assert not any((workdir / "out" / rel).exists() for rel in stale)
    assert not (workdir / "out" / "build").exists()
    assert (workdir / "out").stat().st_ino != inode
    assert "out_features=5" in (workdir / "out" / "src" / "net" / "model.py").read_text()
    assert siblings(workdir) == ["out"]


# --------------------------------------------------------------------------- paths


def test_an_existing_output_is_kept_unless_force(workdir: Path) -> None:
    (workdir / "out").mkdir()
    (workdir / "out" / "mine.txt").write_text("mine")
    result = subprocess.run(build_command("-o", "out"), cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error[E0901]: out already exists\n")
    assert "pass --force to replace it" in result.stderr
    assert (workdir / "out" / "mine.txt").read_text() == "mine"


def test_a_missing_parent_directory_of_the_output_is_created(workdir: Path) -> None:
    result = cli(workdir, "net.yaml", "-o", "a/b/c/out", "-q")
    assert result.exit_code == 0, result.output
    assert (workdir / "a" / "b" / "c" / "out" / "pyproject.toml").is_file()


def test_an_output_below_a_file_is_a_clear_error(workdir: Path) -> None:
    (workdir / "afile").write_text("")
    result = cli(workdir, "net.yaml", "-o", "afile/out")
    assert result.exit_code == 1, result.output
    assert "error[E0903]: cannot create afile: afile is a file, not a directory" in result.output
    result = cli(workdir, "net.yaml", "-o", "afile", "--force")
    assert result.exit_code == 1 and "error[E0902]: afile exists and is not a directory" in result.output
    assert (workdir / "afile").read_text() == ""


def test_an_output_on_a_read_only_file_system_is_a_clear_error(workdir: Path) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    result = cli(workdir, "net.yaml", "-o", "/proc/scmc-test/out")
    assert result.exit_code == 1
    assert "error[E0903]: cannot create /proc/scmc-test" in result.output
    assert "Traceback" not in result.output


def test_a_read_only_output_directory_is_a_clear_error(workdir: Path) -> None:
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) can write to a read-only directory")
        result = cli(workdir, "net.yaml", "-o", "locked/out")
        assert result.exit_code == 1
        assert "error[E0903]: cannot write to locked: permission denied" in result.output
    finally:
        locked.chmod(0o755)


def test_an_unreadable_template_is_a_clear_error(workdir: Path) -> None:
    template = workdir / "net.yaml"
    template.chmod(0)
    try:
        if os.access(template, os.R_OK):
            pytest.skip("this user (root) can read a file without read permission")
        result = cli(workdir, "net.yaml", "-o", "out")
        assert result.exit_code == 1
        assert "error[E0002]: cannot read net.yaml: permission denied" in result.output
    finally:
        template.chmod(0o644)


def test_a_template_that_is_not_utf8_is_a_clear_error(workdir: Path) -> None:
    (workdir / "latin1.yaml").write_bytes("# größe\nINPUTS: [x]\n".encode("latin-1"))
    result = cli(workdir, "latin1.yaml", "-o", "out")
    assert result.exit_code == 1
    assert result.output.startswith(
        "latin1.yaml:1:5: error[E0003]: the template is not valid UTF-8 (byte 0xf6 at offset 4)"
    )
    assert not (workdir / "out").exists()


def test_a_directory_given_as_the_template_is_a_clear_error(workdir: Path) -> None:
    (workdir / "models").mkdir()
    result = cli(workdir, "models", "-o", "out")
    assert result.exit_code == 1
    assert result.output.startswith("error[E0001]: models is a directory, not a template file")
    assert "Traceback" not in result.output
