"""The recipe's loader parts without a generated package: persistent workers, the prefetcher's side stream, predict.py.

Persistent loader workers keep their own copy of the dataset, so the epoch that seeds each image's
augmentation travels with its index (scmc_runtime.data.EpochIndexed); the batches must be bitwise
those of a loader without persistent workers, epoch after epoch and after a mid-epoch resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scmc_runtime.data import EpochIndexed, ImageFolderDataset, ImageTransform, ResumableSampler, build_loader
from scmc_runtime.distributed import DistInfo

pytest.importorskip("PIL")
pytest.importorskip("sklearn")


def _dist() -> DistInfo:
    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None, is_main=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_recipe import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=4) / "train"


def _epoch(loader, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch, skip_batches=skip)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def _same(left, right) -> bool:
    return len(left) == len(right) and all(
        torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(left, right)
    )


def test_persistent_workers_see_each_epochs_augmentation_seed_and_resume_exactly(folder: Path):
    dataset = ImageFolderDataset(folder, ImageTransform(16, translate=3, hflip=True), seed=3)
    plain = build_loader(dataset, 8, True, _dist(), workers=0, seed=3)
    persistent = build_loader(dataset, 8, True, _dist(), workers=2, seed=3, persistent_workers=True)
    assert persistent.persistent_workers and isinstance(persistent.dataset, EpochIndexed)
    assert persistent.sampler.with_epoch and not plain.sampler.with_epoch
    expected = [_epoch(plain, epoch) for epoch in range(3)]
    assert not _same(expected[0], expected[1])  # the augmentation differs from epoch to epoch
    workers = None
    for epoch in range(3):
        assert _same(_epoch(persistent, epoch), expected[epoch]), epoch
        ids = persistent._iterator._workers  # the same worker processes every epoch
        assert workers is None or ids is workers
        workers = ids
    # an epoch cut short (--max-steps), then a resume mid-epoch in the same persistent workers
    next(iter(persistent))
    assert _same(_epoch(persistent, 1, skip=2), expected[1][2:])
    assert _same(_epoch(persistent, 0), expected[0])


def test_persistent_workers_need_workers_and_the_epoch_index_pairs_are_the_samplers():
    loader = build_loader(list(range(10)), 2, True, _dist(), workers=0, persistent_workers=True)
    assert not loader.persistent_workers and not loader.sampler.with_epoch
    sampler = ResumableSampler(torch.utils.data.SequentialSampler(range(6)), 2, with_epoch=True)
    sampler.set_epoch(4, skip_batches=1)
    assert list(sampler) == [(4, 2), (4, 3), (4, 4), (4, 5)]

