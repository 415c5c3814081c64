"""Process-group setup from the torchrun environment, per-rank seeding and small collectives.

``python -m pkg.train`` and ``torchrun --nproc_per_node=N -m pkg.train`` run the same code:
without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) everything here degrades to a single process
and no process group is created.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = [
    "DistInfo",
    "setup_distributed",
    "cleanup",
    "is_distributed",
    "seed_everything",
    "worker_init_fn",
    "all_reduce_mean",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when single-process
    is_main: bool


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) or run single-process.

    ``device`` is ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Under
    torchrun on CUDA each process uses the GPU of its ``LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = _resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)

    if world_size <= 1:
        return DistInfo(0, 0, 1, resolved, None, True)

    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set; "
            "launch with torchrun (e.g. torchrun --nproc_per_node=2 -m <pkg>.train)"
        )
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        # torchrun keeps one store for a job's whole life; a worker restarted by --max-restarts
        # would otherwise read the peers' addresses its dead predecessors left there (gloo then
        # fails with "Connection refused"). Each life writes its keys under a prefix of its own.
        store, rank, world_size = next(torch_dist.rendezvous("env://", rank, world_size))
        life = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
        store = torch_dist.PrefixStore(f"scmc/life_{life}", store)
        torch_dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    return DistInfo(rank, local_rank, world_size, resolved, backend, rank == 0)


def cleanup() -> None:
    """Leave the process group, if one was created."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, torch (CPU and CUDA) and numpy, if installed, with ``seed + rank``; returns it."""
    value = seed + rank
    random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(value % 2**32)
    return value


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give python and numpy the per-worker seed torch already chose.

    torch seeds each worker with ``base_seed + worker_id``, where ``base_seed`` comes from the
    loader's generator, so workers differ from each other and runs are reproducible.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks, as a new tensor (the input is left untouched).

    Every rank must call it. Single-process it returns a detached copy. Integer tensors are
    averaged as float32.
    """
    result = tensor.detach().clone()
    if not (result.is_floating_point() or result.is_complex()):
        result = result.float()
    if is_distributed():
        torch_dist.all_reduce(result, op=torch_dist.ReduceOp.SUM)  # gloo has no AVG
        result /= torch_dist.get_world_size()
    return result
