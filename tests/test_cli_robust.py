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
from tests.conftest import cli, run_scmc, snapshot, tree_bytes

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
    (dead / "src" / "net").mkdir(parents=True)
    (dead / "src" / "net" / "half.py").write_text("# half written")
    dead_old = workdir / f".out.old-{DEAD_PID}"
    dead_old.mkdir()
    running = workdir / ".out.tmp-1-live0000"  # pid 1 is always running: another build's files are left alone
    running.mkdir()
    other = workdir / f".other.tmp-{DEAD_PID}-x"  # another destination's: not ours to touch
    other.mkdir()
    users = workdir / f".out.tmp-{DEAD_PID}-mine"  # named like ours, but holds what scmc does not write
    (users / "notes.txt").parent.mkdir()
    (users / "notes.txt").write_text("mine")
    assert cli(workdir, "net.yaml", "-o", "out", "-q", "--force").exit_code == 0
    assert siblings(workdir) == [
        ".other.tmp-" + f"{DEAD_PID}-x",
        ".out.tmp-1-live0000",
        f".out.tmp-{DEAD_PID}-mine",
        "out",
    ]
    assert (users / "notes.txt").read_text() == "mine"


def test_a_build_killed_between_its_two_renames_gets_its_old_package_back(workdir: Path, monkeypatch) -> None:
    """Where the two directories cannot be exchanged atomically, the old package is moved aside
    first; a build killed right then leaves no package at the destination, and the next build
    puts the old one back before it does anything else."""
    assert cli(workdir, "net.yaml", "-o", "out", "-q").exit_code == 0
    old = tree_bytes(workdir / "out")
    monkeypatch.setattr(scmc.build.write, "_exchange", lambda a, b: False)
    real_replace = os.replace
    calls = []

    def killed_after_first_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise SystemExit("killed")  # as if SIGKILL struck between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(scmc.build.write.os, "replace", killed_after_first_rename)
    with pytest.raises(SystemExit):
        scmc.build.write_package(scmc.build.Plan("net", {"pyproject.toml": b"new"}, []), workdir / "out", force=True)
    monkeypatch.setattr(scmc.build.write.os, "replace", real_replace)
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


# --------------------------------------------------------------------------- what may be overwritten

HEAD = """\
INPUTS: [x]
FLOW:
  - [x, y, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: 2}}]]
"""
WITH_INCLUDE = NET.replace(
    "      - [h, y, act, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]\n",
    "      - [h, y, act, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]\n  - [y, y, {CFG: parts/head.yaml}]\n",
)


def first_error(output: str) -> str:
    return next(line for line in output.splitlines() if "error[" in line)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """net.yaml with a CFG include in parts/, a user's folder of notes, and a built package."""
    (tmp_path / "net.yaml").write_text(WITH_INCLUDE)
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "head.yaml").write_text(HEAD)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("my notes")
    (tmp_path / "sub").mkdir()
    assert cli(tmp_path, "net.yaml", "--name", "net", "-o", "pkg", "-q").exit_code == 0
    return tmp_path


REFUSED_BUILDS = {
    "the working directory": (
        ".",
        ["net.yaml", "-o", ".", "--force"],
        "error[E0920]: . is the working directory; scmc never replaces it, not even with --force",
    ),
    "a parent of the working directory": (
        "sub",
        ["../net.yaml", "-o", "..", "--force"],
        "error[E0920]: {tmp} is a parent of the working directory; scmc never replaces it, not even with --force",
    ),
    "a parent of the working directory, spelled with ..": (
        "sub",
        ["../net.yaml", "-o", "../parts/..", "--force"],
        "error[E0920]: {tmp} is a parent of the working directory; scmc never replaces it, not even with --force",
    ),
    "the folder of the template": (
        ".",
        ["parts/head.yaml", "-o", "parts", "--force"],
        "error[E0921]: parts holds parts/head.yaml, an input of this build; scmc never writes over its inputs",
    ),
    "the folder of a CFG include": (  # known only once compiled: refused as a folder scmc did not write
        ".",
        ["net.yaml", "-o", "parts", "--force"],
        "error[E0922]: parts is not a package scmc wrote (it has no src/<name>/manifest.json), so --force does not replace it",
    ),
    "the template itself": (
        ".",
        ["net.yaml", "-o", "net.yaml", "--force"],
        "error[E0921]: net.yaml is an input of this build; scmc never writes over its inputs",
    ),
    "a folder scmc did not write": (
        ".",
        ["net.yaml", "-o", "notes", "--force"],
        "error[E0922]: notes is not a package scmc wrote (it has no src/<name>/manifest.json), so --force does not replace it",
    ),
    "an existing package without --force": (".", ["net.yaml", "-o", "pkg"], "error[E0901]: pkg already exists"),
}


@pytest.mark.parametrize("case", list(REFUSED_BUILDS))
def test_force_never_replaces_what_scmc_did_not_write(project: Path, case: str) -> None:
    cwd, args, expected = REFUSED_BUILDS[case]
    before = snapshot(project)
    result = cli(project / cwd, *args)
    assert result.exit_code == 1, result.output
    assert first_error(result.output) == expected.format(tmp=project), result.output
    assert "nothing was written" in result.output and "Traceback" not in result.output
    assert snapshot(project) == before


def test_force_refuses_a_package_that_holds_files_of_the_user(project: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "data.txt").write_text("the user's data")
    (project / "pkg" / "runs").mkdir()
    (project / "pkg" / "runs" / "last.pt").write_bytes(b"checkpoint")
    (project / "pkg" / "src" / "net" / "data").symlink_to(outside)
    before, outside_before = snapshot(project), snapshot(outside)
    result = cli(project, "net.yaml", "-o", "pkg", "--force")
    assert result.exit_code == 1
    assert first_error(result.output) == (
        "error[E0923]: pkg holds what scmc did not write (runs/, src/net/data), " "so --force does not replace it"
    )
    assert "= help: move those out of the package folder, or choose another -o directory" in result.output
    assert snapshot(project) == before and snapshot(outside) == outside_before


def test_force_through_a_link_replaces_the_package_it_points_to_and_keeps_the_link(project: Path) -> None:
    (project / "current").symlink_to("pkg")
    result = cli(project, "net.yaml", "-o", "current", "--force", "-q", "-p", "width=5")
    assert result.exit_code == 0, result.output
    assert os.readlink(project / "current") == "pkg"
    assert "out_features=5" in (project / "pkg" / "src" / "net" / "model.py").read_text()
    assert sorted(p.name for p in project.iterdir()) == ["current", "net.yaml", "notes", "parts", "pkg", "sub"]
    (project / "dangling").symlink_to("nowhere")
    result = cli(project, "net.yaml", "-o", "dangling", "--force")
    assert result.exit_code == 1
    assert first_error(result.output) == (
        "error[E0925]: -o dangling is a symbolic link to nowhere, which is not a directory"
    )


def test_no_command_writes_over_its_own_template(project: Path) -> None:
    (project / "alias.yaml").symlink_to("net.yaml")
    os.link(project / "net.yaml", project / "hard.yaml")
    before = snapshot(project)
    commands = {
        (
            "torch",
            "create",
            "model",
            "net.yaml",
            "-o",
            "net.yaml",
        ): "error[E0924]: -o net.yaml is an input of this command",
        ("torch", "create", "model", "net.yaml", "-o", "alias.yaml", "--force"): (
            "error[E0924]: -o alias.yaml is the same file as net.yaml, an input of this command"
        ),
        ("torch", "create", "model", "net.yaml", "-o", "hard.yaml", "--force"): (
            "error[E0924]: -o hard.yaml is the same file as net.yaml, an input of this command"
        ),
        ("torch", "create", "model", "parts/head.yaml", "-o", "parts/head.yaml", "--force", "--shape", "x=3"): (
            "error[E0924]: -o parts/head.yaml is an input of this command"
        ),
        ("torch", "create", "backward", "net.yaml", "-o", "hard.yaml", "--force"): (
            "error[E0924]: -o hard.yaml is the same file as net.yaml, an input of this command"
        ),
        ("format", "net.yaml", "-o", "net.yaml", "--force"): "error[E0924]: -o net.yaml is an input of this command",
        ("format", "alias.yaml", "-o", "hard.yaml", "--force"): (
            "error[E0924]: -o hard.yaml is the same file as net.yaml, an input of this command"
        ),
        ("format", "net.yaml", "-o", "notes/todo.txt"): "error[E0901]: notes/todo.txt already exists",
        ("torch", "create", "model", "net.yaml", "-o", "notes/todo.txt"): "error[E0901]: notes/todo.txt already exists",
        ("torch", "create", "model", "net.yaml", "-o", "notes"): (
            "error[E0902]: notes is a directory; -o names the file to write"
        ),
    }
    for args, expected in commands.items():
        result = run_scmc(project, *args)
        assert result.exit_code == 1, (args, result.output)
        assert first_error(result.output).split(";")[0] == expected.split(";")[0], (args, result.output)
        assert "Traceback" not in result.output
        assert snapshot(project) == before, args


def test_torch_create_and_format_replace_an_existing_file_only_with_force(project: Path) -> None:
    (project / "model.py").write_text("mine")
    result = run_scmc(project, "torch", "create", "model", "net.yaml")
    assert result.exit_code == 1 and first_error(result.output) == "error[E0901]: model.py already exists"
    assert "= help: pass --force to replace it" in result.output
    assert (project / "model.py").read_text() == "mine"
    assert run_scmc(project, "torch", "create", "model", "net.yaml", "--force", "-q").exit_code == 0
    assert (project / "model.py").read_text().startswith("# Generated by scmc")
    (project / "net.rendered.yaml").write_text("mine")
    assert run_scmc(project, "format", "net.yaml", "-o", "net.rendered.yaml").exit_code == 1
    assert (project / "net.rendered.yaml").read_text() == "mine"
    assert run_scmc(project, "format", "net.yaml", "-o", "net.rendered.yaml", "--force").exit_code == 0
    assert (project / "net.rendered.yaml").read_text().startswith("FLOW:")


def test_refusing_an_existing_output_does_not_import_torch(project: Path) -> None:
    """The default output (artifacts/<name>) is known from the template alone: an existing
    package is refused before the compiler imports torch (it took 27 s with ConvNeXtV2)."""
    assert cli(project, "net.yaml", "-q").exit_code == 0  # artifacts/net
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom scmc.cli import main\n"
        "r = CliRunner().invoke(main, sys.argv[1:])\n"
        "print(r.exit_code, 'torch' in sys.modules, r.output.splitlines()[0])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(scmc.__file__).parents[1]), *sys.path])}
    for args in (
        ["build", "net.yaml"],
        ["build", "net.yaml", "-p", "width=4"],
        ["build", "net.yaml", "-p", "width=4", "-p", "not_a_key=1"],  # reported once compiled, as ever
        ["build", "net.yaml", "-o", "pkg"],
        ["torch", "create", "model", "net.yaml", "-o", "net.yaml"],
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], cwd=project, capture_output=True, text=True, env=env
        )
        code, imported, line = done.stdout.strip().split(" ", 2)
        assert (code, imported) == ("1", "False"), (args, done.stdout, done.stderr)
        assert "error[E0901]" in line or "error[E0924]" in line, line


def test_check_ignores_packaging_leftovers_and_reports_links_without_following_them(
    project: Path, tmp_path_factory
) -> None:
    for rel in [
        "build/lib/net/model.py",
        "dist/net-0.1.0.tar.gz",
        "src/net.egg-info/PKG-INFO",
        "src/net/__pycache__/model.cpython-311.pyc",
    ]:
        (project / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / "pkg" / rel).write_text("left by pip")
    result = cli(project, "net.yaml", "--name", "net", "-o", "pkg", "--check")
    assert result.exit_code == 0, result.output
    assert result.output == "pkg is up to date with its templates\n"
    secret = tmp_path_factory.mktemp("outside") / "secret.txt"
    secret.write_text("SECRET CONTENT\n")
    (project / "pkg" / "README.md").unlink()
    (project / "pkg" / "README.md").symlink_to(secret)
    result = cli(project, "net.yaml", "--name", "net", "-o", "pkg", "--check")
    assert result.exit_code == 1
    assert f"  link      README.md -> {secret} (not followed; scmc writes no links)" in result.output
    assert "SECRET" not in result.output and "missing   README.md" not in result.output


def test_an_output_path_the_system_cannot_look_at_is_a_clear_error(project: Path) -> None:
    (project / "loop").symlink_to("loop")
    long = "a" * 300
    before = snapshot(project)
    cases = {
        ("build", "net.yaml", "-o", "loop", "--force"): "error[E0903]: cannot use -o loop: a loop of symbolic links",
        ("build", "net.yaml", "-o", long): f"error[E0903]: cannot use -o {long[:200]}: File name too long",
        ("build", "net.yaml", "-o", f"{long}/x", "--check"): (
            f"error[E0903]: cannot use -o {long[:200]}: File name too long"
        ),
        ("torch", "create", "model", "net.yaml", "-o", f"{long}.py"): (
            f"error[E0903]: cannot use -o {long[:200]}: File name too long"
        ),
        ("format", "net.yaml", "-o", f"{long}.yaml"): f"error[E0903]: cannot use -o {long[:200]}: File name too long",
    }
    for args, expected in cases.items():
        result = run_scmc(project, *args)
        assert result.exit_code == 1, (args, result.output)
        assert first_error(result.output) == expected, args
        assert "internal" not in result.output and "Traceback" not in result.output
    assert snapshot(project) == before
