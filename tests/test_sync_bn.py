"""BatchNorm under DDP: SyncBatchNorm by default where torch runs it, --no-sync-bn, statistics in EMA and resume.

torch 2.14 refuses SyncBatchNorm on CPU (DDP: "SyncBatchNorm layers only work with GPU modules";
its forward raises for CPU tensors), so the 2-process gloo test checks that a BatchNorm model
trains under DDP on CPU with plain BatchNorm and says so; the conversion itself is checked on a
model without running it on a GPU. Untested here: a multi-GPU run with SyncBatchNorm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from scmc_runtime.batchnorm import CPU_REASON, sync_batchnorm
from scmc_runtime.distributed import DistInfo
from scmc_runtime.ema import ModelEma
from tests.train_support import python_env

ROOT = Path(__file__).resolve().parents[1]


def _dist(world_size: int, device: str) -> DistInfo:
    return DistInfo(0, 0, world_size, torch.device(device), "nccl" if world_size > 1 else None, True)


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))


def test_under_ddp_on_a_gpu_every_batchnorm_becomes_sync_batchnorm_with_the_same_state() -> None:
    model = _bn_model()
    before = model.state_dict()
    synced = sync_batchnorm(model, _dist(2, "cuda"))
    kinds = [type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.SyncBatchNorm, nn.SyncBatchNorm]
    after = synced.state_dict()
    assert list(after) == list(before)  # checkpoints, the EMA and export see the same names
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_no_sync_bn_one_process_or_no_batchnorm_keep_the_model() -> None:
    model = _bn_model()
    assert sync_batchnorm(model, _dist(2, "cuda"), enabled=False) is model
    assert sync_batchnorm(model, _dist(1, "cuda")) is model
    plain = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    assert sync_batchnorm(plain, _dist(2, "cuda")) is plain


def test_on_cpu_plain_batchnorm_is_kept_and_the_reason_logged() -> None:
    said = []
    model = _bn_model()
    assert sync_batchnorm(model, _dist(2, "cpu"), log=said.append) is model
    assert len(said) == 1 and CPU_REASON in said[0] and "--no-sync-bn" in said[0]
    assert sync_batchnorm(model, _dist(2, "cpu"), enabled=False, log=said.append) is model and len(said) == 1
    other_rank = DistInfo(1, 1, 2, torch.device("cpu"), "gloo", False)
    assert sync_batchnorm(model, other_rank, log=said.append) is model and len(said) == 1  # rank 0 only


@pytest.mark.parametrize("use_timm", [True, False])
def test_the_ema_averages_batchnorm_running_statistics(use_timm: bool) -> None:
    if use_timm:
        pytest.importorskip("timm")
    model = _bn_model()
    ema = ModelEma(model, decay=0.5, use_timm=use_timm)
    model.train()
    model(torch.randn(8, 3, 6, 6) * 3 + 2)  # moves the running statistics
    first = model[1].running_mean.clone()
    ema.update(model, step=1)  # step 1 copies
    assert torch.equal(ema.module[1].running_mean, first)
    model(torch.randn(8, 3, 6, 6) * 3 + 2)
    ema.update(model)  # decay 0.5: halfway between the average and the model
    expected = 0.5 * first + 0.5 * model[1].running_mean
    assert torch.allclose(ema.module[1].running_mean, expected, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 2


def test_the_generated_train_py_has_the_flag_and_converts_under_ddp() -> None:
    source = (ROOT / "tests/golden/resnet18_digits/src/resnet18_digits/train.py").read_text()
    assert "sync_bn: bool = flag(" in source and "True," in source.split("sync_bn: bool = flag(")[1][:20]
    assert "if use_sync_batchnorm(net, dist, enabled=cfg.sync_bn, log=log.warning):" in source
    assert "net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)" in source


@pytest.mark.slow
def test_two_cpu_ranks_train_a_batchnorm_model_and_say_batchnorm_stays_per_rank(tmp_path: Path) -> None:
    name = "tabularfusion"  # BatchNorm in its image branch; small enough for two ranks on two cores
    package = tmp_path / name
    shutil.copytree(ROOT / "tests" / "golden" / name, package)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", f"{name}.train", "--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--workers", "0"]
    command += ["--threads", "1", "--max-val-steps", "1", "--ci", "--no-mlflow", "--out", "runs", "--cache-dir", "data"]
    result = subprocess.run(command, env=python_env(package), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert CPU_REASON in output and output.count(CPU_REASON) == 1  # rank 0 says it, once
    state = torch.load(tmp_path / "runs" / name / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and int(state["model"]["bn1.num_batches_tracked"]) == 3
    assert int(state["ema"]["bn1.num_batches_tracked"]) == 3  # the EMA holds the statistics too
    config = json.loads((tmp_path / "runs" / name / "config.json").read_text())
    assert config["sync_bn"] is True
