"""Running means of per-batch scalars, kept on the device and reduced across ranks once.

``update`` only queues device work (no ``.item()``, no host sync), so the training loop never
waits for the GPU just to book-keep a loss. ``compute`` does the single all-reduce and the
single copy to the host.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.distributed as torch_dist

from scmc_runtime.distributed import is_distributed

__all__ = ["MetricAccumulator"]

Scalar = Union[torch.Tensor, float, int]


class MetricAccumulator:
    """Batch-size-weighted means of named scalars over an epoch, across all ranks.

    >>> acc = MetricAccumulator()
    >>> acc.update({"loss": loss, "top1": top1}, n=images.shape[0])   # every step, no sync
    >>> acc.compute()                                                # once: {"loss": 0.41, ...}
    """

    def __init__(self, device: Optional[Union[str, torch.device]] = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, float] = {}

    def _dtype(self) -> torch.dtype:
        # float64 keeps long epochs exact; MPS has no float64.
        return torch.float32 if self.device is not None and self.device.type == "mps" else torch.float64

    def update(self, values: Mapping[str, Scalar], n: int = 1) -> None:
        """Add each value (a mean over ``n`` samples) with weight ``n``."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                if self.device is None:
                    self.device = value.device
                if value.numel() != 1:
                    raise ValueError(f"metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
                value = value.detach().reshape(())
            elif self.device is None:
                self.device = torch.device("cpu")
            weighted = torch.as_tensor(value, device=self.device, dtype=self._dtype()) * n
            if name in self._sums:
                self._sums[name] += weighted
                self._counts[name] += n
            else:
                self._sums[name] = weighted
                self._counts[name] = float(n)

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    def compute(self) -> Dict[str, float]:
        """Weighted means over everything seen on every rank. Every rank must call it.

        Ranks may have seen different metric names (e.g. a rank with an empty shard); names are
        agreed on first, then sums and counts travel in one all-reduce.
        """
        names = sorted(self._sums)
        distributed = is_distributed()
        if distributed:
            gathered: list = [None] * torch_dist.get_world_size()
            torch_dist.all_gather_object(gathered, names)
            names = sorted(set().union(*gathered))
        if not names:
            return {}

        device = _collective_device() if distributed else (self.device or torch.device("cpu"))
        zero = torch.zeros((), device=device, dtype=self._dtype())
        sums = torch.stack([self._sums.get(name, zero).to(device) for name in names])
        counts = torch.tensor([self._counts.get(name, 0.0) for name in names], dtype=sums.dtype, device=device)
        packed = torch.cat([sums, counts])
        if distributed:
            torch_dist.all_reduce(packed, op=torch_dist.ReduceOp.SUM)
        host: List[float] = packed.cpu().tolist()
        sums_host, counts_host = host[: len(names)], host[len(names) :]
        return {
            name: (total / count if count else float("nan"))
            for name, total, count in zip(names, sums_host, counts_host, strict=True)
        }


def _collective_device() -> torch.device:
    """Device a collective needs: the current GPU under nccl, the CPU otherwise."""
    if is_distributed() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
