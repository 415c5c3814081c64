"""BatchNorm under DDP: statistics over all ranks (``torch.nn.SyncBatchNorm``) where torch can.

With DDP each rank normalizes its own slice of the global batch; ``SyncBatchNorm`` computes the
batch mean and variance over every rank's slice instead, so a 2-rank run normalizes (and keeps
running statistics) as a 1-rank run on the whole batch would. A generated train.py converts a
model with BatchNorm layers by default (``--no-sync-bn`` keeps plain BatchNorm).

torch refuses ``SyncBatchNorm`` on CPU: its forward raises for CPU tensors and DDP refuses to
wrap a module holding one ("SyncBatchNorm layers only work with GPU modules", checked with torch
2.14). Under gloo on CPU the model keeps plain BatchNorm, with a warning; DDP then broadcasts
rank 0's buffers (running mean/var) to the other ranks before each forward, so every rank holds
rank 0's statistics.

The converted modules have the same parameters and buffers under the same names, so
checkpoints, the EMA (which averages the running statistics like the weights, as timm's
``ModelEmaV3`` does) and ``scmc export`` see no difference.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from scmc_runtime.distributed import DistInfo
from scmc_runtime.train import has_batchnorm

__all__ = ["CPU_REASON", "sync_batchnorm", "use_sync_batchnorm"]

CPU_REASON = "torch's SyncBatchNorm runs on GPUs only"


def use_sync_batchnorm(
    model: nn.Module, dist: DistInfo, *, enabled: bool = True, log: Optional[Callable[[str], None]] = None
) -> bool:
    """Whether ``model``'s BatchNorm layers should become ``SyncBatchNorm``: under DDP on a GPU, when ``enabled``.

    Single process, ``enabled=False`` or a model without BatchNorm: False. On CPU: False, and
    rank 0 says why through ``log``.
    """
    if dist.world_size <= 1 or not enabled or not has_batchnorm(model):
        return False
    if dist.device.type == "cpu":
        if log is not None and dist.is_main:
            log(
                f"--sync-bn: {CPU_REASON}; on CPU each of the {dist.world_size} ranks normalizes its own "
                "slice of the batch and DDP keeps rank 0's running statistics (pass --no-sync-bn to say so)"
            )
        return False
    return True


def sync_batchnorm(
    model: nn.Module, dist: DistInfo, *, enabled: bool = True, log: Optional[Callable[[str], None]] = None
) -> nn.Module:
    """``model`` with its BatchNorm layers as ``SyncBatchNorm`` where :func:`use_sync_batchnorm` says so."""
    if use_sync_batchnorm(model, dist, enabled=enabled, log=log):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
