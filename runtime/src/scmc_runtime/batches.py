"""The batches a generated package trains on, and the data sources that make them.

:class:`Batch` is what a package's ``forward``, ``compute_losses`` and ``compute_metrics`` read;
:class:`ImageData` (images and class labels) and :class:`TableData` (an image table: images with a
row of features and regression targets) build the datasets and turn the loaders' items into
batches on the device, for :class:`scmc_runtime.trainer.Trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Protocol, Tuple

import torch

from scmc_runtime.augmix import AugSplits
from scmc_runtime.distributed import DistInfo
from scmc_runtime.errors import UsageError
from scmc_runtime.recipe import BatchRecipe, Recipe, build_transforms
from scmc_runtime.train import build_datasets

__all__ = ["Batch", "DataSource", "ImageData", "TableData", "dataset_options"]


@dataclass
class Batch:
    """One batch on the device, as the package's ``forward``, ``compute_losses`` and ``compute_metrics`` read it.

    ``labels`` are class indices (the metrics, validation); ``loss_labels`` what the loss takes
    as labels: the same tensor, except in training with mixup, cutmix or label smoothing, where
    they are ``[B, C]`` probabilities. An image-table batch also has ``features`` (the model's
    second input) and ``targets`` (the regression targets).
    """

    images: torch.Tensor
    labels: torch.Tensor
    loss_labels: torch.Tensor
    features: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class DataSource(Protocol):
    """Where a package's batches come from: :class:`ImageData` or :class:`TableData`."""

    def check(self, recipe: Recipe) -> None: ...

    def probe_batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch: ...

    def datasets(
        self, dist: DistInfo, cfg: Any, recipe: Recipe, log: Callable[[str], None]
    ) -> Tuple[Any, Any, Any]: ...

    def train_batches(
        self,
        loader: Iterable[Any],
        prepare: BatchRecipe,
        *,
        device: torch.device,
        memory_format: torch.memory_format,
        epoch: int,
        first_step: int,
    ) -> Iterator[Batch]: ...

    def val_batch(self, raw: Any, *, device: torch.device, memory_format: torch.memory_format) -> Batch: ...


def dataset_options(cfg: Any, log: Callable[[str], None]) -> Dict[str, Any]:
    """The keyword arguments every data source passes on from the config: where the images are and how they look."""
    names = ("data", "timm_dataset", "cache_dir", "image_size", "mean", "std", "translate", "hflip", "seed")
    return {**{name: getattr(cfg, name) for name in (*names, "skip_bad_images")}, "log": log}


class ImageData:
    """Images and class labels: an ImageFolder (``--data``), a timm dataset, or the embedded digits.

    With ``--aug-splits N`` the training set is read through :class:`scmc_runtime.augmix.AugSplits`
    (timm's ``AugMixDataset``) and a training batch holds ``N * B`` images, split-major, with the
    ``B`` labels of its clean split.
    """

    def check(self, recipe: Recipe) -> None:
        return None

    def probe_batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        return Batch(images, labels, labels)

    def datasets(self, dist: DistInfo, cfg: Any, recipe: Recipe, log: Callable[[str], None]) -> Tuple[Any, Any, Any]:
        transforms = build_transforms(recipe) if recipe.timm else None
        train, val, classes = build_datasets(dist, **dataset_options(cfg, log), transforms=transforms)
        if recipe.splits > 1:  # the clean view and N - 1 augmented views of each image (validation: none)
            train = AugSplits(train, recipe.splits, seed=cfg.seed)
        return train, val, classes

    def train_batches(
        self,
        loader: Iterable[Any],
        prepare: BatchRecipe,
        *,
        device: torch.device,
        memory_format: torch.memory_format,
        epoch: int,
        first_step: int,
    ) -> Iterator[Batch]:
        # On the device: normalization and erasing (--use-prefetcher), dtype, mixup/cutmix, soft targets;
        # --use-prefetcher on CUDA prepares the next batch on a side stream during this step.
        for images, loss_labels, labels in prepare.prefetch(loader, epoch=epoch, first_step=first_step):
            yield Batch(images, labels, loss_labels)

    def val_batch(self, raw: Any, *, device: torch.device, memory_format: torch.memory_format) -> Batch:
        images, labels = raw
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        return Batch(images, labels, labels)


@dataclass(frozen=True)
class TableData:
    """An image table (``scmc_runtime.tabular``): each image with a row of features and regression targets."""

    num_features: int  # the model's second input
    num_targets: int  # what the loss takes as the targets

    def check(self, recipe: Recipe) -> None:
        if recipe.aug_splits:
            raise UsageError(
                f"--aug-splits {recipe.aug_splits}: an image-table package has no AugMix splits (its batches carry "
                "a row of features and regression targets per image); leave it at 0"
            )
        if recipe.timm:
            raise UsageError(
                "--data-pipeline timm: an image-table package trains with the basic pipeline; leave it out"
            )

    def probe_batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        return Batch(images, labels, labels, features=images.new_zeros(1, self.num_features))

    def datasets(self, dist: DistInfo, cfg: Any, recipe: Recipe, log: Callable[[str], None]) -> Tuple[Any, Any, Any]:
        from scmc_runtime.tabular import build_table_datasets

        return build_table_datasets(
            dist, num_features=self.num_features, num_targets=self.num_targets, **dataset_options(cfg, log)
        )

    def train_batches(
        self,
        loader: Iterable[Any],
        prepare: BatchRecipe,
        *,
        device: torch.device,
        memory_format: torch.memory_format,
        epoch: int,
        first_step: int,
    ) -> Iterator[Batch]:
        for raw in loader:
            yield self.val_batch(raw, device=device, memory_format=memory_format)

    def val_batch(self, raw: Any, *, device: torch.device, memory_format: torch.memory_format) -> Batch:
        images, features, labels, targets = raw
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        features = features.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        return Batch(images, labels, labels, features=features, targets=targets)
