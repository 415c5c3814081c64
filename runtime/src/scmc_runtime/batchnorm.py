"""BatchNorm under DDP: statistics over all ranks, on GPUs and on CPU.

With DDP each rank normalizes its own slice of the global batch; a synchronized BatchNorm computes
the batch mean and variance over every rank's slice instead, so a 2-rank run normalizes (and keeps
running statistics) as a 1-rank run on the whole batch would. A generated train.py converts a
model with BatchNorm layers by default (``--no-sync-bn`` keeps plain BatchNorm).

On GPUs that is ``torch.nn.SyncBatchNorm``. torch refuses it on CPU (its forward raises for CPU
tensors and DDP refuses to wrap a module holding one: "SyncBatchNorm layers only work with GPU
modules", checked with torch 2.14), so under gloo the layers become :class:`CpuSyncBatchNorm`:
the same arithmetic, written with the differentiable collectives of
``torch.distributed.nn.functional`` (the backward sums the gradients of the statistics over the
ranks, as ``SyncBatchNorm``'s does).

The converted modules have the same parameters and buffers under the same names, so
checkpoints, the EMA (which averages the running statistics like the weights, as timm's
``ModelEmaV3`` does) and ``scmc export`` see no difference.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as torch_dist
from torch import nn

from scmc_runtime.distributed import DistInfo
from scmc_runtime.train import has_batchnorm

__all__ = ["CPU_NOTE", "CpuSyncBatchNorm", "convert_cpu_sync_batchnorm", "sync_batchnorm", "use_sync_batchnorm"]

CPU_NOTE = "torch's SyncBatchNorm runs on GPUs only; on CPU the statistics are all-reduced over gloo"


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d, 2d or 3d) whose training statistics cover every rank's slice of the batch.

    Outside training, or without a process group of more than one rank, it is plain BatchNorm.
    In training each rank all-reduces the per-channel sum and count, then the sum of squared
    deviations from the global mean (two passes, as numerically safe as one rank's BatchNorm),
    normalizes with the global biased variance and moves its running statistics by the global
    mean and unbiased variance: every rank holds the same running statistics, equal to those a
    single process would compute on the whole batch.
    """

    def __init__(self, *args: Any, process_group: Optional[torch_dist.ProcessGroup] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _synced(self) -> bool:
        return (
            self.training
            and torch_dist.is_available()
            and torch_dist.is_initialized()
            and torch_dist.get_world_size(self.process_group) > 1
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._synced():
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(input)
        group = self.process_group or torch_dist.group.WORLD
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        count = input.new_full((1,), input.numel() // channels)
        totals = all_reduce(torch.cat([input.sum(dims), count]), group=group)
        n = totals[channels]
        mean = totals[:channels] / n
        centered = input - mean.view(shape)
        var = all_reduce(centered.pow(2).sum(dims), group=group) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_cpu_sync_batchnorm(module: nn.Module, process_group: Optional[torch_dist.ProcessGroup] = None) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by :class:`CpuSyncBatchNorm` (same parameters and buffers)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (nn.SyncBatchNorm, CpuSyncBatchNorm)
    ):
        synced = CpuSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean = module.running_mean
        synced.running_var = module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        converted = convert_cpu_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


def use_sync_batchnorm(
    model: nn.Module, dist: DistInfo, *, enabled: bool = True, log: Optional[Callable[[str], None]] = None
) -> bool:
    """Whether ``model``'s BatchNorm layers should be synchronized: under DDP, when ``enabled``.

    Single process, ``enabled=False`` or a model without BatchNorm: False. On CPU rank 0 says,
    through ``log``, that the layers become :class:`CpuSyncBatchNorm`.
    """
    if dist.world_size <= 1 or not enabled or not has_batchnorm(model):
        return False
    if dist.device.type == "cpu" and log is not None and dist.is_main:
        log(f"--sync-bn: {CPU_NOTE} (CpuSyncBatchNorm; --no-sync-bn keeps per-rank statistics)")
    return True


def sync_batchnorm(
    model: nn.Module, dist: DistInfo, *, enabled: bool = True, log: Optional[Callable[[str], None]] = None
) -> nn.Module:
    """``model`` with synchronized BatchNorm layers where :func:`use_sync_batchnorm` says so.

    ``torch.nn.SyncBatchNorm`` on GPUs, :class:`CpuSyncBatchNorm` on CPU.
    """
    if not use_sync_batchnorm(model, dist, enabled=enabled, log=log):
        return model
    if dist.device.type == "cpu":
        return convert_cpu_sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
