"""The runtime's Trainer, called from Python: a built package trains without its command line."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from scmc_runtime.errors import TrainError
from scmc_runtime.trainer import Batch, ImageData, Trainer
from tests.conftest import import_package

ROOT = Path(__file__).resolve().parents[2]
NAME = "resnet18_digits"  # a golden package whose head has the digits' 10 classes


@pytest.fixture
def train_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    copy = tmp_path / NAME
    shutil.copytree(ROOT / "tests" / "golden" / NAME, copy)
    import_package(copy, NAME)
    return importlib.import_module(f"{NAME}.train")


def _config(train, tmp_path: Path, **changes):
    tiny = dict(image_size=32, batch_size=8, workers=0, threads=1, epochs=1, max_steps=2, max_val_steps=1, ci=True)
    files = dict(mlflow=False, out=str(tmp_path / "runs"), cache_dir=str(tmp_path / "data"))
    return train.TrainConfig(**{**tiny, **files, **changes})


def test_a_built_package_trains_two_steps_through_the_runtime_trainer(train_module, tmp_path: Path) -> None:
    train = train_module
    seen: list[int] = []

    def forward(model: torch.nn.Module, batch: Batch):
        seen.append(len(batch))
        return train.forward(model, batch)

    trainer = Trainer(
        _config(train, tmp_path),
        package=NAME,
        model=train.Model,
        loss=train.Loss,
        metric=train.Metric,
        backward=train.Backward,
        forward=forward,
        compute_losses=train.compute_losses,
        compute_metrics=train.compute_metrics,
        backward_step=train.backward_step,
        losses=train.LOSSES,
        metrics=train.METRICS,
        data=ImageData(),
    )
    result = trainer.fit()

    assert result.global_step == 2 and not result.stopped
    assert result.run_dir == tmp_path / "runs" / NAME
    assert result.checkpoint == result.run_dir / "best.pt" and result.checkpoint.is_file()
    assert result.best["metric"] == "val_acc1" and result.best["epoch"] == 1
    # two training batches of 8, then validation (one batch) of the raw and of the EMA weights
    assert seen[-4:-2] == [8, 8] and len(seen) >= 4
    last = torch.load(result.run_dir / "last.pt", weights_only=True)
    assert last["global_step"] == 2 and last["epoch"] == 1 and last["package"] == NAME
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records][0] == "start" and records[-1]["event"] == "end"
    epoch = next(r for r in records if r["event"] == "epoch")
    assert math.isfinite(epoch["val_ce_loss"]) and math.isfinite(epoch["ema_val_ce_loss"])


def test_make_trainer_is_the_cli_run_and_resumes_from_python(train_module, tmp_path: Path) -> None:
    train = train_module
    first = train.make_trainer(_config(train, tmp_path, run_name="run")).fit()
    assert isinstance(train.make_trainer(_config(train, tmp_path)), Trainer)
    again = train.make_trainer(_config(train, tmp_path, run_name="run", epochs=2, resume="auto"))
    with pytest.raises(TrainError, match="--epochs 1, not --epochs 2"):  # a resume is not re-planned
        again.fit()
    finished = train.make_trainer(_config(train, tmp_path, run_name="run", resume="auto")).fit()
    assert finished.global_step == first.global_step == 2  # nothing left to train
