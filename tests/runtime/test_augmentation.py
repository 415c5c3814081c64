"""scmc_runtime.recipe: each augmentation family reaches the batch, and every draw is fixed by (seed, epoch, index/step)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

from scmc_runtime.recipe import (  # noqa: E402
    BatchRecipe,
    Recipe,
    as_soft_targets,
    build_transforms,
    collate_fn,
    recipe_problems,
    train_sampler,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def picture(size: int = 40, seed: int = 0) -> "Image.Image":
    """A PIL image whose left and right halves differ, so flips and crops show."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    pixels[:, : size // 2] //= 4
    return Image.fromarray(pixels.numpy())


def pixels(image: "Image.Image") -> torch.Tensor:
    """A PIL image as a float CHW tensor in [0, 1]."""
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255.0


def recipe(**changes) -> Recipe:
    base = dict(data_pipeline="timm", image_size=32, mean=MEAN, std=STD, auto_augment="", color_jitter=0.0)
    return Recipe(**{**base, **changes})


def transformed(r: Recipe, image, seed: int = 1, train: bool = True) -> torch.Tensor:
    train_tf, val_tf = build_transforms(r)
    generator = torch.Generator().manual_seed(seed) if train else None
    return (train_tf if train else val_tf)(image, generator)


def test_crops_have_the_image_size_and_validation_resizes_by_crop_pct_then_center_crops():
    image = picture(50)
    for mode in ("rrc", "rkrc", "rkrr"):
        assert transformed(recipe(train_crop_mode=mode), image).shape == (3, 32, 32)
    val = transformed(recipe(crop_pct=0.5, interpolation="bicubic"), image, train=False)
    assert val.shape == (3, 32, 32)
    # crop_pct 0.5: the shorter side is resized to 64, and the middle 32 x 32 is kept
    resized = image.resize((64, 64), Image.BICUBIC).crop((16, 16, 48, 48))
    expected = pixels(resized)
    assert torch.allclose(val, (expected - 0.5) / 0.25, atol=1e-5)
    assert torch.equal(val, transformed(recipe(crop_pct=0.5), image, train=False))  # validation never augments


def test_the_crop_scale_reaches_the_transform():
    image = picture(64)
    whole = recipe(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=0.0, train_interpolation="bilinear")
    full = image.resize((32, 32), Image.BILINEAR)
    expected = pixels(full)
    assert torch.allclose(transformed(whole, image), (expected - 0.5) / 0.25, atol=1e-5)
    small = recipe(scale=(0.05, 0.05), ratio=(1.0, 1.0), hflip_prob=0.0, train_interpolation="bilinear")
    assert not torch.allclose(transformed(small, image), (expected - 0.5) / 0.25, atol=1e-2)


def test_flips_follow_their_probabilities():
    image = picture(32)
    base = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), train_interpolation="bilinear")
    plain = transformed(recipe(hflip_prob=0.0, **base), image)
    assert torch.equal(transformed(recipe(hflip_prob=1.0, **base), image), plain.flip(-1))
    assert torch.equal(transformed(recipe(hflip_prob=0.0, vflip=1.0, **base), image), plain.flip(-2))


def test_color_jitter_grayscale_blur_and_auto_augment_change_the_image_and_no_aug_turns_all_off():
    image = picture(32)
    base = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=0.0, train_interpolation="bilinear")
    plain = transformed(recipe(**base), image)
    gray = transformed(recipe(grayscale_prob=1.0, **base), image)
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    for changes in (
        dict(color_jitter=0.4),
        dict(gaussian_blur_prob=1.0),
        dict(auto_augment="rand-m9-mstd0.5-inc1"),
        dict(auto_augment="augmix-m5-w4-d2"),
        dict(auto_augment="original"),
    ):
        assert not torch.equal(transformed(recipe(**base, **changes), image), plain), changes
    assert transformed(recipe(no_aug=True, auto_augment="rand-m9", hflip_prob=1.0), image).shape == (3, 32, 32)
    off = transformed(recipe(no_aug=True, hflip_prob=1.0), image)
    assert torch.equal(off, transformed(recipe(no_aug=True, hflip_prob=1.0), image, seed=99))  # nothing random


def test_an_image_is_fixed_by_its_seed_and_the_global_generators_are_left_alone():
    image = picture(40)
    r = recipe(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5, color_jitter=0.4)
    torch.manual_seed(123)
    random.seed(5)
    before = (torch.get_rng_state(), random.getstate())
    first = transformed(r, image, seed=7)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert torch.equal(first, transformed(r, image, seed=7))
    assert not torch.equal(first, transformed(r, image, seed=8))


def batch(n: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(n)])
    return images, torch.arange(n) % classes


def test_mixup_makes_soft_targets_that_sum_to_one_and_metrics_score_the_dominant_target():
    images, labels = batch()
    prepare = BatchRecipe(recipe(mixup=0.8, label_smoothing=0.1), 4, torch.device("cpu"), seed=0)
    mixed, targets, hard = prepare(images.clone(), labels, epoch=0, step=0)  # timm mixes in place
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(-1), torch.ones(8))
    assert torch.equal(hard, targets.argmax(-1))
    lam = float(mixed[0, 0, 0, 0] - images[-1, 0, 0, 0]) / float(images[0, 0, 0, 0] - images[-1, 0, 0, 0])
    assert 0.0 <= lam <= 1.0 and not torch.equal(mixed, images)  # each image blended with its mirror image
    again = prepare(images.clone(), labels, epoch=0, step=0)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)  # fixed by (seed, rank, epoch, step)
    assert not torch.equal(prepare(images.clone(), labels, epoch=0, step=1)[1], targets)


def test_cutmix_pastes_one_box_of_the_mirror_image_and_weights_the_targets_by_its_area():
    images, labels = batch()
    prepare = BatchRecipe(recipe(cutmix=1.0), 4, torch.device("cpu"), seed=3)
    for step in range(5):
        mixed, targets, _ = prepare(images.clone(), labels, epoch=0, step=step)
        pasted = mixed[0, 0] == images[-1, 0, 0, 0]  # pixels of image 0 that came from image 7
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if len(rows):
            box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all() and int(pasted.sum()) == box.numel()  # one rectangle
        area = float(pasted.float().mean())
        assert targets[0, labels[0]] == pytest.approx(1 - area, abs=1e-6)  # correct_lam: weights by the real box
        assert torch.allclose(targets.sum(-1), torch.ones(8))


def test_mixup_off_epoch_stops_mixing_and_label_smoothing_alone_still_makes_soft_targets():
    images, labels = batch()
    prepare = BatchRecipe(recipe(mixup=1.0, mixup_off_epoch=2, label_smoothing=0.2), 4, torch.device("cpu"))
    assert prepare.mixing(1) and not prepare.mixing(2)
    out, targets, hard = prepare(images.clone(), labels, epoch=2, step=0)
    assert torch.equal(out, images) and torch.equal(hard, labels)
    assert torch.allclose(targets.max(-1).values, torch.full((8,), 0.85)) and torch.allclose(
        targets.sum(-1), torch.ones(8)
    )


def test_erasing_on_the_device_normalizes_uint8_batches_and_erases_regions():
    raw = torch.full((4, 3, 16, 16), 200, dtype=torch.uint8)
    plain = BatchRecipe(recipe(use_prefetcher=True), 4, torch.device("cpu"))
    normalized, targets, _ = plain(raw, torch.arange(4), epoch=0, step=0)
    assert torch.allclose(normalized, torch.full_like(normalized, (200 / 255 - 0.5) / 0.25))
    assert targets.dtype == torch.long  # no mixing, no smoothing: class indices
    erase = BatchRecipe(recipe(use_prefetcher=True, reprob=1.0, remode="const"), 4, torch.device("cpu"))
    erased, _, _ = erase(raw, torch.arange(4), epoch=0, step=0)
    zeros = erased == 0
    assert all(zeros[i].any() and not zeros[i].all() for i in range(4))  # a region of each image, not all of it
    assert torch.equal(erased, erase(raw, torch.arange(4), epoch=0, step=0)[0])


def test_image_dtype_and_channels_last_reach_the_batch():
    images, labels = batch()
    for dtype, expected in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        out, _, _ = BatchRecipe(recipe(image_dtype=dtype, channels_last=True), 4, torch.device("cpu"))(
            images, labels, epoch=0, step=0
        )
        assert out.dtype == expected and out.is_contiguous(memory_format=torch.channels_last)


def test_the_prefetcher_path_collates_uint8_and_the_default_path_does_not():
    assert collate_fn(recipe()) is None
    collate = collate_fn(recipe(use_prefetcher=True))
    image = transformed(recipe(use_prefetcher=True), picture(40))
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    images, labels = collate([(image, 1), (image, 2)])
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 2]


def test_repeated_augmentation_repeats_each_sample_and_follows_the_seed():
    data = list(range(12))
    sampler = train_sampler(data, rank=0, world_size=1, seed=0, repeats=3)
    sampler.set_epoch(0)
    order = list(sampler)  # (which copy, index): each copy of an image is augmented with its own seed
    assert len(order) == 12
    for i in range(0, 12, 3):
        assert [copy for copy, _ in order[i : i + 3]] == [0, 1, 2]
        assert order[i][1] == order[i + 1][1] == order[i + 2][1]
    other = train_sampler(data, rank=0, world_size=1, seed=1, repeats=3)
    other.set_epoch(0)
    assert list(other) != order
    assert train_sampler(data, rank=0, world_size=1, seed=0, repeats=0) is None


def test_soft_targets_pass_through_and_class_indices_become_one_hot():
    assert torch.equal(as_soft_targets(torch.tensor([2, 0]), 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    soft = torch.tensor([[0.2, 0.8]])
    assert as_soft_targets(soft, 2) is soft


def test_problems_name_the_flags():
    assert recipe_problems(recipe(), soft_loss=False, autocast=False) == []
    hard = recipe_problems(recipe(mixup=0.8), soft_loss=False, autocast=False)
    assert len(hard) == 1 and hard[0].startswith("--mixup 0.8: these make soft targets") and "soft_cls.yaml" in hard[0]
    basic = recipe_problems(Recipe(mixup=0.8, reprob=0.2), soft_loss=True, autocast=False)
    assert basic == ["--mixup, --reprob: timm's recipe flags need --data-pipeline timm"]
    many = recipe_problems(
        recipe(train_crop_mode="x", remode="y", mixup_mode="z", scale=(0.5, 0.1), image_dtype="bfloat16"),
        soft_loss=True,
        autocast=False,
    )
    assert [p.split(":")[0] for p in many] == [
        "--image-dtype bfloat16",
        "--train-crop-mode x",
        "--remode y",
        "--mixup-mode z",
        "--scale 0.5 0.1",
    ]


def test_timm_posterize_keeping_zero_bits_gives_a_black_image_instead_of_pillows_error():
    from timm.data import auto_augment

    from scmc_runtime.recipe import pillow_posterize_compat

    pillow_posterize_compat()
    op = auto_augment.NAME_TO_OP["PosterizeIncreasing"]
    image = picture(16)
    assert np.asarray(op(image, 0)).max() == 0  # level 10 of rand-m9-mstd0.5-inc1: no bit kept
    assert np.array_equal(np.asarray(op(image, 4)), np.asarray(image) & 0xF0)
    assert op(image, 8) is image
