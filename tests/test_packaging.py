"""The generated package as a distribution: its pyproject's formatter settings, `scmc wheel`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from click.testing import CliRunner

from scmc.cli import main
from tests.conftest import ROOT, tree_bytes


def black_check(package: Path) -> subprocess.CompletedProcess:
    """`black --check .` inside the package: black reads the package's own pyproject.toml."""
    return subprocess.run(
        [sys.executable, "-m", "black", "--check", "."], cwd=package, capture_output=True, text=True, check=False
    )


def test_a_built_package_passes_black_check_with_its_own_pyproject(femto_package: Path) -> None:
    pyproject = tomllib.loads((femto_package / "pyproject.toml").read_text())
    assert pyproject["tool"]["black"] == {"line-length": 100}
    assert pyproject["tool"]["ruff"] == {"line-length": 100}
    result = black_check(femto_package)
    assert result.returncode == 0, result.stderr
    assert "would be left unchanged" in result.stderr


def test_black_check_of_a_package_skips_file_layers_kept_as_their_author_wrote_them(tmp_path: Path) -> None:
    (tmp_path / "blocks.py").write_text(
        "import torch\nclass Scale(torch.nn.Module):\n    def forward(self,x):\n        return x*2\n"
    )
    (tmp_path / "net.yaml").write_text(
        "INPUT_SHAPES: {x: [4]}\nOUTPUTS: [y]\nFLOW:\n"
        "  - [x, y, scale, [_obj_, {_addr_: Scale, _file_: blocks.py}, {_call_}]]\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["build", str(tmp_path / "net.yaml"), "--allow-module", "blocks", "-o", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    name = next((out / "src").iterdir()).name
    assert (out / "src" / name / "blocks.py").read_text() == (tmp_path / "blocks.py").read_text()
    pyproject = tomllib.loads((out / "pyproject.toml").read_text())
    assert pyproject["tool"]["ruff"]["extend-exclude"] == [f"src/{name}/blocks.py"]
    result = black_check(out)
    assert result.returncode == 0, result.stderr
    # the exclusion is exact: the same file under a generated name would be checked
    (out / "src" / name / "model_copy.py").write_text((tmp_path / "blocks.py").read_text())
    assert black_check(out).returncode == 1


def wheel_cli(*args: str):
    return CliRunner().invoke(main, ["wheel", *args])


def wheel_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {n: archive.read(n) for n in archive.namelist()}


def test_scmc_wheel_writes_the_package_and_runtime_wheels_and_the_install_command(
    femto_package: Path, tmp_path: Path
) -> None:
    before = tree_bytes(femto_package)
    out = tmp_path / "dist"
    result = wheel_cli(str(femto_package), "-o", str(out))
    assert result.exit_code == 0, result.output
    package, runtime = out / "convnextv2_femto-0.1.0-py3-none-any.whl", out / "scmc_runtime-0.1.0-py3-none-any.whl"
    assert result.output.splitlines() == [
        f"wrote {package}",
        f"wrote {runtime}",
        f"install with: pip install {runtime} '{package}[predict,train]'",
    ]
    assert sorted(p.name for p in out.iterdir()) == [package.name, runtime.name]
    members = wheel_members(package)
    for stem in ("model", "loss", "metric", "backward", "train", "predict", "__init__"):
        assert members[f"convnextv2_femto/{stem}.py"] == before[f"src/convnextv2_femto/{stem}.py"]
    assert "convnextv2_femto/manifest.json" in members
    metadata = members["convnextv2_femto-0.1.0.dist-info/METADATA"].decode()
    assert "Requires-Dist: scmc-runtime<0.2,>=0.1.0" in metadata
    runtime_members = wheel_members(runtime)
    assert runtime_members["scmc_runtime/layers.py"] == (ROOT / "runtime/src/scmc_runtime/layers.py").read_bytes()
    assert tree_bytes(femto_package) == before, "scmc wheel must not write into the package folder"
    # again: the earlier wheels are replaced (they are wheels of the same distribution and version)
    again = wheel_cli(str(femto_package), "-o", str(out), "-q")
    assert again.exit_code == 0, again.output
    assert again.output.splitlines() == [result.output.splitlines()[-1]]


def test_an_installed_runtime_is_repacked_into_the_same_wheel(femto_package: Path, tmp_path: Path) -> None:
    first = wheel_cli(str(femto_package), "-o", str(tmp_path / "dist"), "-q")
    assert first.exit_code == 0, first.output
    original = tmp_path / "dist" / "scmc_runtime-0.1.0-py3-none-any.whl"
    site = tmp_path / "site"  # the runtime as pip installs it: package + dist-info, no source project
    with zipfile.ZipFile(original) as archive:
        archive.extractall(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, "-m", "scmc", "wheel", str(femto_package), "-o", str(tmp_path / "again")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    repacked = wheel_members(tmp_path / "again" / original.name)
    expected = wheel_members(original)
    info = "scmc_runtime-0.1.0.dist-info"
    assert sorted(repacked) == sorted(expected)
    for name, data in expected.items():
        if name not in (f"{info}/RECORD", f"{info}/WHEEL"):
            assert repacked[name] == data, name
    record = repacked[f"{info}/RECORD"].decode().splitlines()
    assert sorted(line.split(",")[0] for line in record) == sorted(repacked)


def test_scmc_wheel_refuses_a_folder_that_is_not_an_scmc_package(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    result = wheel_cli(str(tmp_path), "-o", str(tmp_path / "dist"))
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        f"error[E1300]: {tmp_path} is not a package built by scmc (no src/<package>/manifest.json)"
    )
    assert not (tmp_path / "dist").exists()


def test_scmc_wheel_never_overwrites_a_file_it_did_not_write(femto_package: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    out.mkdir()
    mine = out / "scmc_runtime-0.1.0-py3-none-any.whl"
    mine.write_text("my notes")
    result = wheel_cli(str(femto_package), "-o", str(out))
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        f"error[E1303]: {mine} exists and is not a wheel of the same distribution and version"
    )
    assert mine.read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == [mine.name], "nothing else was written"


def test_scmc_wheel_refuses_a_package_holding_a_link(femto_package: Path, tmp_path: Path) -> None:
    import shutil

    package = tmp_path / "pkg"
    shutil.copytree(femto_package, package)
    link = package / "src" / "convnextv2_femto" / "secrets.txt"
    link.symlink_to("/etc/passwd")
    result = wheel_cli(str(package), "-o", str(tmp_path / "dist"))
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        f"error[E1304]: {link} is a link or a special file; a wheel holds only the package's own regular files"
    )
    assert not (tmp_path / "dist").exists()


def test_scmc_wheel_never_writes_into_the_package_folder(femto_package: Path, tmp_path: Path) -> None:
    before = tree_bytes(femto_package)
    result = wheel_cli(str(femto_package), "-o", str(femto_package / "dist"))
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        f"error[E1303]: {femto_package / 'dist'} is inside the package folder {femto_package}; "
        "scmc never writes into its input"
    )
    assert tree_bytes(femto_package) == before
