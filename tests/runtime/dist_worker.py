"""Run by torchrun from test_distributed.py: exercises the runtime under a real 2-rank gloo group.

Each rank writes what it observed to ``<out_dir>/rank<r>.json``; the test asserts on it.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from scmc_runtime.checkpoint import gather_rng_states, unwrap
from scmc_runtime.distributed import all_reduce_mean, cleanup, seed_everything, setup_distributed
from scmc_runtime.ema import ModelEma
from scmc_runtime.metrics import MetricAccumulator
from scmc_runtime.signals import GracefulStop


def main(out_dir: Path) -> None:
    info = setup_distributed("cpu")
    rank = info.rank
    result = {
        "rank": rank,
        "local_rank": info.local_rank,
        "world_size": info.world_size,
        "backend": info.backend,
        "is_main": info.is_main,
        "device": str(info.device),
    }

    result["mean"] = all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * (rank + 1)])).tolist()

    metrics = MetricAccumulator()
    if rank == 0:
        metrics.update({"loss": torch.tensor(1.0)}, n=2)
        metrics.update({"loss": torch.tensor(3.0)}, n=2)
    else:
        metrics.update({"loss": torch.tensor(5.0), "top1": torch.tensor(0.5)}, n=4)
    result["metrics"] = metrics.compute()

    with GracefulStop() as stop:
        before = stop.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
        after = stop.should_stop()
        result["stop"] = {"before": before, "after": after, "requested_here": stop.requested}

    seed_everything(0, rank)
    model = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
    result["unwrapped_keys"] = sorted(unwrap(model).state_dict())
    ema = ModelEma(model, decay=0.5, use_timm=False)  # timm path: test_ema.py
    ema.update(model, step=1)
    result["ema_keys"] = sorted(ema.state_dict())
    result["ema_equals_model_after_first_update"] = all(
        torch.equal(a, b) for a, b in zip(ema.state_dict().values(), unwrap(model).state_dict().values())
    )

    states = gather_rng_states()
    result["rng_states"] = len(states)
    result["rng_states_differ"] = not torch.equal(states[0]["torch"], states[1]["torch"])

    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
