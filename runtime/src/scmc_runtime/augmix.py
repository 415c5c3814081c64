"""AugMix augmentation splits with a Jensen-Shannon consistency loss (``--aug-splits N``), as timm's train.py.

Data. ``timm.data.AugMixDataset`` reads each training image once through the first stage of
timm's training transform (``create_transform(..., separate=True)``: crop and flips) and gives
``N`` views of it: the clean one (only the final stage: to tensor and normalization, or to uint8
in the prefetcher path) and ``N - 1`` through the augmentation stage (the ``--auto-augment``
policy, e.g. ``augmix-m3-w3-d1``). :class:`AugSplits` runs that under the global RNGs seeded from
``(seed, epoch, index)``, so the views depend on nothing else and exact resume holds.
:class:`SplitCollate` lays a batch out split-major, as timm's ``fast_collate`` does:
``[clean images of the batch, split 1, ..., split N - 1]`` (``N * B`` images), with the ``B``
labels of the clean part.

Loss. The package's compiled loss is applied to the clean split of the model's outputs, and
``--jsd-alpha`` times :func:`jsd_consistency` of the classification logits of all splits is added to
the loss the backward takes: with a cross-entropy loss this is timm's ``JsdCrossEntropy``. The
training metrics score the clean split. Validation reads plain images and never splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from scmc_runtime._optional import require
from scmc_runtime.seeding import mix_seed, seeded

__all__ = [
    "JsdWiring",
    "AugSplits",
    "SplitCollate",
    "jsd_consistency",
    "clean_split",
    "split_losses",
    "split_problems",
    "erase_splits",
]

# Mixed into an image's seed, so the views are not drawn from the stream of its crop.
_SPLIT_SALT = 0x5A17


@dataclass(frozen=True)
class JsdWiring:
    """How a package's train.py feeds the JSD term: which model output holds the logits, which loss gets the term.

    ``logits(outputs)`` picks the classification logits (the model output the loss compares with
    the labels) and ``loss`` names the backward's loss the term is added to. Where the build could
    not tell them, ``logits`` is None and ``problem`` says why (``--aug-splits`` is then refused).
    """

    logits: Optional[Callable[[Any], torch.Tensor]] = None
    loss: str = ""
    problem: str = ""


def erase_splits(aug_splits: int, resplit: bool) -> int:
    """timm's ``re_num_splits``: with ``--resplit`` the first split (the first half without splits) is not erased."""
    if not resplit:
        return 0
    return aug_splits if aug_splits > 1 else 2


def split_problems(recipe: Any, jsd: Optional[JsdWiring]) -> List[str]:
    """One line per reason ``--aug-splits`` (and ``--jsd-alpha``, ``--resplit``) cannot run with the other flags."""
    r = recipe
    problems: List[str] = []
    if r.aug_splits < 0 or r.aug_splits == 1:
        problems.append(f"--aug-splits {r.aug_splits}: 0 (off) or at least 2 (the clean images and N - 1 augmented)")
        return problems
    if not (math.isfinite(r.jsd_alpha) and r.jsd_alpha >= 0):  # nan or inf would make every loss nan
        problems.append(f"--jsd-alpha {r.jsd_alpha}: must be at least 0 and finite (timm's default is 12)")
    if r.aug_splits < 2:
        return problems
    if r.mixes:
        problems.append(
            f"--aug-splits {r.aug_splits}: cannot be combined with --mixup / --cutmix (the JSD loss compares the "
            "splits of one image, mixing pairs different images); pass --mixup 0 --cutmix 0 or --aug-splits 0"
        )
    if r.no_aug:
        problems.append(f"--aug-splits {r.aug_splits}: --no-aug leaves nothing to augment the splits with")
    if jsd is None or jsd.logits is None:
        why = jsd.problem if jsd is not None and jsd.problem else "this package does not say which output they are"
        problems.append(
            f"--aug-splits {r.aug_splits}: the JSD consistency term needs the model's classification logits: {why}"
        )
    return problems


class AugSplits(Dataset):
    """``timm.data.AugMixDataset`` over an scmc training set, each item read under RNGs seeded by its index.

    ``dataset`` is an ``ImageFolderDataset`` or ``TimmImageDataset`` whose transform is the
    3-tuple of ``create_transform(..., separate=True)`` (its first stage a
    :class:`scmc_runtime.recipe.TimmTransform`, seeded by the dataset itself). Items are
    ``((clean, view 1, ..., view N - 1), label)``.
    """

    def __init__(self, dataset: Any, num_splits: int, seed: int = 0) -> None:
        timm_data = require("timm.data", "--aug-splits", "timm")
        self.dataset = dataset
        self.splits = timm_data.AugMixDataset(dataset, num_splits=num_splits)
        self.num_splits = num_splits
        self.seed = seed

    @property
    def epoch(self) -> int:
        return int(getattr(self.dataset, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def classes(self) -> Sequence[str]:
        return self.dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Tuple[Any, ...], int]:
        with seeded(mix_seed(self.seed, self.epoch, index, _SPLIT_SALT)):
            return self.splits[index]


class SplitCollate:
    """A batch of ``((clean, view 1, ...), label)`` items as ``(images [N * B, ...], labels [B])``, split-major.

    ``uint8``: the prefetcher path, numpy uint8 views through timm's ``fast_collate`` (which
    repeats the labels per split: the clean part's are kept); else float tensors, stacked per
    split and concatenated in split order.
    """

    def __init__(self, uint8: bool) -> None:
        self.uint8 = uint8

    def __call__(self, items: Sequence[Tuple[Tuple[Any, ...], int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.uint8:
            fast_collate = require("timm.data.loader", "--aug-splits", "timm").fast_collate
            images, labels = fast_collate(items)
            return images, labels[: len(items)]
        views = [torch.stack([view for view in item[0]]) for item in items]  # [N, C, H, W] per image
        images = torch.stack(views, dim=1).flatten(0, 1)  # [N, B, ...] -> split-major [N * B, ...]
        labels = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
        return images, labels


def jsd_consistency(logits: torch.Tensor, num_splits: int, alpha: float) -> torch.Tensor:
    """``alpha`` x the Jensen-Shannon divergence of the class distributions of the ``num_splits`` splits.

    ``logits`` is split-major (``[N * B, C]``). The divergence is the mean over the splits of
    ``KL(p_split || mixture)`` (batch mean), the mixture clamped to ``[1e-7, 1]`` before its log,
    as in the AugMix paper and timm's ``JsdCrossEntropy``.
    """
    size = logits.shape[0] // num_splits
    if size * num_splits != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits do not split into {num_splits} equal parts")
    probs = [torch.softmax(part, dim=1) for part in torch.split(logits, size)]
    log_mixture = torch.stack(probs).mean(dim=0).clamp(1e-7, 1.0).log()
    divergence = torch.stack([F.kl_div(log_mixture, p, reduction="batchmean") for p in probs]).sum()
    return alpha * divergence / num_splits


def clean_split(outputs: Any, total: int, size: int) -> Any:
    """``outputs`` (a tensor, a tuple/list or a dict of them) with each ``total``-row tensor cut to its first ``size`` rows."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:size] if outputs.ndim > 0 and outputs.shape[0] == total else outputs
    if isinstance(outputs, dict):
        return {key: clean_split(value, total, size) for key, value in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(clean_split(value, total, size) for value in outputs)
    return outputs


def split_losses(
    compute_losses: Callable[[Any, Any, Any], Dict[str, torch.Tensor]],
    criterion: Any,
    outputs: Any,
    batch: Any,
    *,
    jsd: JsdWiring,
    num_splits: int,
    alpha: float,
) -> Tuple[Dict[str, torch.Tensor], Any, Any, torch.Tensor]:
    """The losses of a split batch: the compiled loss on the clean split, plus the JSD term on ``jsd.loss``.

    Returns ``(losses, clean outputs, clean batch, the weighted JSD term)``; the training metrics score
    the clean outputs and batch, and the training log shows the term as ``jsd_consistency``.
    """
    import dataclasses

    assert jsd.logits is not None  # checked with the flags (split_problems)
    size = len(batch)
    total = int(batch.images.shape[0])
    clean_outputs = clean_split(outputs, total, size)
    clean_batch = dataclasses.replace(batch, images=batch.images[:size])
    losses = dict(compute_losses(criterion, clean_outputs, clean_batch))
    term = jsd_consistency(jsd.logits(outputs), num_splits, alpha)
    losses[jsd.loss] = losses[jsd.loss] + term
    return losses, clean_outputs, clean_batch, term
