"""Every committed golden package runs: forward, loss and metric in-process, one training step.

tests/test_build.py checks the goldens byte for byte; this checks that those bytes work. Each
package is copied out of tests/golden/ first (importing or running it would write
``__pycache__`` next to the golden files). Its model runs forward on a batch of its input shape;
its loss and metric run on that output and on labels of the kind the package's dataset preset
declares (class indices, or one-hot probabilities with ``targets: soft``); where it has a
train.py, ``python -m <pkg>.train`` runs one training step and one validation step on the
embedded digits.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import import_package
from tests.golden.cases import CASES
from tests.train_support import python_env

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
PACKAGES = sorted(p.name for p in GOLDEN.iterdir() if (p / "pyproject.toml").is_file())
TINY = [
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--threads",
    "1",
    "--epochs",
    "1",
    "--max-steps",
    "1",
    "--max-val-steps",
    "1",
    "--ci",
    "--no-mlflow",
]


def test_every_golden_package_is_a_case_and_is_run_here() -> None:
    assert PACKAGES == sorted(CASES)


@pytest.fixture
def package(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str, dict]:
    name = request.param
    copy = tmp_path / name
    shutil.copytree(GOLDEN / name, copy)
    manifest = json.loads((copy / "src" / name / "manifest.json").read_text())
    return copy, name, manifest


def _kwargs(module: torch.nn.Module, outputs: dict[str, torch.Tensor], labels: torch.Tensor, dataset: dict) -> dict:
    """A loss/metric graph's inputs: model outputs by name, an image table's `target` its regression
    targets, anything else is the label."""
    names = list(inspect.signature(module.forward).parameters)
    if dataset.get("kind") == "image_table":
        outputs = {**outputs, "target": torch.randn(labels.shape[0], dataset["num_targets"])}
    return {n: outputs[n] if n in outputs else labels for n in names}


@pytest.mark.parametrize("package", PACKAGES, indirect=True)
def test_the_golden_model_loss_and_metric_run(package) -> None:
    path, name, manifest = package
    pkg = import_package(path, name)
    torch.manual_seed(0)
    model = getattr(pkg, manifest["classes"]["model"])().eval()
    inputs = [torch.randn(2, *spec["shape"]) for spec in manifest["input_shapes"].values()]  # image (, tabular)
    with torch.no_grad():
        result = model(*inputs)
    outputs = result if isinstance(result, dict) else dict(zip(manifest["outputs"]["model"], (result,)))
    assert list(outputs) == manifest["outputs"]["model"]
    dataset = manifest["presets"].get("dataset", {})
    classes = dataset.get("num_classes")
    logits = outputs[manifest["outputs"]["model"][0]]
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()  # the head fits the data
    labels = torch.tensor([3, 7])
    targets = torch.nn.functional.one_hot(labels, classes).float() if dataset.get("targets") == "soft" else labels
    if "loss" in manifest["classes"]:
        loss = getattr(pkg, manifest["classes"]["loss"])()
        values = loss(**_kwargs(loss, outputs, targets, dataset))
        if not isinstance(values, dict):  # one tensor, or a tuple of several (ce_loss, reg_loss, loss)
            values = dict(zip(manifest["outputs"]["loss"], values if isinstance(values, tuple) else (values,)))
        assert list(values) == manifest["outputs"]["loss"]
        assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in values.values())
    if "metric" in manifest["classes"]:
        metric = getattr(pkg, manifest["classes"]["metric"])()
        values = metric(**_kwargs(metric, outputs, labels, dataset))  # metrics take class indices
        values = values if isinstance(values, dict) else dict(zip(manifest["outputs"]["metric"], values))
        assert list(values) == manifest["outputs"]["metric"]
        assert all(0 <= float(v) <= 1 for v in values.values())


@pytest.mark.parametrize("package", PACKAGES, indirect=True)
def test_the_golden_package_trains_one_step(package, tmp_path: Path) -> None:
    path, name, _ = package
    if not (path / "src" / name / "train.py").is_file():
        pytest.skip(f"{name} has no train.py")
    out, cache = tmp_path / "runs", tmp_path / "data"
    command = [sys.executable, "-m", f"{name}.train", *TINY, "--out", str(out), "--cache-dir", str(cache)]
    result = subprocess.run(command, env=python_env(path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if "val_ce_loss" in r]
    assert epoch and all(v == v for v in epoch[-1].values() if isinstance(v, float))  # no NaN
    assert (out / name / "best.pt").is_file()
