"""Training: the generated ``python -m convnextv2_femto.train`` against a hand-written loop.

Three whole processes, interleaved round by round in an order that rotates every round:

* ``scmc`` -- the generated entry point, ``--no-ema --no-mlflow --workers 0 --ci``: the
  like-for-like subject, the one the goal is about;
* ``scmc + EMA`` -- the same with EMA on (the default a user gets): EMA update after every
  optimizer step plus a second validation pass per epoch;
* ``reference`` -- a minimal hand-written loop (``REFERENCE`` below, run with ``python -c``):
  timm's ``convnextv2_femto(conv_mlp=False)`` (the template's architecture, 1000-class head
  like the generated model), ``torch.optim.AdamW`` (lr 2e-3, wd 0.05 except on 1-d
  parameters, as the generated optimizer groups them), the template's schedule written out
  (one epoch of linear warm-up from 1e-5, then cosine to 1e-6, stepped per update),
  cross-entropy with label smoothing 0.1, a plain ``DataLoader`` (shuffle, ``drop_last``),
  running loss/accuracy kept as tensors, validation (loss + top-1) every epoch and one
  ``torch.save`` of model + optimizer per epoch (the subject writes ``last.pt`` and
  ``best.pt``).

Same data for both: the digits written once as an ImageFolder (``scmc_runtime.data.
prepare_digits``, before timing) and read by ``scmc_runtime.data.ImageFolderDataset`` with
``ImageTransform(32)``: same decoding and transform cost. Batch 32, same epochs and threads,
seed 0. Start-up is included in the wall time; ``epoch s`` (training + validation of one
epoch, by each process's own clock: the subject's ``metrics.jsonl`` ``epoch_seconds``, the
reference's timer around the same span) separates the steady per-step cost from start-up.
Peak memory is each process's max RSS (``os.wait4``).

    .venv/bin/python benchmarks/bench_train.py [--quick] [--json PATH] [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from _common import (
    PYTHON,
    ROOT,
    SCMC,
    Result,
    goal,
    judge,
    median,
    median_ci,
    progress,
    render_markdown,
    rotate,
    run_process,
    spread,
)

GOAL_RATIO = 1.10
PACKAGE = "convnextv2_femto"
# One thread by default: the box has 2 cores shared with other jobs, and a 2-thread OpenMP
# process on an oversubscribed machine waits at every barrier for its descheduled twin (steps
# of 1-12 s instead of ~0.4 s were seen at load 4.5), which swamps what is being measured.
THREADS = 1
BATCH = 32
IMAGE_SIZE = 32
SEED = 0

SUBJECT_NO_EMA = "scmc"
SUBJECT_EMA = "scmc + EMA"
REF = "reference"

REFERENCE = r"""
import itertools, json, math, sys, time
from pathlib import Path
import torch, timm
from torch.utils.data import DataLoader
from scmc_runtime.data import ImageFolderDataset, ImageTransform

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(cfg["seed"])
root, out = Path(cfg["data"]), Path(cfg["out"])
out.mkdir(parents=True, exist_ok=True)
transform = ImageTransform(cfg["image_size"])
train_set = ImageFolderDataset(root / "train", transform)
val_set = ImageFolderDataset(root / "val", transform)
train_loader = DataLoader(train_set, batch_size=cfg["batch"], shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(cfg["seed"]))
val_loader = DataLoader(val_set, batch_size=cfg["batch"])

model = timm.create_model("convnextv2_femto", pretrained=False, conv_mlp=False, num_classes=10)
groups = [{"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
          {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.05}]
optimizer = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.999))
criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

steps = min(len(train_loader), cfg["max_steps"]) if cfg["max_steps"] else len(train_loader)
total, warmup = steps * cfg["epochs"], steps  # updates; one epoch of warm-up

def lr_at(t):  # linear warm-up from 1e-5, then cosine from 2e-3 to 1e-6
    if t < warmup:
        return 1e-5 + t * (2e-3 - 1e-5) / warmup
    if t >= total:
        return 1e-6
    return 1e-6 + 0.5 * (2e-3 - 1e-6) * (1 + math.cos(math.pi * t / total))

def set_lr(t):
    for group in optimizer.param_groups:
        group["lr"] = lr_at(t)

set_lr(0)
updates, epochs = 0, []
for epoch in range(cfg["epochs"]):
    model.train()
    began = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for images, labels in itertools.islice(train_loader, steps):
        logits = model(images)
        loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updates += 1
        set_lr(updates)
        with torch.no_grad():
            loss_sum += loss.detach() * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
    trained = time.perf_counter()
    model.eval()
    val_loss, val_correct, val_seen = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in val_loader:
            logits = model(images)
            val_loss += criterion(logits, labels).item() * labels.shape[0]
            val_correct += (logits.argmax(1) == labels).sum().item()
            val_seen += labels.shape[0]
    done = time.perf_counter()
    epochs.append({"epoch": epoch + 1, "steps": steps, "train_seconds": trained - began,
                   "epoch_seconds": done - began, "train_loss": loss_sum.item() / seen,
                   "train_acc1": correct.item() / seen, "val_loss": val_loss / val_seen,
                   "val_acc1": val_correct / val_seen, "lr": optimizer.param_groups[0]["lr"]})
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
               out / "last.pt")
print("BENCH_RESULT " + json.dumps({"epochs": epochs}), flush=True)
"""


def build_femto(out: Path) -> Path:
    scmc = [SCMC] if SCMC else [PYTHON, "-m", "scmc"]
    run_process(
        scmc
        + ["build", "cfg/models/ConvNeXtV2.yaml", "-p", "backbone=femto", "-p", "num_classes=10", "-o", str(out), "-q"]
    )
    return out / "src"


def run_measured(argv: Sequence[str], *, env: Dict[str, str], log: Path) -> Dict[str, Any]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one process, start-up included.

    ``os.wait4`` gives this child's own rusage, so the peak is not a max over earlier children
    (as ``RUSAGE_CHILDREN``'s ``ru_maxrss`` would be)."""
    with open(log, "w") as handle:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{text[-4000:]}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mib": usage.ru_maxrss / 1024.0,  # KiB on Linux
        "output": text,
    }


class Bench:
    def __init__(self, tmp: Path, threads: int, epochs: int, max_steps: int) -> None:
        self.tmp = tmp
        self.threads = threads
        self.epochs = epochs
        self.max_steps = max_steps
        self.src = build_femto(tmp / "femto")
        self.cache = tmp / "cache"
        from scmc_runtime.data import prepare_digits

        self.data = prepare_digits(self.cache / "digits")  # written once, before any timing
        self.env = dict(os.environ, PYTHONPATH=str(self.src))
        self.count = 0

    def _next(self, label: str) -> Path:
        self.count += 1
        path = self.tmp / "runs" / f"{self.count:02d}-{label}"
        path.mkdir(parents=True)
        return path

    def subject(self, ema: bool) -> Dict[str, Any]:
        out = self._next("ema" if ema else "scmc")
        argv = [PYTHON, "-m", f"{PACKAGE}.train", "--epochs", str(self.epochs), "--batch-size", str(BATCH)]
        argv += ["--image-size", str(IMAGE_SIZE), "--threads", str(self.threads), "--workers", "0"]
        argv += ["--seed", str(SEED), "--no-mlflow", "--ci", "--out", str(out), "--cache-dir", str(self.cache)]
        argv += ["--ema" if ema else "--no-ema"]
        argv += ["--allow-class-mismatch"]  # a 1000-way head on the 10 digits, as the reference loop has
        if self.max_steps:
            argv += ["--max-steps", str(self.max_steps)]
        result = run_measured(argv, env=self.env, log=out / "stdout.txt")
        records = [json.loads(line) for line in (out / PACKAGE / "metrics.jsonl").read_text().splitlines()]
        start = next(r for r in records if r["event"] == "start")
        epochs = [r for r in records if r["event"] == "epoch"]
        result["epochs"] = [
            {
                "epoch": r["epoch"],
                "steps": start["steps_per_epoch"],
                "epoch_seconds": r["epoch_seconds"],
                "val_acc1": r["val_acc1"],
                "ema_val_acc1": r.get("ema_val_acc1"),
            }
            for r in epochs
        ]
        shutil.rmtree(out / PACKAGE, ignore_errors=True)  # checkpoints: ~85 MB a run
        return _summary(result)

    def reference(self) -> Dict[str, Any]:
        out = self._next("ref")
        cfg = {
            "threads": self.threads,
            "seed": SEED,
            "data": str(self.data),
            "out": str(out / "ckpt"),
            "image_size": IMAGE_SIZE,
            "batch": BATCH,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
        }
        result = run_measured([PYTHON, "-c", REFERENCE, json.dumps(cfg)], env=self.env, log=out / "stdout.txt")
        line = next(l for l in result["output"].splitlines() if l.startswith("BENCH_RESULT "))
        result["epochs"] = json.loads(line[len("BENCH_RESULT ") :])["epochs"]
        shutil.rmtree(out / "ckpt", ignore_errors=True)
        return _summary(result)


def _summary(result: Dict[str, Any]) -> Dict[str, Any]:
    epochs = result["epochs"]
    last = epochs[-1]
    result.pop("output", None)
    result["inside_epochs"] = sum(e["epoch_seconds"] for e in epochs)
    result["outside_epochs"] = result["wall"] - result["inside_epochs"]  # start-up, checkpoints, exit
    result["step_first"] = epochs[0]["epoch_seconds"] / epochs[0]["steps"]
    result["step_last"] = last["epoch_seconds"] / last["steps"]
    result["val_acc1"] = last["val_acc1"]
    result["ema_val_acc1"] = last.get("ema_val_acc1")
    if "train_seconds" in last:
        result["train_step_last"] = last["train_seconds"] / last["steps"]
    return result


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(quick: bool, threads: int = THREADS, rounds: Optional[int] = None) -> Result:
    rounds = rounds or (1 if quick else 3)
    epochs, max_steps = (1, 8) if quick else (2, 0)
    tmp = Path(tempfile.mkdtemp(prefix="scmc-bench-train-"))
    load_before = load_average()
    try:
        progress("bench_train: building the femto package, writing the digits")
        bench = Bench(tmp, threads, epochs, max_steps)
        subjects = {
            SUBJECT_NO_EMA: lambda: bench.subject(ema=False),
            SUBJECT_EMA: lambda: bench.subject(ema=True),
            REF: bench.reference,
        }
        names = list(subjects)
        samples: Dict[str, List[Dict[str, Any]]] = {name: [] for name in names}
        loads: List[str] = []
        for r in range(rounds):
            for name in rotate(names, r):
                progress(f"  round {r + 1}/{rounds}: {name} ... (load {load_average()})")
                samples[name].append(subjects[name]())
            loads.append(load_average())
            status = ", ".join(f"{n} {samples[n][-1]['wall']:.1f}s" for n in names)
            progress(f"  round {r + 1}/{rounds}: {status}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(samples, threads=threads, epochs=epochs, max_steps=max_steps, loads=[load_before] + loads)


def _ratio(samples: Dict[str, List[Dict[str, Any]]], name: str, key: str) -> List[float]:
    return [s[key] / r[key] for s, r in zip(samples[name], samples[REF])]


def report(
    samples: Dict[str, List[Dict[str, Any]]], *, threads: int, epochs: int, max_steps: int, loads: List[str]
) -> Result:
    rows = []
    for name, runs in samples.items():
        wall = [s["wall"] for s in runs]
        ratio = "1" if name == REF else f"{median(_ratio(samples, name, 'wall')):.3f}"
        step_ratio = "1" if name == REF else f"{median(_ratio(samples, name, 'step_last')):.3f}"
        rss_ratio = "1" if name == REF else f"{median(_ratio(samples, name, 'rss_mib')):.3f}"
        cpu_ratio = "1" if name == REF else f"{median(_ratio(samples, name, 'cpu')):.3f}"
        acc = f"{median(s['val_acc1'] for s in runs):.3f}"
        if runs[0]["ema_val_acc1"] is not None:
            acc += f" (EMA {median(s['ema_val_acc1'] for s in runs):.3f})"
        rows.append(
            [
                name,
                f"{median(wall):.1f}",
                spread(wall),
                ratio,
                f"{median(s['cpu'] for s in runs):.1f}",
                cpu_ratio,
                f"{median(s['outside_epochs'] for s in runs):.1f}",
                f"{median(s['step_first'] for s in runs) * 1000:.0f}",
                f"{median(s['step_last'] for s in runs) * 1000:.0f}",
                step_ratio,
                f"{median(s['rss_mib'] for s in runs):.0f}",
                rss_ratio,
                acc,
            ]
        )
    ref_train = [s["train_step_last"] for s in samples[REF]]
    wall_ratios = _ratio(samples, SUBJECT_NO_EMA, "wall")
    step_ratios = _ratio(samples, SUBJECT_NO_EMA, "step_last")
    cpu_ratios = _ratio(samples, SUBJECT_NO_EMA, "cpu")
    lo, hi = median_ci(wall_ratios)
    cpu_lo, cpu_hi = median_ci(cpu_ratios)
    ema_ratio = median(_ratio(samples, SUBJECT_EMA, "wall"))
    ema_cpu_ratio = median(_ratio(samples, SUBJECT_EMA, "cpu"))
    steps = samples[REF][0]["epochs"][-1]["steps"]
    goals = [
        goal(
            f"whole training process, generated / hand-written (no EMA) <= {GOAL_RATIO}",
            f"{median(wall_ratios):.3f} (range {lo:.3f}-{hi:.3f}; per step, last epoch "
            f"{median(step_ratios):.3f}; with EMA {ema_ratio:.3f})",
            judge(wall_ratios, GOAL_RATIO),
        ),
        goal(
            f"same in CPU seconds (user + sys; load-robust for 1 thread) <= {GOAL_RATIO}",
            f"{median(cpu_ratios):.3f} (range {cpu_lo:.3f}-{cpu_hi:.3f}; with EMA {ema_cpu_ratio:.3f})",
            judge(cpu_ratios, GOAL_RATIO),
        ),
        goal(
            "both learn: final val top-1 > 0.5",
            ", ".join(f"{n} {median(s['val_acc1'] for s in samples[n]):.3f}" for n in samples),
            all(median(s["val_acc1"] for s in samples[n]) > 0.5 for n in samples),
        ),
    ]
    rounds = len(samples[REF])
    limit = f", --max-steps {max_steps}" if max_steps else ""
    return {
        "name": "train",
        "title": "Training: generated train.py vs a hand-written loop",
        "description": (
            f"femto, digits at {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH}, {epochs} epoch(s) of {steps} steps"
            f"{limit}, {threads} thread(s), --workers 0, AdamW lr 2e-3 wd 0.05 with the template's "
            f"warm-up + cosine; whole processes, {rounds} interleaved round(s), medians. "
            f"Load average (1/5/15 min) before and after each round: {'; '.join(loads)}."
        ),
        "sections": [
            {
                "title": "",
                "columns": [
                    "process",
                    "wall s",
                    "min-max s",
                    "wall ratio",
                    "CPU s",
                    "CPU ratio",
                    "outside epochs s",
                    "ms/step epoch 1",
                    "ms/step last epoch",
                    "step ratio",
                    "peak RSS MiB",
                    "RSS ratio",
                    "final val top-1",
                ],
                "rows": rows,
                "note": (
                    "Ratios: median over rounds of process/reference within the same round. "
                    "`CPU s`: the process's user + system time, which waiting for a core does "
                    "not inflate (with one thread it approximates the wall time on an idle core). "
                    "`ms/step`: one epoch's training + validation (+ EMA validation) seconds by "
                    "the process's own clock over its steps; the last epoch is the steady state. "
                    "`outside epochs`: wall minus the epochs (interpreter and imports, data scan, "
                    "model build, checkpoint writes, exit). The reference's training steps alone "
                    f"(no validation): {median(ref_train) * 1000:.0f} ms/step in the last epoch."
                ),
            }
        ],
        "goals": goals,
        "raw": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of 1 epoch x 8 steps (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of every process")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, quick 1)")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.quick, threads=args.threads, rounds=args.rounds or None)
    result["seconds"] = time.perf_counter() - start
    result["quick"] = args.quick
    print(render_markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
