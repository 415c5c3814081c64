"""One fine-tuning run shared by test_pretrained, test_curves and test_overrides (a train.py run costs
a torch import and a model build: it is made once per session, on first use).

The run: the atto ConvNeXtV2 package (10 classes) started ``--init-from`` the state dict of timm's
``convnextv2_atto`` (random weights, ``pretrained=False``, saved to disk), with ``--lr 0
--warmup-epochs 0`` so the weights barely move, two epochs of one step, ``--val-every 2``,
``--clip-grad 1.0``, ``--matmul-precision high``, recorded in MLflow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import build_package
from tests.train_support import python_env

PACKAGE = "atto_tune"
FLAGS = [
    "--image-size", "32", "--batch-size", "16", "--workers", "0", "--threads", "1", "--ci",
    "--log-every", "1", "--max-val-steps", "1", "--max-steps", "1", "--epochs", "2",
]  # fmt: skip


@dataclass(frozen=True)
class TunedRun:
    package: Path  # the built package folder (src/atto_tune)
    timm_weights: Path  # timm convnextv2_atto's state dict, as torch.save wrote it
    out: Path  # --out
    run_dir: Path
    result: subprocess.CompletedProcess
    cache: Path  # --cache-dir (the digits)


_RUNS: dict[str, TunedRun] = {}


def train_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return [*FLAGS, "--out", str(out), "--cache-dir", str(cache), *extra]


def tuned_run(factory: pytest.TempPathFactory) -> TunedRun:
    if "run" in _RUNS:
        return _RUNS["run"]
    timm = pytest.importorskip("timm")
    pytest.importorskip("PIL")
    pytest.importorskip("sklearn")
    pytest.importorskip("mlflow")
    root = factory.mktemp("tune")
    package = build_package(
        root / PACKAGE, "cfg/models/ConvNeXtV2.yaml", "-p", "backbone=atto", "-p", "num_classes=10", name=PACKAGE
    )
    torch.manual_seed(0)
    reference = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10)
    weights = root / "convnextv2_atto.pth"
    torch.save(reference.state_dict(), weights)
    out = root / "runs"
    cache = root / "data"
    args = train_args(out, cache, "--run-name", "tuned", "--init-from", str(weights))
    args += ["--lr", "0", "--warmup-epochs", "0", "--val-every", "2", "--clip-grad", "1.0", "--no-ema"]
    args += ["--matmul-precision", "high"]
    command = [sys.executable, "-m", f"{PACKAGE}.train", *args]
    result = subprocess.run(command, env=python_env(package), capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    _RUNS["run"] = TunedRun(package, weights, out, out / "tuned", result, cache)
    return _RUNS["run"]


def records(run: TunedRun) -> list[dict]:
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def mlflow_run(run: TunedRun):
    """The MLflow client of the run's store and the run itself."""
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run.out / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name(PACKAGE).experiment_id])
    return client, found


def import_model(package: Path, name: str = PACKAGE):
    """The generated package, imported from its src/ folder."""
    from tests.conftest import import_package

    return import_package(package, name)
