"""scmc installs from the repository with one pip command, and a package it builds travels with its
runtime: `scmc wheel` writes both wheels into one folder, and the command it prints installs them in
a fresh environment that has nothing but what the package index serves, where the package trains,
exports and predicts."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# what a clone of the repository holds that `pip install ./runtime ./` and the build read
COPIED = ("scmc", "runtime", "cfg", "pyproject.toml", "README.md")


def _leftovers(folder: str, names: list[str]) -> set[str]:
    """copytree's ignore: caches and egg-info anywhere, setuptools' `build/` only where pip leaves it,
    at the top of runtime/ (scmc/build/ is a package of ours)."""
    ignored = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(folder) == ROOT / "runtime" and "build" in names:
        ignored.add("build")
    return ignored


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert run.returncode == 0, f"$ {shlex.join(command)}\n{run.stdout}\n{run.stderr}"
    return run.stdout


@pytest.mark.slow
def test_built_wheels_install_train_export_and_predict_in_a_fresh_venv(tmp_path: Path) -> None:
    clone = tmp_path / "scmc"
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, clone / name, ignore=_leftovers)
        else:
            shutil.copyfile(source, clone / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_ = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PATH=f"{bin_}{os.pathsep}{env['PATH']}")
    pip = [str(bin_ / "python"), "-m", "pip", "install", "-q"]
    # torch pinned first so pip takes the local copy of this machine's build (as `make install` does)
    _run([*pip, "torch==2.14.1", "torchvision==0.29.1"], tmp_path, env, timeout=600)

    # scmc from the repository: one pip command (README, "Install")
    _run([*pip, "./runtime", "./[export,timm]"], clone, env)
    _run(
        ["scmc", "build", "cfg/models/ConvNeXtV2.yaml", "-p", "backbone=atto", "-p", "num_classes=10", "-q"], clone, env
    )
    package = clone / "artifacts" / "convnextv2_atto"
    card = (package / "README.md").read_text()
    wheel_line, install_line = card.split("```bash\nscmc wheel", 1)[1].split("\n")[:2]
    assert wheel_line == " . -o ../dist"
    printed = _run(["scmc", "wheel", ".", "-o", "../dist"], package, env)
    assert printed.splitlines() == [
        "wrote ../dist/convnextv2_atto-0.1.0-py3-none-any.whl",
        "wrote ../dist/scmc_runtime-0.1.0-py3-none-any.whl",
        f"install with: {install_line}",
    ]
    assert install_line == (
        "pip install ../dist/scmc_runtime-0.1.0-py3-none-any.whl "
        "'../dist/convnextv2_atto-0.1.0-py3-none-any.whl[predict,train]'"
    )
    assert sorted(p.name for p in package.rglob("*") if p.is_file()) == [
        "README.md",
        "__init__.py",
        "backward.py",
        "loss.py",
        "manifest.json",
        "metric.py",
        "model.py",
        "predict.py",
        "pyproject.toml",
        "train.py",
    ], "scmc wheel must not write into the package folder"

    # the runtime came from the installed distribution (not a checkout): remove it and scmc, so
    # what the package runs on below is only the folder's wheels and the index
    _run([str(bin_ / "python"), "-m", "pip", "uninstall", "-q", "-y", "scmc", "scmc-runtime"], clone, env)
    _run([str(bin_ / "python"), "-m", *shlex.split(install_line), "-q"], package, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    requires = _run(
        [
            str(bin_ / "python"),
            "-c",
            "import importlib.metadata as m, scmc_runtime; print(scmc_runtime.__file__); "
            "print('\\n'.join(m.requires('convnextv2-atto')))",
        ],
        work,
        env,
    )
    assert requires.startswith(str(venv)), "scmc_runtime must come from the folder's wheel, installed in the venv"
    assert not any(n in requires.lower() for n in ("scmc==", "scmc>", "structcast", "ruamel")), requires

    train = [str(bin_ / "python"), "-m", "convnextv2_atto.train", "--epochs", "1", "--max-steps", "2"]
    train += ["--max-val-steps", "1", "--batch-size", "8", "--image-size", "32", "--workers", "0", "--ci"]
    train += ["--no-mlflow", "--out", "runs", "--run-name", "fresh", "--cache-dir", "data"]
    _run(train, work, env)
    checkpoint = work / "runs" / "fresh" / "last.pt"
    assert checkpoint.is_file()

    # export is the compiler's job: run it from this checkout (the fresh venv has no scmc any more)
    host = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime" / "src")])}
    _run(
        [sys.executable, "-m", "scmc", "export", str(package), "--checkpoint", str(checkpoint)]
        + ["--format", "onnx", "--latency-rounds", "0", "-q"],
        work,
        host,
    )
    onnx = work / "runs" / "fresh" / "export" / "model.onnx"
    assert onnx.is_file()
    image = next((work / "data").rglob("*.png"))
    out = _run([str(bin_ / "python"), "-m", "convnextv2_atto.predict", "--onnx", str(onnx), str(image)], work, env)
    assert image.name in out, out
