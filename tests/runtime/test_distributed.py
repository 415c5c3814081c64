"""Distributed setup, seeding and collectives: single-process and a real 2-rank torchrun/gloo job."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

import scmc_runtime
from scmc_runtime.distributed import all_reduce_mean, seed_everything, setup_distributed, worker_init_fn

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_setup_is_single_process_on_the_requested_device(no_torchrun_env):
    info = setup_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size) == (0, 0, 1)
    assert info.backend is None and info.is_main
    assert info.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()


def test_world_size_one_is_treated_as_single_process(no_torchrun_env):
    no_torchrun_env.setenv("WORLD_SIZE", "1")
    assert setup_distributed("cpu").backend is None


def test_several_ranks_without_a_master_address_fail_with_a_hint_to_use_torchrun(no_torchrun_env):
    no_torchrun_env.setenv("WORLD_SIZE", "2")
    no_torchrun_env.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT.*torchrun"):
        setup_distributed("cpu")


def test_seed_everything_offsets_the_seed_by_rank_and_is_reproducible():
    def draw():
        return random.random(), torch.rand(()).item(), numpy.random.rand()

    assert seed_everything(7, rank=1) == 8
    first = draw()
    seed_everything(7, rank=1)
    assert draw() == first
    seed_everything(7, rank=0)
    assert draw() != first


def test_worker_init_fn_seeds_python_and_numpy_from_the_worker_torch_seed():
    torch.manual_seed(1234)
    worker_init_fn(0)
    expected = random.Random(1234).random()
    assert random.random() == expected
    assert numpy.random.rand() == numpy.random.RandomState(1234).rand()


def test_all_reduce_mean_in_a_single_process_returns_a_detached_copy():
    value = torch.tensor([1.0, 2.0], requires_grad=True)
    mean = all_reduce_mean(value)
    assert torch.equal(mean, value.detach()) and mean is not value and not mean.requires_grad
    assert all_reduce_mean(torch.tensor([3])).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# One real 2-rank job, shared by the tests below (starting it costs a few seconds).


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    runtime_src = str(Path(scmc_runtime.__file__).resolve().parents[1])
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [runtime_src, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).with_name("dist_worker.py")), str(out_dir),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_torchrun_environment_gives_each_process_its_rank_and_a_gloo_group(two_ranks):
    for rank, result in enumerate(two_ranks):
        assert (result["rank"], result["local_rank"], result["world_size"]) == (rank, rank, 2)
        assert result["backend"] == "gloo" and result["device"] == "cpu"
        assert result["is_main"] == (rank == 0)


@pytest.mark.slow
def test_all_reduce_mean_averages_over_ranks(two_ranks):
    for result in two_ranks:
        assert result["mean"] == [1.5, 15.0]


@pytest.mark.slow
def test_metric_accumulator_weights_by_batch_size_across_ranks_and_agrees_on_names(two_ranks):
    for result in two_ranks:
        assert result["metrics"] == {"loss": pytest.approx((1 * 2 + 3 * 2 + 5 * 4) / 8), "top1": 0.5}


@pytest.mark.slow
def test_a_signal_on_one_rank_makes_every_rank_stop(two_ranks):
    for rank, result in enumerate(two_ranks):
        assert result["stop"] == {"before": False, "after": True, "requested_here": rank == 1}


@pytest.mark.slow
def test_ema_of_a_ddp_model_averages_the_unwrapped_module(two_ranks):
    for result in two_ranks:
        assert result["unwrapped_keys"] == result["ema_keys"] == ["bias", "weight"]
        assert result["ema_equals_model_after_first_update"]


@pytest.mark.slow
def test_rng_states_are_gathered_from_every_rank(two_ranks):
    for result in two_ranks:
        assert result["rng_states"] == 2 and result["rng_states_differ"]
