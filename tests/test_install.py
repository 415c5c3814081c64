"""The generated package installs into a fresh environment with only torch, timm and the runtime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_package_installs_and_runs_in_a_fresh_venv(femto_package: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    # torch pinned first so pip takes the local copy of this machine's build
    subprocess.run([*pip, "torch==2.14.1", "torchvision==0.29.1"], check=True, env=env)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT / "runtime"), "-w", str(wheels)], check=True
    )
    subprocess.run([*pip, "timm", *map(str, wheels.glob("*.whl")), str(femto_package)], check=True, env=env)
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    for absent in ("scmc==", "structcast", "ruamel"):  # jinja2 and pyyaml come with torch and timm
        assert absent not in listed, f"{absent} must not be needed by the generated package"
    code = (
        "import torch, convnextv2_femto as p\n"
        "m = p.Model().eval()\n"
        "print(tuple(m(torch.randn(2, 3, 224, 224))['cls'].shape))\n"
        "print(p.Loss()(torch.tensor([1, 2]), torch.randn(2, 10)).ndim)\n"
    )
    run = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["(2,", "1000)", "0"]
