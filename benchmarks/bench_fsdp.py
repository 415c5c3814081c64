"""FSDP2 (``--strategy fsdp``) against DDP at 2 ranks: per-rank training state bytes, and steps per second.

Memory: the generated ConvNeXtV2-base (``-p backbone=base``, 1000 classes, 88.7 M parameters) is
set up as the generated train.py sets it up on each of 2 gloo ranks on CPU -- DDP
(``DistributedDataParallel``) or FSDP (``scmc_runtime.fsdp.shard_model``: ``fully_shard`` per
``Block``, then the root) -- with its compiled ``Backward`` (AdamW), and takes one real
training step (one 32x32 image per rank), so gradients and optimizer state exist. The figure
is what one rank holds of parameters + gradients + optimizer state, summed from the tensors'
local sizes (``scmc_runtime.fsdp.local_bytes``: a DTensor counts its local shard only).
Transient all-gather buffers and activations are not counted: they depend on the batch, not
on the model. Goal: FSDP <= 0.55 x DDP.

Speed: the generated ConvNeXtV2-atto at 32x32, global batch 32 (16 per rank), one thread per
rank, DDP and FSDP models in the same two processes, timed in interleaved rounds (order
rotating per round) of a few training steps each; median seconds per step. Report only: on
CPU with gloo, FSDP pays an all-gather per unit in forward and backward and a reduce-scatter
per unit, DDP one bucketed all-reduce.

    .venv/bin/python benchmarks/bench_fsdp.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from _common import PYTHON, ROOT, SCMC, Result, goal, main_for, median, progress, run_process, spread

GOAL_RATIO = 0.55
WORLD = 2
IMAGE_SIZE = 32
BATCH = 32  # global, for the speed rounds

WORKER = r"""
import json, os, sys, time, warnings
import torch, torch.distributed as dist
import torch.multiprocessing as mp

cfg = json.loads(sys.argv[1])
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")  # DDP, channels-last grads


def setup(rank):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]), RANK=str(rank), WORLD_SIZE=str(cfg["world"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cfg["world"])
    from scmc_runtime.distributed import DistInfo
    return DistInfo(rank, rank, cfg["world"], torch.device("cpu"), "gloo", rank == 0)


def prepared(module, strategy, info):
    from scmc_runtime.fsdp import shard_model
    torch.manual_seed(0)
    net = module.Model()
    model, sharding = net, None
    if strategy == "fsdp":
        sharding = shard_model(net, info, autocast_dtype=module.Backward.autocast_dtype)
    else:
        model = torch.nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True)
    backward = module.Backward(net, updates_per_epoch=1000, epochs=1)
    return net, model, backward, sharding


def step(model, backward, batch, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], generator=g)
    labels = torch.randint(0, cfg["classes"], (batch,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(images)["cls"], labels)
    backward(ce_loss=loss)


def memory(rank):
    import importlib
    from scmc_runtime.fsdp import local_bytes
    info = setup(rank)
    sys.path.insert(0, cfg["base_src"])
    module = importlib.import_module(cfg["base"])
    out = {}
    for strategy in ("ddp", "fsdp"):
        net, model, backward, sharding = prepared(module, strategy, info)
        # One step, with the optimizer's zero_grad keeping the gradients (set_to_none=False semantics):
        # run forward/backward by hand so the gradients are still there to be counted.
        g = torch.Generator().manual_seed(rank)
        images = torch.randn(1, 3, cfg["image_size"], cfg["image_size"], generator=g)
        loss = torch.nn.functional.cross_entropy(model(images)["cls"], torch.tensor([rank]))
        loss.backward()
        for opt in backward.optimizers.values():
            opt.step()  # creates the optimizer state; the gradients stay for the count
        optimizers = [getattr(o, "optimizer", o) for o in backward.optimizers.values()]
        out[strategy] = local_bytes(net, optimizers)
        out[strategy]["units"] = sharding.units if sharding is not None else 0
        out[strategy]["unit"] = sharding.unit if sharding is not None else None
        del net, model, backward
    gathered = [None] * cfg["world"]
    dist.all_gather_object(gathered, out)
    if rank == 0:
        with open(cfg["out"], "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def speed(rank):
    import importlib
    info = setup(rank)
    sys.path.insert(0, cfg["small_src"])
    module = importlib.import_module(cfg["small"])
    per_rank = cfg["batch"] // cfg["world"]
    subjects = {s: prepared(module, s, info) for s in ("ddp", "fsdp")}
    for name, (net, model, backward, _) in subjects.items():  # warm-up
        step(model, backward, per_rank, 0)
    times = {name: [] for name in subjects}
    names = list(subjects)
    for r in range(cfg["rounds"]):
        order = names[r % 2:] + names[:r % 2]
        for name in order:
            net, model, backward, _ = subjects[name]
            dist.barrier()
            start = time.perf_counter()
            for i in range(cfg["steps"]):
                step(model, backward, per_rank, 1 + r * cfg["steps"] + i)
            dist.barrier()
            times[name].append((time.perf_counter() - start) / cfg["steps"])
        if rank == 0:
            print(f"  round {r + 1}/{cfg['rounds']}: " + ", ".join(f"{n} {times[n][-1]:.3f} s/step" for n in names),
                  file=sys.stderr, flush=True)
    if rank == 0:
        with open(cfg["out"], "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(memory if cfg["what"] == "memory" else speed, nprocs=cfg["world"], join=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(out: Path, backbone: str, classes: int, name: str) -> Path:
    scmc = [SCMC] if SCMC else [PYTHON, "-m", "scmc"]
    argv = ["build", "cfg/models/ConvNeXtV2.yaml", "-p", f"backbone={backbone}", "-p", f"num_classes={classes}"]
    run_process(scmc + argv + ["--name", name, "-o", str(out / name), "-q"])
    return out / name / "src"


def _worker(cfg: Dict[str, Any], tmp: Path) -> Any:
    cfg = {**cfg, "port": _free_port(), "world": WORLD, "image_size": IMAGE_SIZE, "out": str(tmp / "out.json")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime" / "src"), str(ROOT)])}
    script = tmp / "worker.py"
    script.write_text(WORKER)
    import subprocess

    proc = subprocess.run([PYTHON, str(script), json.dumps(cfg)], cwd=tmp, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_fsdp worker ({cfg['what']}) failed with status {proc.returncode}")
    return json.loads(Path(cfg["out"]).read_text())


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def run(quick: bool) -> Result:
    rounds, steps = (2, 2) if quick else (7, 4)
    with tempfile.TemporaryDirectory(prefix="scmc-bench-fsdp-") as name:
        tmp = Path(name)
        progress("building ConvNeXtV2-base and -atto")
        base_src = _build(tmp, "base", 1000, "convnextv2_base_fsdp")
        small_src = _build(tmp, "atto", 10, "convnextv2_atto_fsdp")
        progress("memory: one training step of ConvNeXtV2-base per strategy on 2 ranks")
        mem = _worker(
            {"what": "memory", "base": "convnextv2_base_fsdp", "base_src": str(base_src), "classes": 1000}, tmp
        )
        progress(f"speed: ConvNeXtV2-atto, {rounds} rounds of {steps} steps per strategy")
        times = _worker(
            {
                "what": "speed",
                "small": "convnextv2_atto_fsdp",
                "small_src": str(small_src),
                "classes": 10,
                "batch": BATCH,
                "rounds": rounds,
                "steps": steps,
            },
            tmp,
        )
    rows: List[List[Any]] = []
    for rank, per in enumerate(mem):
        for strategy in ("ddp", "fsdp"):
            b = per[strategy]
            rows.append(
                [
                    rank,
                    strategy,
                    _mb(b["parameters"]),
                    _mb(b["gradients"]),
                    _mb(b["optimizer_state"]),
                    _mb(b["total"]),
                    f"{b['total'] / per['ddp']['total']:.3f}",
                ]
            )
    worst = max(per["fsdp"]["total"] / per["ddp"]["total"] for per in mem)
    unit = mem[0]["fsdp"]
    speed_rows = []
    ddp_median = median(times["ddp"])
    for strategy in ("ddp", "fsdp"):
        values = times[strategy]
        speed_rows.append(
            [
                strategy,
                f"{median(values):.3f}",
                spread(values),
                f"{1 / median(values):.2f}",
                f"{median(values) / ddp_median:.2f}",
            ]
        )
    ratio = median(times["fsdp"]) / ddp_median
    return {
        "name": "fsdp",
        "title": "FSDP2 against DDP at 2 ranks (CPU, gloo)",
        "description": "",
        "sections": [
            {
                "title": "Per-rank training state, ConvNeXtV2-base (88.7 M parameters, fp32, AdamW)",
                "columns": [
                    "rank",
                    "strategy",
                    "parameters MiB",
                    "gradients MiB",
                    "optimizer state MiB",
                    "total MiB",
                    "x DDP",
                ],
                "rows": rows,
                "note": (
                    f"FSDP units: {unit['units']} x `{unit['unit']}`, then the root. Local sizes of the "
                    "tensors each rank holds after one training step (FSDP splits each parameter's dim 0 over "
                    "the ranks); the transient all-gather buffers of the unit being computed are not counted."
                ),
            },
            {
                "title": f"Speed, ConvNeXtV2-atto 32x32, global batch {BATCH} ({len(times['ddp'])} rounds x {steps} steps)",
                "columns": ["strategy", "median s/step", "min-max", "steps/s", "x DDP time"],
                "rows": speed_rows,
                "note": "One thread per rank; both strategies in the same two processes, interleaved.",
            },
        ],
        "goals": [
            goal(
                f"FSDP per-rank param + grad + optimizer bytes <= {GOAL_RATIO} x DDP (ConvNeXtV2-base, 2 ranks)",
                f"{worst:.3f} x",
                worst <= GOAL_RATIO,
            ),
            goal("FSDP step time vs DDP, CPU gloo, atto (report only)", f"{ratio:.2f} x", None),
        ],
        "raw": {"memory": mem, "seconds_per_step": times},
    }


if __name__ == "__main__":
    main_for("bench_fsdp", run, __doc__.splitlines()[0])
