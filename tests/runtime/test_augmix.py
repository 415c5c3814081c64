"""scmc_runtime.augmix: AugMix splits laid out split-major, seeded per image, and timm's JSD loss on their logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

from scmc_runtime.augmix import (  # noqa: E402
    AugSplits,
    JsdWiring,
    SplitCollate,
    clean_split,
    jsd_consistency,
    split_losses,
    split_problems,
)
from scmc_runtime.batches import Batch  # noqa: E402
from scmc_runtime.recipe import BatchRecipe, Recipe, build_transforms, collate_fn  # noqa: E402
from timm.data import create_transform  # noqa: E402
from timm.data.mixup import mixup_target  # noqa: E402
from timm.loss import JsdCrossEntropy, SoftTargetCrossEntropy  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class Pictures(torch.utils.data.Dataset):
    """A few random RGB pictures read as uint8 tensors through ``transform(image, generator)``, like scmc's datasets."""

    def __init__(self, transform, count: int = 4, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(123)
        self.images = [torch.randint(0, 256, (3, 40, 40), generator=generator, dtype=torch.uint8) for _ in range(count)]
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.classes = [str(i) for i in range(count)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        return self.transform(self.images[index], generator), index


def recipe(**changes) -> Recipe:
    base = dict(
        image_size=32,
        mean=MEAN,
        std=STD,
        data_pipeline="timm",
        auto_augment="augmix-m3-w3-d1",
        aug_splits=3,
    )
    return Recipe(**{**base, **changes})


def test_a_split_batch_is_split_major_with_the_labels_of_its_clean_part() -> None:
    # item i: views filled with 10 * i + k (k = 0 is the clean view), label 100 + i
    items = [(tuple(torch.full((3, 2, 2), 10.0 * i + k) for k in range(3)), 100 + i) for i in range(4)]
    images, labels = SplitCollate(uint8=False)(items)
    assert images.shape == (12, 3, 2, 2) and labels.tolist() == [100, 101, 102, 103]
    assert [int(images[j, 0, 0, 0]) for j in range(12)] == [10 * i + k for k in range(3) for i in range(4)]

    # the prefetcher path: numpy uint8 views through timm's fast_collate, the same layout
    as_uint8 = [(tuple(view.to(torch.uint8).numpy() for view in views), label) for views, label in items]
    fast, fast_labels = SplitCollate(uint8=True)(as_uint8)
    assert fast.dtype == torch.uint8 and torch.equal(fast.float(), images) and torch.equal(fast_labels, labels)


def test_the_jsd_term_with_the_clean_cross_entropy_is_timms_jsd_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3 * 5, 7, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (5,), generator=generator)
    for alpha in (12.0, 0.5):
        ours = torch.nn.functional.cross_entropy(logits[:5], labels) + jsd_consistency(logits, 3, alpha)
        theirs = JsdCrossEntropy(num_splits=3, alpha=alpha, smoothing=0)(logits, labels.repeat(3))
        assert abs(float(ours) - float(theirs)) < 1e-6
    # With label smoothing: torch's CrossEntropyLoss(label_smoothing=s) and the soft targets of
    # --label-smoothing (timm's mixup_target into SoftTargetCrossEntropy) are both (1 - s) * NLL +
    # s * mean(-log p), the math of timm's LabelSmoothingCrossEntropy inside JsdCrossEntropy(smoothing=s).
    theirs = JsdCrossEntropy(num_splits=3, alpha=12, smoothing=0.1)(logits, labels)
    smoothed = torch.nn.functional.cross_entropy(logits[:5], labels, label_smoothing=0.1)
    soft = SoftTargetCrossEntropy()(logits[:5], mixup_target(labels, 7, lam=1.0, smoothing=0.1).double())
    for clean in (smoothed, soft):
        assert abs(float(clean + jsd_consistency(logits, 3, 12.0)) - float(theirs)) < 1e-6


def test_split_losses_feed_the_clean_split_to_the_loss_and_add_the_term_to_the_backwards_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2 * 4, 5, generator=generator)
    labels = torch.randint(0, 5, (4,), generator=generator)
    batch = Batch(torch.zeros(8, 3, 2, 2), labels, labels)
    seen = {}

    def compute_losses(criterion, outputs, fed):
        seen.update(rows=outputs["cls"].shape[0], images=fed.images.shape[0])
        return {"ce_loss": criterion(outputs["cls"], fed.loss_labels)}

    wiring = JsdWiring(logits=lambda outputs: outputs["cls"], loss="ce_loss")
    outputs = {"cls": logits, "scale": torch.tensor(2.0)}
    losses, clean, clean_batch, term = split_losses(
        compute_losses, torch.nn.CrossEntropyLoss(), outputs, batch, jsd=wiring, num_splits=2, alpha=12.0
    )
    assert seen == {"rows": 4, "images": 4} and clean["scale"].ndim == 0 and len(clean_batch) == 4
    expected = JsdCrossEntropy(num_splits=2, alpha=12.0, smoothing=0)(logits, labels.repeat(2))
    assert abs(float(losses["ce_loss"]) - float(expected)) < 1e-6
    clean_ce = torch.nn.functional.cross_entropy(logits[:4], labels)
    assert abs(float(term) - float(expected - clean_ce)) < 1e-6  # what the log shows as jsd_consistency
    assert clean_split((logits, [logits]), 8, 4)[1][0].shape == (4, 5)


def test_augmix_views_are_fixed_by_seed_epoch_and_index() -> None:
    train, _ = build_transforms(recipe())
    assert isinstance(train, tuple) and len(train) == 3  # create_transform(separate=True)
    dataset = AugSplits(Pictures(train), 3, seed=7)
    (clean, first, second), label = dataset[1]
    assert label == 1 and clean.shape == first.shape == (3, 32, 32)
    assert not torch.equal(clean, first) and not torch.equal(first, second)
    again = dataset[1][0]
    assert all(torch.equal(a, b) for a, b in zip((clean, first, second), again, strict=True))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1][0][1], first)
    # The clean view is the first stage (crop, flip) and the final stage only; the policy is the middle stage.
    first_stage, policy, final = create_transform(32, is_training=True, mean=MEAN, std=STD, separate=True)
    assert [type(t).__name__ for t in train[0].transform.transforms] == [
        type(t).__name__ for t in first_stage.transforms
    ]
    assert [type(t).__name__ for t in train[2].transforms] == ["MaybeToTensor", "Normalize"]
    assert "AugMixAugment" in repr(train[1]) and "AugMixAugment" not in repr(policy)


def test_resplit_keeps_random_erasing_off_the_clean_split_on_the_device() -> None:
    r = recipe(use_prefetcher=True, reprob=1.0, remode="const", resplit=True)
    assert isinstance(collate_fn(r), SplitCollate)
    images = torch.full((6, 3, 8, 8), 128, dtype=torch.uint8)
    prepared, targets, labels = BatchRecipe(r, 5, torch.device("cpu"))(images, torch.arange(2), epoch=0, step=0)
    normalized = (128 - 255 * 0.5) / (255 * 0.25)
    assert torch.allclose(prepared[:2], torch.full_like(prepared[:2], normalized))  # the clean split
    assert all((prepared[i] == 0).any() for i in range(2, 6))  # every augmented image erased (const: 0)
    assert labels.tolist() == [0, 1]


def test_aug_splits_problems_name_the_flag() -> None:
    assert split_problems(recipe(aug_splits=1), None)[0].startswith("--aug-splits 1: 0 (off) or at least 2")
    wiring = JsdWiring(logits=lambda o: o, loss="ce_loss")
    assert split_problems(recipe(), wiring) == []
    mixing = split_problems(recipe(mixup=0.8), wiring)
    assert len(mixing) == 1 and "cannot be combined with --mixup / --cutmix" in mixing[0]
    refused = split_problems(recipe(), JsdWiring(problem="the loss compares the labels with no model output"))
    assert refused == [
        "--aug-splits 3: the JSD consistency term needs the model's classification logits: the loss compares the "
        "labels with no model output"
    ]
    assert "--jsd-alpha -1.0: must be at least 0" in split_problems(recipe(jsd_alpha=-1.0), wiring)[0]
    for bad in (float("nan"), float("inf")):  # would make every loss nan: refused, not trained
        assert f"--jsd-alpha {bad}: must be at least 0 and finite" in split_problems(recipe(jsd_alpha=bad), wiring)[0]
