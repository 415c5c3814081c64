"""Image-folder data without torchvision: the offline digits set, a dataset, a resumable loader.

Augmentation randomness is drawn from a generator seeded by (seed, epoch, sample index), not
from the global or per-worker RNG, so a batch is the same whatever the number of workers or
ranks, and a run resumed mid-epoch sees exactly the batches it would have seen. With persistent
workers (which keep their own copy of the dataset across epochs) the epoch travels with each
index from the sampler (:class:`EpochIndexed`), so the workers never need to be told.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Sized, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from scmc_runtime._optional import require
from scmc_runtime.distributed import DistInfo, worker_init_fn

__all__ = [
    "BadImageError",
    "validation_subset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "prepare_digits",
    "ImageTransform",
    "ImageFolderDataset",
    "ShardSampler",
    "ResumableSampler",
    "EpochIndexed",
    "build_loader",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_DIGITS_MARKER = ".scmc-digits-complete"


# ---------------------------------------------------------------------------------------------
# The digits data set (scikit-learn's 8x8 digits, shipped inside the sklearn wheel)


def _stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Indices for train and validation, each class split ``1 - val_fraction : val_fraction``."""
    generator = torch.Generator().manual_seed(seed)
    train: List[int] = []
    val: List[int] = []
    for label in sorted(set(labels)):
        members = [index for index, value in enumerate(labels) if value == label]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_val = round(len(members) * val_fraction)
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return sorted(train), sorted(val)


def _write_digits(target: Path, val_fraction: float, seed: int) -> None:
    Image = require("PIL.Image", "prepare_digits", "data")
    datasets = require("sklearn.datasets", "prepare_digits", "data")

    digits = datasets.load_digits()
    labels = [int(label) for label in digits.target]
    pixels = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")  # 0..16 -> 0..255
    train, val = _stratified_split(labels, val_fraction, seed)
    for split, indices in (("train", train), ("val", val)):
        for index in indices:
            folder = target / split / str(labels[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[index]).save(folder / f"{index}.png")


def prepare_digits(
    root: Union[str, os.PathLike],
    *,
    is_writer: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    timeout: float = 600.0,
) -> Path:
    """Write the 1797 scikit-learn digits as ``root/{train,val}/<class>/<index>.png``, once.

    The split is stratified and fixed by ``seed``. Images are 8x8 8-bit grayscale. A second
    call finds the completion marker and returns at once. Safe to call from every rank:
    writers (``is_writer=True``, e.g. local rank 0 of each node) build the tree in a private
    temporary directory and move each split into place with an atomic rename, so concurrent
    writers on a shared file system cannot mix files; other ranks wait for the marker.
    """
    root = Path(root)
    marker = root / _DIGITS_MARKER
    if marker.exists():
        return root
    if not is_writer:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for {marker}; did the writing rank fail?")
            time.sleep(0.2)
        return root

    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".tmp-digits-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_digits(staging, val_fraction, seed)
        for split in ("train", "val"):
            try:
                os.rename(staging / split, root / split)
            except OSError:
                if not (root / split).is_dir():
                    raise
                # another writer got there first with identical content
        tmp_marker = staging / _DIGITS_MARKER
        tmp_marker.write_text(f"val_fraction={val_fraction} seed={seed}\n")
        os.replace(tmp_marker, marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------------------------
# Transforms and dataset


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class ImageTransform:
    """uint8 CHW image -> normalized float CHW tensor, with optional augmentation.

    Steps: scale to [0, 1], bilinear resize to ``image_size``, random translation by up to
    ``translate`` pixels (zero padding, then a crop back to size), horizontal flip with
    probability 0.5 if ``hflip``, then ``(x - mean) / std``. Only plain torch ops.
    """

    def __init__(
        self,
        image_size: Union[int, Sequence[int]],
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        translate: int = 0,
        hflip: bool = False,
    ) -> None:
        self.size = _pair(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.translate = translate
        self.hflip = hflip

    @property
    def random(self) -> bool:
        return self.translate > 0 or self.hflip

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = image.to(torch.float32) / 255.0
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        if self.translate > 0:
            t = self.translate
            padded = F.pad(x, (t, t, t, t))
            dy, dx = torch.randint(0, 2 * t + 1, (2,), generator=generator).tolist()
            x = padded[:, dy : dy + self.size[0], dx : dx + self.size[1]]
        if self.hflip and torch.rand((), generator=generator).item() < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std


class BadImageError(RuntimeError):
    """An image file that cannot be decoded; the message starts with its path."""

    @staticmethod
    def message_of(error: BaseException) -> str:
        """The original message, also when a DataLoader worker re-raised it with its traceback around it."""
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        prefix = "BadImageError: "
        return last.split(prefix, 1)[1] if prefix in last else last


def _load_rgb(path: Path, pil: bool = False) -> Any:
    Image = require("PIL.Image", "ImageFolderDataset", "data")
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if pil:  # a transform that takes PIL images (timm's): the decoded image as it is
            rgb.load()
            return rgb
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` read with Pillow; items are ``(float CHW tensor, class index)``.

    Classes are the sorted sub-directory names. ``transform`` is called as
    ``transform(uint8 RGB CHW tensor, generator)`` (an :class:`ImageTransform` or any callable
    of that shape); without one, images are only scaled to ``[0, 1]``. The generator is seeded
    by ``(seed, epoch, index)``, and the loader's sampler calls :meth:`set_epoch`.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        transform: Optional[Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]] = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"image folder {self.root} has no class sub-directories")
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples: List[Tuple[Path, int]] = [
            (path, self.class_to_idx[name])
            for name in self.classes
            for path in sorted((self.root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def drop_unreadable(self) -> List[Tuple[Path, str]]:
        """Decode every image once and drop those that fail; returns ``(path, reason)`` of each dropped one."""
        kept, dropped = [], []
        for path, label in self.samples:
            try:
                _load_rgb(path)
            except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for damaged files
                dropped.append(
                    (path, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
                )
            else:
                kept.append((path, label))
        self.samples = kept
        return dropped

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = _load_rgb(path, pil=getattr(self.transform, "takes_pil", False))
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for damaged files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BadImageError(f"{path}: cannot read the image ({reason[:200]})") from None
        if self.transform is None:
            return image.to(torch.float32) / 255.0, label
        generator = None
        if getattr(self.transform, "random", True):
            mixed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % (2**63)
            generator = torch.Generator().manual_seed(mixed)
        return self.transform(image, generator), label


# ---------------------------------------------------------------------------------------------
# Samplers and loader


def _length(items: Union[Dataset, Sampler]) -> int:
    """``len`` of a map-style dataset or a sampler: torch's stubs declare no ``__len__`` on either base class."""
    return len(cast(Sized, items))


def validation_subset(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
    """A random subset of ``size`` items, the same for a given seed, in index order (``dataset`` if smaller).

    Image folders list their samples class by class, so the first N batches would hold the
    first classes only; a random subset fixed by the seed holds every class in proportion, and
    every epoch (and every resumed run) validates the same images.
    """
    if size <= 0 or size >= _length(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    indices = sorted(torch.randperm(_length(dataset), generator=generator)[:size].tolist())
    return torch.utils.data.Subset(dataset, indices)


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r reads items r, r + world, r + 2 world, ...

    Unlike ``DistributedSampler`` no item is repeated, so metrics summed over ranks are exact.
    """

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(Sampler[Any]):
    """Wraps a sampler so an epoch can start after its first ``skip_batches`` batches.

    ``set_epoch(epoch, skip_batches=k)`` reshuffles for ``epoch`` (same order as without the
    skip) and drops the first ``k * batch_size`` indices of that epoch, for exact resume. With
    ``with_epoch`` it yields ``(epoch, index)`` pairs for an :class:`EpochIndexed` dataset. An
    inner sampler may yield ``(copy, index)`` pairs (the repeated-augmentation sampler: copy
    ``c`` of an image in an epoch); copy ``c`` of epoch ``e`` is read as epoch
    ``e + c * COPY_STRIDE``, so each copy of an image gets an augmentation of its own.
    """

    # Far above any epoch count, and odd: torch's CPU generator keeps only the low 32 bits of a
    # seed, so a multiple of 2**32 would give every copy the same augmentation.
    COPY_STRIDE = 0x9E3779B1

    def __init__(
        self, inner: Sampler[int], batch_size: int, dataset: Optional[Dataset] = None, *, with_epoch: bool = False
    ) -> None:
        self.inner = inner
        self.batch_size = batch_size
        self.dataset = dataset
        self.with_epoch = with_epoch
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        indices = itertools.islice(iter(self.inner), self.skip_batches * self.batch_size, None)
        if self.with_epoch:
            epoch = self.epoch  # fixed when the epoch's iterator is made, as the inner shuffle is
            return (self._key(epoch, item) for item in indices)
        return (item[1] if isinstance(item, tuple) else item for item in indices)

    def _key(self, epoch: int, item: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
        if isinstance(item, tuple):
            copy, index = item
            return epoch + copy * self.COPY_STRIDE, index
        return epoch, item

    def __len__(self) -> int:
        return max(0, _length(self.inner) - self.skip_batches * self.batch_size)


class EpochIndexed(Dataset):
    """``dataset`` read with ``(epoch, index)`` keys: sets the epoch of its own copy, then reads ``index``.

    A persistent DataLoader worker keeps the copy of the dataset it was started with, so a
    ``set_epoch`` in the training process never reaches it; the epoch that seeds the
    augmentation comes with every index instead (from ``ResumableSampler(with_epoch=True)``).
    Items prefetched for one epoch can never be transformed with the seed of another.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return _length(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch") and getattr(self.dataset, "epoch", None) != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # classes, samples, ... of the wrapped dataset
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    dist: DistInfo,
    workers: int = 0,
    seed: int = 0,
    *,
    sampler: Optional[Sampler[int]] = None,
    collate_fn: Optional[Callable[[List[Any]], Any]] = None,
    pin_memory: bool = True,
    persistent_workers: bool = False,
) -> DataLoader:
    """DataLoader for this rank: shuffled, sharded and resumable for training; in order for eval.

    Training uses ``DistributedSampler`` (also single-process, for one shuffling rule) with
    ``drop_last`` so every rank runs the same number of steps. Evaluation uses
    :class:`ShardSampler`, which never repeats an item. Per epoch, call
    ``loader.sampler.set_epoch(epoch, skip_batches=...)``. ``sampler`` replaces the training
    sampler (timm's ``RepeatAugSampler``, see scmc_runtime.recipe), ``collate_fn`` the default
    collate; ``pin_memory`` pins batches when training on CUDA. ``persistent_workers`` keeps the
    worker processes (with ``workers > 0``; ignored without workers) from one epoch to the next;
    a training loader then reads through :class:`EpochIndexed`, so the workers' augmentation
    seeds follow the epoch exactly as without them.
    """
    if train and sampler is not None:
        inner: Sampler[int] = sampler
    elif train:
        inner = DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
        )
    elif dist.world_size > 1:
        inner = ShardSampler(_length(dataset), dist.rank, dist.world_size)
    else:
        inner = SequentialSampler(cast(Sized, dataset))
    persistent = persistent_workers and workers > 0
    # (epoch, index) keys: for persistent workers, and for a sampler that yields copies of images
    copies = getattr(inner, "yields_copies", False)
    with_epoch = train and hasattr(dataset, "set_epoch") and (persistent or copies)
    sampler = ResumableSampler(inner, batch_size, dataset, with_epoch=with_epoch)
    return DataLoader(
        EpochIndexed(dataset) if with_epoch else dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        pin_memory=pin_memory and dist.device.type == "cuda",
        collate_fn=collate_fn,
        worker_init_fn=worker_init_fn if workers > 0 else None,
        # A private generator: creating an iterator draws a worker base seed from it, which
        # would otherwise consume the global torch RNG that dropout and init rely on.
        generator=torch.Generator().manual_seed(seed + dist.rank),
        persistent_workers=persistent,  # the epoch reaches persistent workers with each index (EpochIndexed)
    )
