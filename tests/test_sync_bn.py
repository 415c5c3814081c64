"""BatchNorm under DDP: synchronized statistics on GPUs and CPUs, --no-sync-bn, statistics in EMA and resume.

torch 2.14 refuses SyncBatchNorm on CPU (DDP: "SyncBatchNorm layers only work with GPU modules";
its forward raises for CPU tensors), so on CPU the runtime's CpuSyncBatchNorm all-reduces the
statistics over gloo. Two real gloo processes check it against one process on the whole batch
(outputs, gradients, weights and running statistics), and a generated package trained on two
ranks follows the loss curve of one rank with the whole batch. The GPU conversion
(torch.nn.SyncBatchNorm) is checked on a model without running it; untested here: a multi-GPU run.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from scmc_runtime.batchnorm import CPU_NOTE, CpuSyncBatchNorm, sync_batchnorm
from scmc_runtime.distributed import DistInfo
from scmc_runtime.ema import ModelEma
from tests.train_support import python_env, run_job

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


def test_on_cpu_the_layers_become_cpu_sync_batchnorm_with_the_same_state_and_rank_0_says_so() -> None:
    said = []
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = sync_batchnorm(model, _dist(2, "cpu"), log=said.append)
    kinds = [type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [CpuSyncBatchNorm, CpuSyncBatchNorm]
    after = synced.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert len(said) == 1 and CPU_NOTE in said[0] and "--no-sync-bn" in said[0]
    other_rank = DistInfo(1, 1, 2, torch.device("cpu"), "gloo", False)
    assert sync_batchnorm(_bn_model(), other_rank, log=said.append) is not None and len(said) == 1  # rank 0 only
    kept = _bn_model()
    assert sync_batchnorm(kept, _dist(2, "cpu"), enabled=False, log=said.append) is kept and len(said) == 1


def test_cpu_sync_batchnorm_without_a_process_group_is_plain_batchnorm() -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, momentum=0.3)
    synced = CpuSyncBatchNorm(4, momentum=0.3)
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(6, 4, 5, 5) * 3 + 1
    assert torch.allclose(synced(x), plain(x), atol=1e-6)
    assert torch.allclose(synced.running_var, plain.running_var) and torch.equal(
        synced.num_batches_tracked, plain.num_batches_tracked
    )
    synced.eval(), plain.eval()
    assert torch.allclose(synced(x), plain(x), atol=1e-6)


@pytest.mark.slow
def test_two_gloo_ranks_with_cpu_sync_batchnorm_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(ROOT / "tests" / "runtime" / "sync_bn_worker.py"), str(tmp_path)]
    result = run_job(command, env=python_env(tmp_path), timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        synced, per_rank = seen["synced"], seen["per_rank"]
        assert seen["is_cpu_sync"] and synced["keys_equal"] and synced["tracked"] == [3, 3]
        # Three SGD steps: outputs, DDP-averaged gradients, weights, running statistics, eval outputs.
        for what in ("outputs", "grads", "weights", "running", "eval"):
            assert synced[what] < 2e-5, (rank, what, synced[what])
            assert per_rank[what] > 1e-2, (rank, what, per_rank[what])  # plain BatchNorm per rank differs


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
    # the conversion is the runtime Trainer's, which every generated train.py hands its model to
    assert "return Trainer(" in source
    trainer = (ROOT / "runtime/src/scmc_runtime/trainer.py").read_text()
    assert "net = sync_batchnorm(net, dist, enabled=cfg.sync_bn, log=log.warning)" in trainer


def _train(package: Path, cwd: Path, run: str, ranks: int, *extra: str) -> str:
    name = package.name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += ["-m", f"{name}.train", "--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--workers", "0"]
    command += ["--threads", "1", "--max-val-steps", "1", "--ci", "--no-mlflow", "--out", "runs", "--cache-dir", "data"]
    command += ["--log-every", "1", "--run-name", run, *extra]
    result = run_job(command, env=python_env(package), timeout=600, cwd=cwd)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def _curve(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("event") == "step"]
    keys = sorted(k for k in steps[0] if k.startswith("train_step_") and k.endswith("loss"))
    return [r[k] for r in steps for k in keys]


@pytest.mark.slow
def test_two_cpu_ranks_with_synced_batchnorm_follow_one_rank_on_the_whole_batch(tmp_path: Path) -> None:
    name = "tabularfusion"  # BatchNorm in its image branch; small enough for two ranks on two cores
    package = tmp_path / name
    shutil.copytree(ROOT / "tests" / "golden" / name, package)
    _train(package, tmp_path, "one", 1)
    output = _train(package, tmp_path, "two", 2)
    _train(package, tmp_path, "per_rank", 2, "--no-sync-bn")
    assert output.count(CPU_NOTE) == 1  # rank 0 says it, once

    runs = tmp_path / "runs"
    one, two, per_rank = _curve(runs / "one"), _curve(runs / "two"), _curve(runs / "per_rank")
    assert len(one) == len(two) >= 3
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)
    assert per_rank != pytest.approx(one, rel=1e-4, abs=1e-6)  # plain BatchNorm per rank: another curve
    state, single = (torch.load(runs / r / "last.pt", weights_only=True) for r in ("two", "one"))
    assert state["world_size"] == 2 and int(state["model"]["bn1.num_batches_tracked"]) == 3
    assert int(state["ema"]["bn1.num_batches_tracked"]) == 3  # the EMA holds the statistics too
    for key in ("bn1.running_mean", "bn1.running_var"):
        assert torch.allclose(state["model"][key], single["model"][key], rtol=1e-4, atol=1e-5), key
    config = json.loads((runs / "two" / "config.json").read_text())
    assert config["sync_bn"] is True
