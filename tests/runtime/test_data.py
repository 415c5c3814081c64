"""Digits preparation, the image-folder dataset and transforms, sharded and resumable loaders."""

import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

import scmc_runtime.data as data
from scmc_runtime.data import (
    ImageFolderDataset,
    ImageTransform,
    build_loader,
    prepare_digits,
)
from scmc_runtime.distributed import DistInfo

pytest.importorskip("PIL")
pytest.importorskip("sklearn")

CPU = torch.device("cpu")


def _dist(rank: int = 0, world_size: int = 1) -> DistInfo:
    return DistInfo(rank, rank, world_size, CPU, "gloo" if world_size > 1 else None, rank == 0)


def _tree(root: Path) -> dict:
    """``{"train/3/17.png": size, ...}`` for every image under root."""
    return {str(path.relative_to(root)): path.stat().st_size for path in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return prepare_digits(tmp_path_factory.mktemp("digits"))


def _indices(root: Path, split: str) -> dict:
    return {int(path.stem): int(path.parent.name) for path in (root / split).rglob("*.png")}


def test_digits_are_written_once_as_a_stratified_80_20_split(digits):
    train, val = _indices(digits, "train"), _indices(digits, "val")
    assert len(train) + len(val) == 1797
    assert not set(train) & set(val)
    assert sorted(path.name for path in (digits / "train").iterdir()) == [str(c) for c in range(10)]
    per_class_total = Counter(train.values()) + Counter(val.values())
    for label, count in Counter(val.values()).items():
        assert count == round(per_class_total[label] * 0.2)
    assert not [path for path in digits.iterdir() if path.name.startswith(".tmp")]


def test_digit_images_are_8x8_grayscale_scaled_to_the_full_byte_range(digits):
    from PIL import Image
    from sklearn.datasets import load_digits

    reference = load_digits()
    index, label = next(iter(_indices(digits, "val").items()))
    with Image.open(digits / "val" / str(label) / f"{index}.png") as image:
        assert image.mode == "L" and image.size == (8, 8)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).double().view(8, 8)
    expected = (torch.from_numpy(reference.images[index]) * 255 / 16).round()
    assert torch.equal(pixels, expected)
    assert label == reference.target[index]


def test_a_second_preparation_does_not_rewrite_anything(digits, monkeypatch):
    before = {path: path.stat().st_mtime_ns for path in digits.rglob("*")}
    monkeypatch.setattr(data, "_write_digits", lambda *args: pytest.fail("rewrote the digits"))
    assert prepare_digits(digits) == digits
    assert {path: path.stat().st_mtime_ns for path in digits.rglob("*")} == before


def test_the_split_is_the_same_in_a_fresh_directory_and_with_concurrent_writers(digits, tmp_path):
    root = tmp_path / "shared"
    results = []
    writers = [threading.Thread(target=lambda: results.append(prepare_digits(root))) for _ in range(2)]
    reader = threading.Thread(target=lambda: results.append(prepare_digits(root, is_writer=False, timeout=60)))
    for thread in [reader, *writers]:
        thread.start()
    for thread in [reader, *writers]:
        thread.join()
    assert results == [root, root, root]
    assert _tree(root) == _tree(digits)
    assert [path.name for path in root.iterdir() if path.name.startswith(".")] == [".scmc-digits-complete"]


def test_a_waiting_rank_gives_up_with_a_clear_error_when_nobody_writes(tmp_path):
    with pytest.raises(TimeoutError, match="did the writing rank fail"):
        prepare_digits(tmp_path, is_writer=False, timeout=0.3)


# ---------------------------------------------------------------------------------------------
# Dataset and transforms


def test_dataset_lists_sorted_classes_and_returns_normalized_rgb_tensors(digits):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    dataset = ImageFolderDataset(digits / "val", ImageTransform(8, mean=mean, std=std))
    assert dataset.classes == [str(c) for c in range(10)]
    assert len(dataset) == len(_indices(digits, "val"))
    image, label = dataset[0]
    path, expected_label = dataset.samples[0]
    assert label == expected_label == int(path.parent.name)
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    raw, _ = ImageFolderDataset(digits / "val")[0]  # no transform: [0, 1] RGB
    assert torch.equal(raw[0], raw[1]) and torch.equal(raw[1], raw[2])
    torch.testing.assert_close(image, (raw - 0.5) / 0.25)


def test_images_are_resized_bilinearly_to_the_requested_size(digits):
    dataset = ImageFolderDataset(digits / "val", ImageTransform((16, 24), mean=(0, 0, 0), std=(1, 1, 1)))
    image, _ = dataset[0]
    assert image.shape == (3, 16, 24)
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_translation_shifts_the_image_by_at_most_the_configured_pixels():
    transform = ImageTransform(8, mean=(0, 0, 0), std=(1, 1, 1), translate=2)
    image = torch.randint(1, 256, (3, 8, 8), dtype=torch.uint8)
    padded = torch.nn.functional.pad(image.float() / 255, (2, 2, 2, 2))
    shifts = set()
    for seed in range(40):
        out = transform(image, torch.Generator().manual_seed(seed))
        matches = [
            (dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out, padded[:, dy : dy + 8, dx : dx + 8])
        ]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 5  # really random, not a fixed offset


def test_without_augmentation_the_transform_ignores_randomness():
    transform = ImageTransform(8, hflip=False, translate=0)
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert not transform.random
    assert torch.equal(transform(image, torch.Generator().manual_seed(1)), transform(image, None))


def test_horizontal_flip_is_off_by_default_and_flips_when_enabled():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    plain = ImageTransform(8)(image)
    flipping = ImageTransform(8, hflip=True)
    outs = [flipping(image, torch.Generator().manual_seed(seed)) for seed in range(20)]
    assert any(torch.equal(out, plain.flip(-1)) for out in outs)
    assert any(torch.equal(out, plain) for out in outs)


def test_augmentation_depends_on_seed_epoch_and_index_only(digits):
    dataset = ImageFolderDataset(digits / "val", ImageTransform(8, translate=2), seed=3)
    first = [dataset[i][0] for i in range(8)]
    assert all(torch.equal(a, dataset[i][0]) for i, a in enumerate(first))
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a, dataset[i][0]) for i, a in enumerate(first))
    dataset.set_epoch(1)
    assert not all(torch.equal(a, dataset[i][0]) for i, a in enumerate(first))


# ---------------------------------------------------------------------------------------------
# Loaders


class _Indices(torch.utils.data.Dataset):
    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return index


def _epoch(loader, epoch: int, skip: int = 0) -> list:
    loader.sampler.set_epoch(epoch, skip_batches=skip)
    return [batch.tolist() for batch in loader]


def test_training_shards_give_two_ranks_disjoint_equal_halves():
    dataset = _Indices(101)
    shards = [_epoch(build_loader(dataset, 10, True, _dist(rank, 2), seed=5), 0) for rank in range(2)]
    seen = [{i for batch in shard for i in batch} for shard in shards]
    assert len(shards[0]) == len(shards[1]) == 5  # 50 items each, full batches only
    assert len(seen[0]) == len(seen[1]) == 50 and not seen[0] & seen[1]


def test_evaluation_shards_cover_every_item_exactly_once():
    dataset = _Indices(101)
    loaders = [build_loader(dataset, 10, False, _dist(rank, 2)) for rank in range(2)]
    items = [i for loader in loaders for batch in loader for i in batch.tolist()]
    assert sorted(items) == list(range(101))


def test_training_order_changes_per_epoch_and_repeats_for_the_same_epoch_and_seed():
    loader = build_loader(_Indices(64), 8, True, _dist(), seed=1)
    epoch0 = _epoch(loader, 0)
    assert _epoch(loader, 1) != epoch0
    assert _epoch(build_loader(_Indices(64), 8, True, _dist(), seed=1), 0) == epoch0
    assert _epoch(build_loader(_Indices(64), 8, True, _dist(), seed=2), 0) != epoch0


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches():
    loader = build_loader(_Indices(70), 8, True, _dist(1, 2), seed=0)
    full = _epoch(loader, 2)
    loader.sampler.set_epoch(2, skip_batches=3)
    assert len(loader) == len(full) - 3
    assert [batch.tolist() for batch in loader] == full[3:]
    assert _epoch(loader, 3, skip=0) == _epoch(build_loader(_Indices(70), 8, True, _dist(1, 2)), 3)


def test_resumed_augmented_batches_match_bit_for_bit_even_with_worker_processes(digits):
    dataset = ImageFolderDataset(digits / "val", ImageTransform(8, translate=2), seed=0)
    in_process = build_loader(dataset, 16, True, _dist(), workers=0, seed=0)
    full = [(images.clone(), labels.clone()) for images, labels in _loader_epoch(in_process, 1)]
    with_workers = build_loader(dataset, 16, True, _dist(), workers=2, seed=0)
    resumed = list(_loader_epoch(with_workers, 1, skip=4))
    assert len(resumed) == len(full) - 4
    for (images, labels), (expected_images, expected_labels) in zip(resumed, full[4:]):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def _loader_epoch(loader, epoch: int, skip: int = 0):
    loader.sampler.set_epoch(epoch, skip_batches=skip)
    return iter(loader)


def test_the_validation_subset_is_random_fixed_by_the_seed_and_spans_the_classes(digits):
    from scmc_runtime.data import validation_subset

    dataset = ImageFolderDataset(digits / "val")
    subset = validation_subset(dataset, 64, seed=0)
    assert len(subset) == 64 and subset.indices == sorted(subset.indices)
    assert subset.indices == validation_subset(dataset, 64, seed=0).indices
    assert subset.indices != validation_subset(dataset, 64, seed=1).indices
    labels = {dataset.samples[i][1] for i in subset.indices}
    assert labels == set(range(10))  # the first 64 images of the class-sorted folder hold classes 0 and 1 only
    assert {dataset.samples[i][1] for i in range(64)} == {0, 1}
    assert validation_subset(dataset, 0) is dataset and validation_subset(dataset, 10**6) is dataset


def test_an_unreadable_image_raises_an_error_naming_its_path(tmp_path):
    from scmc_runtime.data import BadImageError

    (tmp_path / "a").mkdir()
    bad = tmp_path / "a" / "bad.png"
    bad.write_bytes(b"not a png")
    dataset = ImageFolderDataset(tmp_path)
    with pytest.raises(BadImageError) as caught:
        dataset[0]
    assert str(caught.value).startswith(f"{bad}: cannot read the image (cannot identify image file")
    assert dataset.drop_unreadable()[0][0] == bad and len(dataset) == 0
