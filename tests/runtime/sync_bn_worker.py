"""Run by torchrun from tests/test_sync_bn.py: CpuSyncBatchNorm on 2 gloo ranks vs one process on the whole batch.

Every rank trains three SGD steps of the same small BatchNorm network under DDP on its half of a
batch of 8, and also -- alone, in this process -- a copy on the whole batch. It writes the largest
differences it saw (outputs, gradients, weights, running statistics, eval outputs) to
``<out_dir>/rank<r>.json``, once with the layers synchronized and once with plain per-rank BatchNorm.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from scmc_runtime.batchnorm import CpuSyncBatchNorm, sync_batchnorm
from scmc_runtime.distributed import cleanup, setup_distributed


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, momentum=None),  # the cumulative average, too
    )


def largest(left: torch.Tensor, right: torch.Tensor) -> float:
    return float((left.detach().double() - right.detach().double()).abs().max())


def compare(synced: bool, info) -> dict:
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, 8, 8, generator=generator) * 2 + 1, torch.randn(8, 5, generator=generator)) for _ in range(3)
    ]
    half = slice(4 * info.rank, 4 * info.rank + 4)

    reference = network()
    model = network()
    if synced:
        model = sync_batchnorm(model, info)
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, ddp)]
    seen = {"outputs": 0.0, "grads": 0.0}
    for images, targets in batches:
        expected = reference(images)
        ((expected - targets) ** 2).mean().backward()
        got = ddp(images[half])
        ((got - targets[half]) ** 2).mean().backward()
        seen["outputs"] = max(seen["outputs"], largest(got, expected[half]))
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            seen["grads"] = max(seen["grads"], largest(mine.grad, theirs.grad))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    state, expected_state = model.state_dict(), reference.state_dict()
    seen["weights"] = max(largest(state[k], expected_state[k]) for k in expected_state if "running" not in k)
    seen["running"] = max(largest(state[k], expected_state[k]) for k in expected_state if "running" in k)
    seen["tracked"] = [int(state[k]) for k in state if k.endswith("num_batches_tracked")]
    model.eval()
    reference.eval()
    with torch.no_grad():
        seen["eval"] = largest(model(batches[0][0]), reference(batches[0][0]))
    seen["kinds"] = kinds
    seen["keys_equal"] = list(state) == list(expected_state)
    return seen


def main(out_dir: Path) -> None:
    info = setup_distributed("cpu")
    result = {"synced": compare(True, info), "per_rank": compare(False, info)}
    result["is_cpu_sync"] = CpuSyncBatchNorm.__name__ in result["synced"]["kinds"]
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(result))
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
