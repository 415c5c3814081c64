"""Reproducible builds: `scmc build --check`, and identical bytes wherever and by whomever a package is built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, tree_bytes

NET = """\
PARAMETERS:
  DEFAULT: {width: 4, act: ReLU}
INPUTS: [x]
INPUT_SHAPES: {x: [3]}
FLOW:
  - _jinja_yaml_: |-
      - [x, h, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ width }}}}]]
      - [h, y, act, [_obj_, {_addr_: torch.nn.{{ act }}}, _call_]]
"""


@pytest.fixture
def built(tmp_path: Path) -> Path:
    (tmp_path / "net.yaml").write_text(NET)
    result = cli(tmp_path, "net.yaml", "-o", "pkg", "-q")
    assert result.exit_code == 0, result.output
    return tmp_path


def test_check_passes_on_a_fresh_build_and_writes_nothing(built: Path) -> None:
    before = tree_bytes(built)
    result = cli(built, "net.yaml", "-o", "pkg", "--check")
    assert result.exit_code == 0, result.output
    assert result.output == "pkg is up to date with its templates\n"
    assert tree_bytes(built) == before


def test_check_reports_an_edited_generated_file_with_a_diff(built: Path) -> None:
    model = built / "pkg" / "src" / "net" / "model.py"
    model.write_text(model.read_text().replace("out_features=4", "out_features=5"))
    result = cli(built, "net.yaml", "-o", "pkg", "--check")
    assert result.exit_code == 1
    assert "pkg differs from what the templates produce now:" in result.output
    assert "  changed   src/net/model.py (+1 -1)" in result.output
    assert "--- on disk: src/net/model.py" in result.output and "+++ from templates: src/net/model.py" in result.output
    assert "-        self.fc = torch.nn.Linear(in_features=3, out_features=5, bias=True)" in result.output
    assert "+        self.fc = torch.nn.Linear(in_features=3, out_features=4, bias=True)" in result.output
    assert "rebuild with the same command and --force" in result.output
    assert "out_features=5" in model.read_text(), "--check never writes"


def test_check_reports_a_file_added_to_the_package(built: Path) -> None:
    (built / "pkg" / "src" / "net" / "notes.txt").write_text("mine")
    result = cli(built, "net.yaml", "-o", "pkg", "--check")
    assert result.exit_code == 1
    assert "  extra     src/net/notes.txt" in result.output


def test_check_reports_a_removed_file(built: Path) -> None:
    (built / "pkg" / "README.md").unlink()
    result = cli(built, "net.yaml", "-o", "pkg", "--check")
    assert result.exit_code == 1
    assert "  missing   README.md" in result.output


def test_check_reports_every_file_a_changed_parameter_touches(built: Path) -> None:
    result = cli(built, "net.yaml", "-o", "pkg", "--check", "-p", "width=8")
    assert result.exit_code == 1
    changed = sorted(line.split()[1] for line in result.output.splitlines() if line.startswith("  changed "))
    assert changed == ["README.md", "src/net/manifest.json", "src/net/model.py"]
    assert "  changed   src/net/model.py (+2 -2)" in result.output  # the -p header line and the layer
    assert cli(built, "net.yaml", "-o", "pkg", "--check", "-p", "width=4").exit_code == 1  # the header names -p
    assert cli(built, "net.yaml", "-o", "pkg", "--check").exit_code == 0


def test_check_of_a_missing_package_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "net.yaml").write_text(NET)
    result = cli(tmp_path, "net.yaml", "-o", "nowhere", "--check")
    assert result.exit_code == 1
    assert "error[E0905]: nowhere does not exist, so there is nothing to check" in result.output
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------- identical bytes

BUILD = ["cfg/models/ConvNeXtV2.yaml", "-p", "backbone=femto", "-p", "num_classes=10", "-q"]


def start_build(workdir: Path, env: dict[str, str], user: list[str] | None = None) -> subprocess.Popen:
    shutil.copytree(ROOT / "cfg", workdir / "cfg")
    if user:  # the other user writes the package next to its copy of the templates
        for path in [workdir, *workdir.rglob("*")]:
            os.chmod(path, 0o777 if path.is_dir() else 0o644)
    command = [sys.executable, "-m", "scmc", "build", *BUILD, "-o", "out"]
    return subprocess.Popen(
        [*(user or []), *command],
        cwd=workdir,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output


def _as_nobody() -> list[str] | None:
    """A command prefix that runs as `nobody`, or None where that is not possible here."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        return None
    prefix = ["setpriv", "--reuid=nobody", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import scmc, torch"], capture_output=True, text=True)
    return prefix if probe.returncode == 0 else None


def test_builds_in_other_directories_locales_time_zones_hash_seeds_and_users_are_byte_identical() -> None:
    """Two (three, as root with a `nobody` user) builds of the same templates, run side by side."""
    nobody = _as_nobody()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, tempfile.TemporaryDirectory() as c:
        os.chmod(c, 0o777)
        runs = {
            Path(a)
            / "one": start_build(Path(a) / "one", {"LANG": "C", "LC_ALL": "C", "PYTHONHASHSEED": "1", "TZ": "UTC"}),
            Path(b)
            / "deeper"
            / "two": start_build(
                Path(b) / "deeper" / "two",
                {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "4242", "TZ": "Asia/Tokyo"},
            ),
        }
        if nobody:
            runs[Path(c) / "nobody"] = start_build(
                Path(c) / "nobody", {"PYTHONHASHSEED": "7", "HOME": c, "LC_ALL": "C.UTF-8"}, user=nobody
            )
        for process in runs.values():
            finish(process)
        trees = {workdir: tree_bytes(workdir / "out") for workdir in runs}
        reference = trees[Path(a) / "one"]
        assert len(reference) >= 9
        for workdir, tree in trees.items():
            assert sorted(tree) == sorted(reference), workdir
            assert [rel for rel in reference if tree[rel] != reference[rel]] == [], workdir
        if nobody:
            assert (Path(c) / "nobody" / "out" / "pyproject.toml").stat().st_uid == 65534  # really built by nobody
