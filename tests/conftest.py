"""Shared fixtures: builds of the reference templates, made once per test session."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_SRC = ROOT / "runtime" / "src"
# Every test compiles for real (and writes nothing under ~/.cache); tests/test_cache.py turns
# the build cache back on in a directory of its own. Subprocesses inherit this.
os.environ["SCMC_NO_CACHE"] = "1"
if str(RUNTIME_SRC) not in sys.path:
    sys.path.insert(0, str(RUNTIME_SRC))


def build_package(out: Path, *args: str, name: str | None = None) -> Path:
    """Run `scmc build` in-process; returns the package directory. Fails the test on errors."""
    from click.testing import CliRunner

    from scmc.cli import main

    cmd = ["build", *args, "-o", str(out), "-q", "--force"]
    if name:
        cmd += ["--name", name]
    previous = os.getcwd()
    os.chdir(ROOT)  # template paths (and so the generated headers) are relative to the repo root
    try:
        result = CliRunner().invoke(main, cmd, catch_exceptions=False)
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ROOT (relative path -> bytes), to compare whole packages."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ROOT, links as links (never followed), files by their bytes, folders as "dir"."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


def cli(cwd: Path, *args: str):
    """`scmc build ARGS` in-process from the directory CWD; returns click's result."""
    from click.testing import CliRunner

    from scmc.cli import main

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, ["build", *args])
    finally:
        os.chdir(previous)


def run_scmc(cwd: Path, *args: str):
    """Any `scmc` command in-process from the directory CWD; returns click's result."""
    from click.testing import CliRunner

    from scmc.cli import main

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(previous)


def import_package(path: Path, name: str):
    """Import a built package from its src/ folder (fresh, even if a same-named one was imported)."""
    src = str(path / "src")
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    sys.path.insert(0, src)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(src)


@pytest.fixture(scope="session")
def femto_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("femto") / "convnextv2_femto"
    return build_package(
        out,
        "cfg/models/ConvNeXtV2.yaml",
        "-p",
        "backbone=femto",
        "--loss",
        "cfg/losses/cls.yaml",
        "--metric",
        "cfg/metrics/topk.yaml",
        "--dataset",  # ImageNet-sized (1000 classes, as timm's convnextv2_femto), not PACKAGE's 10 digits
        "cfg/datasets/image_folder.yaml",
    )


@pytest.fixture(scope="session")
def femto(femto_package: Path):
    return import_package(femto_package, "convnextv2_femto")


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates and golden paths are relative to the repository root."""
    monkeypatch.chdir(ROOT)
