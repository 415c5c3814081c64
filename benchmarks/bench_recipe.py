"""Training recipe: the generated train.py with timm's pipeline against a hand-written loop on timm's own loader.

Two whole processes per round, in an order that rotates every round:

* ``scmc`` -- the committed golden ``soft_cls_loss`` package (ConvNeXtV2-atto,
  SoftTargetCrossEntropy), ``python -m soft_cls_loss.train --data-pipeline timm`` with the recipe
  below, ``--no-ema --no-mlflow``;
* ``timm loader`` -- a hand-written loop (``REFERENCE`` below): timm's ``create_dataset`` +
  ``create_loader`` (``is_training=True``, the same recipe, ``use_prefetcher=False`` as on CPU
  timm's prefetcher needs CUDA), timm's ``Mixup``, timm's ``convnextv2_atto`` (10 classes),
  ``SoftTargetCrossEntropy``, AdamW; the same epochs, steps, batch, workers and threads.

Recipe: RandAugment ``rand-m9-mstd0.5-inc1``, random-resized crop, flips, mixup 0.8 + cutmix 1.0,
label smoothing 0.1, random erasing 0.25 (pixel). Same on-disk data for both: an ImageFolder of
PNG files (scikit-learn's digits upsampled to 64 x 64, written before timing). Images/s is
training images over the training time of the measured epochs by each process's own clock
(the subject's ``epoch_seconds``: training plus a one-batch validation, ``--max-val-steps 1``; the
reference times the same span, with a one-batch validation through timm's eval loader). ``loader ms/step`` is measured apart, in this process: iterating each pipeline's training
loader alone (no model) for the same steps, so it is the cost the data pipeline adds per step
when it cannot hide behind the model.

    .venv/bin/python benchmarks/bench_recipe.py [--quick] [--json PATH] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from _common import ROOT, Result, goal, judge, median, median_ci, progress, render_markdown, rotate, spread

sys.path.insert(0, str(ROOT / "runtime" / "src"))

GOAL_RATIO = 0.95  # generated images/s over the reference's, at least
PACKAGE = "soft_cls_loss"
IMAGE_SIZE = 64
BATCH = 32
WORKERS = 2
THREADS = 1
PER_CLASS = 64  # training images per class (10 classes)
RECIPE = dict(
    auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, label_smoothing=0.1, reprob=0.25, remode="pixel"
)

REFERENCE = r"""
import json, sys, time, itertools
import torch, timm
from timm.data import Mixup, create_dataset, create_loader
from timm.loss import SoftTargetCrossEntropy

from scmc_runtime.recipe import pillow_posterize_compat

pillow_posterize_compat()  # timm's Posterize ops on Pillow 13 (0 bits kept raises there); same fix as scmc's
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
r = cfg["recipe"]
train_set = create_dataset("", root=cfg["data"], split="train", is_training=True)
loader = create_loader(
    train_set, input_size=(3, cfg["size"], cfg["size"]), batch_size=cfg["batch"], is_training=True,
    use_prefetcher=False, no_aug=False, re_prob=r["reprob"], re_mode=r["remode"], re_count=1,
    scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip=0.5, vflip=0.0, color_jitter=0.4,
    auto_augment=r["auto_augment"], interpolation="random", num_workers=cfg["workers"],
    distributed=False, crop_pct=0.875, pin_memory=False, persistent_workers=False,
)
val_loader = create_loader(
    create_dataset("", root=cfg["data"], split="validation", is_training=False),
    input_size=(3, cfg["size"], cfg["size"]), batch_size=cfg["batch"], is_training=False, use_prefetcher=False,
    interpolation="bicubic", crop_pct=0.875, num_workers=cfg["workers"], distributed=False,
)
mixup = Mixup(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], label_smoothing=r["label_smoothing"], num_classes=10)
model = timm.create_model("convnextv2_atto", num_classes=10)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
criterion = SoftTargetCrossEntropy()
epochs = []
for epoch in range(cfg["epochs"]):
    model.train()
    began = time.perf_counter()
    steps = 0
    for images, labels in itertools.islice(loader, cfg["steps"]):
        images, targets = mixup(images, labels)
        loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    model.eval()
    with torch.no_grad():  # one validation batch, as the subject's --max-val-steps 1
        for images, labels in itertools.islice(val_loader, 1):
            torch.nn.functional.cross_entropy(model(images), labels)
    epochs.append({"steps": steps, "seconds": time.perf_counter() - began})
print("BENCH_RESULT " + json.dumps({"epochs": epochs}), flush=True)
"""


def write_images(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: Dict[int, int] = {}
    for pixels, label in zip(digits.images, digits.target):
        label = int(label)
        n = counts.get(label, 0)
        if n >= PER_CLASS + 4:
            continue
        counts[label] = n + 1
        folder = root / ("train" if n < PER_CLASS else "val") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * 255 / 16).astype("uint8")).convert("RGB")
        image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(folder / f"{n}.png")
    return root


def _env(package: Path) -> Dict[str, str]:
    paths = [str(package / "src"), str(ROOT / "runtime" / "src"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS=str(THREADS))


def subject(package: Path, data: Path, out: Path, epochs: int, steps: int) -> Dict[str, Any]:
    import subprocess

    flags = []
    for key, value in RECIPE.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    argv = [
        sys.executable, "-m", f"{PACKAGE}.train", "--data", str(data), "--data-pipeline", "timm", *flags,
        "--image-size", str(IMAGE_SIZE), "--batch-size", str(BATCH), "--workers", str(WORKERS),
        "--threads", str(THREADS), "--epochs", str(epochs), "--max-steps", str(steps), "--max-val-steps", "1",
        "--no-ema", "--no-mlflow", "--ci", "--out", str(out), "--cache-dir", str(out),
    ]  # fmt: skip
    began = time.perf_counter()
    proc = subprocess.run(argv, env=_env(package), capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / PACKAGE / "metrics.jsonl").read_text().splitlines()]
    epoch_records = [r for r in lines if r.get("event") == "epoch"]
    return {"wall": wall, "epochs": [{"steps": steps, "seconds": r["epoch_seconds"]} for r in epoch_records]}


def reference(package: Path, data: Path, epochs: int, steps: int) -> Dict[str, Any]:
    import subprocess

    cfg = dict(
        data=str(data), size=IMAGE_SIZE, batch=BATCH, workers=WORKERS, threads=THREADS, epochs=epochs, steps=steps,
        recipe=RECIPE,
    )  # fmt: skip
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", REFERENCE, json.dumps(cfg)], env=_env(package), capture_output=True, text=True
    )
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"reference failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")][-1]
    return {"wall": wall, **json.loads(line[len("BENCH_RESULT ") :])}


def images_per_second(run: Dict[str, Any]) -> float:
    measured = run["epochs"][1:] or run["epochs"]  # the first epoch pays for worker start-up and warm-up
    return sum(e["steps"] * BATCH for e in measured) / sum(e["seconds"] for e in measured)


def loader_ms_per_step(data: Path, steps: int) -> Dict[str, float]:
    """Each pipeline's training loader alone: ms per batch over ``steps`` batches (after one warm-up batch)."""
    import torch
    from timm.data import Mixup, create_dataset, create_loader

    from scmc_runtime.data import ImageFolderDataset, build_loader
    from scmc_runtime.distributed import DistInfo
    from scmc_runtime.recipe import BatchRecipe, Recipe, build_transforms, pillow_posterize_compat

    torch.set_num_threads(THREADS)
    pillow_posterize_compat()
    recipe = Recipe(data_pipeline="timm", image_size=IMAGE_SIZE, **RECIPE)
    train_tf, _ = build_transforms(recipe)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None, is_main=True)
    ours = build_loader(ImageFolderDataset(data / "train", train_tf), BATCH, True, dist, workers=WORKERS)
    prepare = BatchRecipe(recipe, 10, torch.device("cpu"))
    timm_set = create_dataset("", root=str(data), split="train", is_training=True)
    theirs = create_loader(
        timm_set, input_size=(3, IMAGE_SIZE, IMAGE_SIZE), batch_size=BATCH, is_training=True, use_prefetcher=False,
        re_prob=RECIPE["reprob"], re_mode=RECIPE["remode"], auto_augment=RECIPE["auto_augment"],
        interpolation="random", num_workers=WORKERS, distributed=False,
    )  # fmt: skip
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)

    def timed(loader: Any, step: Any) -> float:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(0)
        iterator = iter(loader)
        step(*next(iterator), 0)
        began = time.perf_counter()
        n = 0
        for index, (images, labels) in enumerate(iterator, start=1):
            step(images, labels, index)
            n += 1
            if n >= steps:
                break
        return (time.perf_counter() - began) / max(1, n) * 1000

    return {
        "scmc": timed(ours, lambda x, y, i: prepare(x, y, epoch=0, step=i)),
        "timm loader": timed(theirs, lambda x, y, i: mixup(x, y)),
    }


def run(quick: bool, rounds: int | None) -> Result:
    rounds = rounds or (1 if quick else 3)
    epochs, steps = (2, 4) if quick else (3, 12)
    tmp = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    try:
        package = tmp / PACKAGE
        shutil.copytree(ROOT / "tests" / "golden" / PACKAGE, package)
        data = write_images(tmp / "images")
        loads = []
        samples: Dict[str, List[Dict[str, Any]]] = {"scmc": [], "timm loader": []}
        for index in range(rounds):
            loads.append(" / ".join(f"{x:.1f}" for x in os.getloadavg()))
            for name in rotate(list(samples), index):
                if name == "scmc":
                    out = tmp / f"runs-{index}"
                    out.mkdir()
                    result = subject(package, data, out, epochs, steps)
                else:
                    result = reference(package, data, epochs, steps)
                samples[name].append(result)
                progress(f"round {index + 1}/{rounds} {name}: {images_per_second(result):.1f} images/s")
        loader = loader_ms_per_step(data, steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [images_per_second(s) / images_per_second(r) for s, r in zip(samples["scmc"], samples["timm loader"])]
    rows = []
    for name, runs in samples.items():
        rate = [images_per_second(r) for r in runs]
        rows.append(
            [
                name,
                f"{median(rate):.1f}",
                spread(rate),
                "1" if name == "timm loader" else f"{median(ratios):.3f}",
                f"{loader[name]:.0f}",
                f"{median(r['wall'] for r in runs):.1f}",
            ]
        )
    lo, hi = median_ci(ratios)
    # judge() tests "at or under a limit": the inverse ratio (reference / generated) <= 1 / goal
    met = judge([1 / r for r in ratios], 1 / GOAL_RATIO)
    return {
        "name": "recipe",
        "title": "Training recipe: generated train.py (timm pipeline) vs timm's own loader",
        "description": (
            f"ConvNeXtV2-atto, {10 * PER_CLASS} PNG images at {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH}, {epochs} "
            f"epochs x {steps} steps (the first epoch not counted), --workers {WORKERS}, {THREADS} thread(s); "
            "RandAugment rand-m9-mstd0.5-inc1 + RRC + flips + mixup 0.8 + cutmix 1.0 + label smoothing 0.1 + "
            f"random erasing 0.25; {rounds} interleaved round(s), medians. Load average before each round: "
            f"{'; '.join(loads)} (the machine is shared with other jobs)."
        ),
        "sections": [
            {
                "title": "",
                "columns": ["process", "images/s", "min-max", "ratio", "loader ms/step", "wall s"],
                "rows": rows,
                "note": (
                    "ratio: median over rounds of generated / reference images/s in the same round. "
                    "loader ms/step: the training loader alone (decode + augment + collate + mixup, and for scmc "
                    "the per-image and per-batch reseeding that makes resume exact), no model."
                ),
            }
        ],
        "goals": [
            goal(
                f"images/s, generated / timm loader >= {GOAL_RATIO}",
                f"{median(ratios):.3f} (range {lo:.3f}-{hi:.3f})",
                met,
            )
        ],
        "raw": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_recipe.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of 2 epochs x 4 steps (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, quick 1)")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.quick, args.rounds or None)
    result["seconds"] = time.perf_counter() - start
    result["quick"] = args.quick
    print(render_markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
