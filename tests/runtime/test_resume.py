"""The pieces together: a run stopped mid-epoch and resumed from its checkpoint ends bit-identical."""

from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

from scmc_runtime.checkpoint import find_latest, load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from scmc_runtime.data import ImageFolderDataset, ImageTransform, build_loader, prepare_digits
from scmc_runtime.distributed import DistInfo, seed_everything
from scmc_runtime.ema import ModelEma
from scmc_runtime.metrics import MetricAccumulator

pytest.importorskip("PIL")
pytest.importorskip("sklearn")

EPOCHS = 2
DIST = DistInfo(0, 0, 1, torch.device("cpu"), None, True)


def _train(data_root: Path, run_dir: Path, stop_at: Optional[tuple] = None) -> dict:
    """A miniature train.py. ``stop_at=(epoch, step)`` saves a checkpoint there and returns early."""
    seed_everything(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    ema = ModelEma(model, decay=0.9, warmup=True, use_timm=False)
    dataset = ImageFolderDataset(data_root / "val", ImageTransform(8, translate=1), seed=0)
    loader = build_loader(dataset, 32, True, DIST, workers=0, seed=0)

    start_epoch, start_step, global_step = 0, 0, 0
    latest = find_latest(run_dir)
    if latest is not None:
        state = load_checkpoint(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        set_rng_state(state["rng"][0])

    losses = []
    for epoch in range(start_epoch, EPOCHS):
        loader.sampler.set_epoch(epoch, skip_batches=start_step if epoch == start_epoch else 0)
        metrics = MetricAccumulator()
        for step, (images, labels) in enumerate(loader, start=start_step if epoch == start_epoch else 0):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            global_step += 1
            ema.update(model, step=global_step)
            metrics.update({"loss": loss}, n=labels.shape[0])
            losses.append(loss.item())
            if stop_at == (epoch, step):
                save_checkpoint(
                    run_dir / f"step-{global_step:08d}.pt",
                    {
                        "model": unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "ema": ema.state_dict(),
                        "epoch": epoch,
                        "step_in_epoch": step + 1,
                        "global_step": global_step,
                        "rng": [rng_state()],
                    },
                )
                return {}
    return {"model": model.state_dict(), "ema": ema.state_dict(), "losses": losses}


def test_a_run_resumed_mid_epoch_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    data_root = prepare_digits(tmp_path / "digits")
    straight = _train(data_root, tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    assert _train(data_root, interrupted, stop_at=(0, 4)) == {}
    torch.manual_seed(999)  # a new process starts from unrelated RNG state
    resumed = _train(data_root, interrupted)

    assert resumed["losses"] == straight["losses"][-len(resumed["losses"]) :]
    for part in ("model", "ema"):
        for name, value in straight[part].items():
            assert torch.equal(resumed[part][name], value), f"{part}.{name}"
