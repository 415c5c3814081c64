"""timm's training recipe under a generated ``train.py``: transforms, mixup/cutmix, soft targets, erasing.

Everything that augments comes from ``timm.data``: ``create_transform`` builds the per-image
pipeline (random-resized crop in its ``rrc``/``rkrc``/``rkrr`` modes, flips, color jitter,
grayscale, blur, ``auto_augment`` policies, random erasing) and the eval pipeline (resize by
``crop_pct``, center crop); ``Mixup`` mixes batches and makes the soft targets (label smoothing
included); ``RandomErasing`` erases on the device in the prefetcher path; ``RepeatAugSampler``
repeats samples over the ranks.

Exact resume. timm draws from the global ``random``, ``numpy`` and ``torch`` generators. Each image
is transformed under those generators seeded from ``(seed, epoch, index)`` (see
``ImageFolderDataset``) and each batch is mixed and erased under them seeded from
``(seed, rank, epoch, step)``; the previous states are restored afterwards, so augmentation never
disturbs dropout's stream, does not depend on the number of workers, and a run resumed
mid-epoch sees the very batches it would have seen. The RNG of every augmentation is thus fixed
by what the checkpoint holds (seed, epoch, step).

Soft targets. With mixup, cutmix or label smoothing the loss receives ``[B, C]`` probabilities
(``Mixup`` / ``mixup_target``); a loss that takes class indices is refused at start-up
(:func:`recipe_problems`). Training metrics are computed against the dominant target (the
class with the largest weight in each row, i.e. the label of the image that covers more of the
mixed image); validation never augments and scores hard labels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from scmc_runtime._optional import require
from scmc_runtime.augmix import JsdWiring, SplitCollate, erase_splits, split_problems
from scmc_runtime.seeding import mix_seed, seeded

__all__ = [
    "Recipe",
    "recipe_problems",
    "check_recipe",
    "seeded",
    "TimmTransform",
    "build_transforms",
    "BatchRecipe",
    "train_sampler",
    "collate_fn",
    "as_soft_targets",
    "IMAGE_DTYPES",
    "CROP_MODES",
    "MIXUP_MODES",
    "ERASE_MODES",
]

IMAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CROP_MODES = ("rrc", "rkrc", "rkrr")
MIXUP_MODES = ("batch", "pair", "elem")
ERASE_MODES = ("const", "rand", "pixel")
INTERPOLATIONS = ("random", "bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
PIPELINES = ("basic", "timm")


@dataclass(frozen=True)
class Recipe:
    """The recipe flags of a ``TrainConfig`` (same names as timm's train.py where timm has them)."""

    image_size: int = 224
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    data_pipeline: str = "basic"
    no_aug: bool = False
    scale: Tuple[float, ...] = (0.08, 1.0)
    ratio: Tuple[float, ...] = (3.0 / 4.0, 4.0 / 3.0)
    train_crop_mode: str = "rrc"
    train_interpolation: str = "random"
    interpolation: str = "bicubic"
    hflip_prob: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    color_jitter_prob: float = 1.0
    grayscale_prob: float = 0.0
    gaussian_blur_prob: float = 0.0
    auto_augment: str = ""
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    crop_pct: float = 0.875
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Tuple[float, ...] = ()
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    label_smoothing: float = 0.0
    num_aug_repeats: int = 0
    use_prefetcher: bool = False
    image_dtype: str = "float32"
    channels_last: bool = False
    aug_splits: int = 0
    resplit: bool = False
    jsd_alpha: float = 12.0

    @classmethod
    def from_config(cls, cfg: Any) -> "Recipe":
        """The recipe fields of ``cfg`` (a TrainConfig); fields it lacks keep the defaults above."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        for name in ("mean", "std", "scale", "ratio", "cutmix_minmax"):
            if name in values:
                values[name] = tuple(float(v) for v in values[name])
        return cls(**values)

    @property
    def timm(self) -> bool:
        return self.data_pipeline == "timm"

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (mixup or cutmix), at least in the first epoch."""
        return self.timm and (self.mixup > 0 or self.cutmix > 0 or bool(self.cutmix_minmax)) and self.mixup_prob > 0

    @property
    def splits(self) -> int:
        """The AugMix splits of a training batch (scmc_runtime.augmix): ``--aug-splits`` when it is on, else 1."""
        return self.aug_splits if self.timm and self.aug_splits > 1 else 1

    @property
    def soft(self) -> bool:
        """Whether the loss is fed probabilities made here (mixing or label smoothing)."""
        return self.mixes or (self.timm and self.label_smoothing > 0)


def recipe_problems(recipe: Recipe, *, soft_loss: bool, autocast: bool, world_size: int = 1) -> List[str]:
    """One line per recipe flag that cannot work (names the flag and what it accepts); empty when all is well."""
    problems: List[str] = []
    r = recipe
    if r.data_pipeline not in PIPELINES:
        problems.append(f"--data-pipeline {r.data_pipeline}: must be one of {', '.join(PIPELINES)}")
        return problems
    if r.image_dtype not in IMAGE_DTYPES:
        problems.append(f"--image-dtype {r.image_dtype}: must be one of {', '.join(IMAGE_DTYPES)}")
    elif r.image_dtype != "float32" and not autocast:
        problems.append(
            f"--image-dtype {r.image_dtype}: the model's weights are float32 and this package's backward runs "
            "without mixed precision; keep --image-dtype float32 or build with an AMP backward"
        )
    if not r.timm:
        used = [
            name
            for name, value in (
                ("--mixup", r.mixup),
                ("--cutmix", r.cutmix),
                ("--label-smoothing", r.label_smoothing),
                ("--reprob", r.reprob),
                ("--num-aug-repeats", r.num_aug_repeats),
                ("--auto-augment", r.auto_augment),
                ("--use-prefetcher", r.use_prefetcher),
                ("--aug-splits", r.aug_splits),
                ("--resplit", r.resplit),
            )
            if value
        ]
        if used:
            problems.append(f"{', '.join(used)}: timm's recipe flags need --data-pipeline timm")
        return problems
    if r.train_crop_mode not in CROP_MODES:
        problems.append(f"--train-crop-mode {r.train_crop_mode}: must be one of {', '.join(CROP_MODES)}")
    for name, value in (("train_interpolation", r.train_interpolation), ("interpolation", r.interpolation)):
        if value not in INTERPOLATIONS or (name == "interpolation" and value == "random"):
            allowed = INTERPOLATIONS if name == "train_interpolation" else INTERPOLATIONS[1:]
            problems.append(f"--{name.replace('_', '-')} {value}: must be one of {', '.join(allowed)}")
    if r.remode not in ERASE_MODES:
        problems.append(f"--remode {r.remode}: must be one of {', '.join(ERASE_MODES)}")
    if r.mixup_mode not in MIXUP_MODES:
        problems.append(f"--mixup-mode {r.mixup_mode}: must be one of {', '.join(MIXUP_MODES)}")
    for name in ("hflip_prob", "vflip", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob", "reprob"):
        if not 0.0 <= getattr(r, name) <= 1.0:
            problems.append(f"--{name.replace('_', '-')} {getattr(r, name)}: a probability, in [0, 1]")
    for name in ("mixup_prob", "mixup_switch_prob"):
        if not 0.0 <= getattr(r, name) <= 1.0:
            problems.append(f"--{name.replace('_', '-')} {getattr(r, name)}: a probability, in [0, 1]")
    if not 0.0 <= r.label_smoothing < 1.0:
        problems.append(f"--label-smoothing {r.label_smoothing}: must be in [0, 1), e.g. 0.1")
    for name in ("mixup", "cutmix", "color_jitter"):
        if getattr(r, name) < 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(r, name)}: must be at least 0 (0: off)")
    if len(r.scale) != 2 or not 0 < r.scale[0] <= r.scale[1] <= 1:
        problems.append(f"--scale {' '.join(map(str, r.scale))}: two values, 0 < min <= max <= 1")
    if len(r.ratio) != 2 or not 0 < r.ratio[0] <= r.ratio[1]:
        problems.append(f"--ratio {' '.join(map(str, r.ratio))}: two values, 0 < min <= max")
    if r.cutmix_minmax and (len(r.cutmix_minmax) != 2 or not 0 < r.cutmix_minmax[0] <= r.cutmix_minmax[1] <= 1):
        problems.append(f"--cutmix-minmax {' '.join(map(str, r.cutmix_minmax))}: two values, 0 < min <= max <= 1")
    if not 0 < r.crop_pct <= 1:
        problems.append(f"--crop-pct {r.crop_pct}: must be in (0, 1], e.g. 0.875")
    for name in ("recount", "num_aug_repeats", "mixup_off_epoch"):
        if getattr(r, name) < 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(r, name)}: must be at least 0")
    if r.recount < 1 and r.reprob > 0:
        problems.append(f"--recount {r.recount}: must be at least 1")
    if r.auto_augment and not r.auto_augment.startswith(("rand", "augmix", "original", "v0", "3a")):
        problems.append(
            f"--auto-augment {r.auto_augment}: not a timm policy; e.g. rand-m9-mstd0.5-inc1, original, v0, "
            "augmix-m5-w4-d2, 3a"
        )
    if r.soft and not soft_loss:
        used = [
            f"--{n.replace('_', '-')} {getattr(r, n)}" for n in ("mixup", "cutmix", "label_smoothing") if getattr(r, n)
        ]
        problems.append(
            f"{', '.join(used)}: these make soft targets (a probability per class), but this package's loss takes "
            "class indices; rebuild it with a soft-target loss (scmc build ... --loss cfg/losses/soft_cls.yaml), "
            "or pass --mixup 0 --cutmix 0 --label-smoothing 0"
        )
    return problems


def check_recipe(
    cfg: Any, *, soft_loss: bool, autocast: bool, world_size: int = 1, jsd: Optional[JsdWiring] = None
) -> Recipe:
    """The recipe of a TrainConfig, or one ``UsageError`` (exit 2) listing every problem with its flags.

    ``jsd``: how the package feeds the JSD term of ``--aug-splits`` (scmc_runtime.augmix).
    """
    from scmc_runtime.train import UsageError

    recipe = Recipe.from_config(cfg)
    problems = recipe_problems(recipe, soft_loss=soft_loss, autocast=autocast, world_size=world_size)
    if recipe.timm:
        problems += split_problems(recipe, jsd)
    problems += _ema_compile_problems(cfg)
    if len(problems) == 1:
        raise UsageError(problems[0])
    if problems:
        raise UsageError(f"{len(problems)} problems with the flags:\n  " + "\n  ".join(problems))
    return recipe


def _ema_compile_problems(cfg: Any) -> List[str]:
    """The EMA and torch.compile flags of the structcast-model presets (--ema-min-decay, --compile-backend, ...)."""
    problems = []
    value = getattr(cfg, "ema_min_decay", 0.0)
    if not 0.0 <= value < 1.0:
        problems.append(f"--ema-min-decay {value}: must be in [0, 1)")
    for name in ("ema_warmup_gamma", "ema_warmup_power"):
        value = getattr(cfg, name, 1.0)
        if value <= 0:
            problems.append(f"--{name.replace('_', '-')} {value}: must be positive")
    if getattr(cfg, "ema_update_after_step", 0) < 0:
        problems.append(f"--ema-update-after-step {cfg.ema_update_after_step}: must be at least 0")
    backend = getattr(cfg, "compile_backend", "inductor")
    if getattr(cfg, "compile", False) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        known = ", ".join(torch._dynamo.list_backends())
        problems.append(f"--compile-backend {backend}: not a torch.compile backend here (known: {known})")
    return problems


# ---------------------------------------------------------------------------------------------
# Per-image transforms


class TimmTransform:
    """A ``timm.data.create_transform`` pipeline called as ``transform(image, generator)`` by scmc's datasets.

    ``image`` is a PIL image (``takes_pil``: the image folder hands over the decoded file) or a
    uint8 CHW tensor. With a generator (training), timm's transforms run under the global RNGs
    seeded from it, so the result depends on ``(seed, epoch, index)`` only.
    """

    takes_pil = True

    def __init__(self, transform: Callable[[Any], Any], random: bool) -> None:
        self.transform = transform
        self.random = random

    def __call__(self, image: Any, generator: Optional[torch.Generator] = None) -> Any:
        if isinstance(image, torch.Tensor):
            Image = require("PIL.Image", "the timm data pipeline", "data")
            image = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
        if generator is None:
            return self.transform(image)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        with seeded(seed):
            return self.transform(image)

    def __repr__(self) -> str:
        return f"TimmTransform({self.transform!r})"


def _posterize_keeping_zero_bits(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's ``posterize`` op as Pillow < 13 ran it: 0 bits kept is a black image, not a ValueError."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def pillow_posterize_compat() -> bool:
    """Route timm's Posterize ops through :func:`_posterize_keeping_zero_bits` where Pillow refuses 0 bits.

    ``rand-m9-mstd0.5-inc1`` draws magnitudes up to 10, which ``PosterizeIncreasing`` maps to 0
    bits; Pillow 13 raises for that in ``ImageOps.posterize``, so timm's own policy would stop
    training at a random step. Returns whether the ops were rerouted.
    """
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return False
    except ValueError:
        pass
    auto_augment = require("timm.data.auto_augment", "--auto-augment", "timm")
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_keeping_zero_bits
    return True


def build_transforms(recipe: Recipe) -> Tuple[Any, TimmTransform]:
    """(training, validation) transforms from ``timm.data.create_transform``; validation never augments.

    The prefetcher path leaves training images as uint8 tensors (normalized and erased on the
    device by :class:`BatchRecipe`); validation images are always normalized here, as float32.
    With ``--aug-splits`` the training transform is timm's 3-stage tuple (``separate=True``: the
    first stage seeded here, the augmentation and final stages for ``timm.data.AugMixDataset``,
    which :class:`scmc_runtime.augmix.AugSplits` runs seeded).
    """
    timm_data = require("timm.data", "--data-pipeline timm", "timm")
    r = recipe
    if r.auto_augment:
        pillow_posterize_compat()
    train = timm_data.create_transform(
        r.image_size,
        is_training=True,
        no_aug=r.no_aug,
        train_crop_mode=r.train_crop_mode,
        scale=tuple(r.scale),
        ratio=tuple(r.ratio),
        hflip=r.hflip_prob,
        vflip=r.vflip,
        color_jitter=r.color_jitter,
        color_jitter_prob=None if r.color_jitter_prob >= 1.0 else r.color_jitter_prob,
        grayscale_prob=r.grayscale_prob,
        gaussian_blur_prob=r.gaussian_blur_prob,
        auto_augment=r.auto_augment or None,
        interpolation=r.train_interpolation,
        mean=tuple(r.mean),
        std=tuple(r.std),
        re_prob=r.reprob,
        re_mode=r.remode,
        re_count=r.recount,
        re_num_splits=erase_splits(r.aug_splits, r.resplit),
        use_prefetcher=r.use_prefetcher,
        separate=r.splits > 1,
    )
    val = timm_data.create_transform(
        r.image_size,
        is_training=False,
        interpolation=r.interpolation,
        mean=tuple(r.mean),
        std=tuple(r.std),
        crop_pct=r.crop_pct,
    )
    if r.splits > 1:  # (first stage, augmentation, final): AugMixDataset takes the last two
        first, augmentation, final = train
        return (TimmTransform(first, random=True), augmentation, final), TimmTransform(val, random=False)
    return TimmTransform(train, random=True), TimmTransform(val, random=False)


def collate_fn(recipe: Recipe) -> Optional[Callable[[Sequence[Any]], Any]]:
    """timm's ``fast_collate`` (uint8 batches) in the prefetcher path, else None (the default collate).

    With ``--aug-splits``: :class:`scmc_runtime.augmix.SplitCollate` (split-major batches).
    """
    if recipe.splits > 1:
        return SplitCollate(uint8=recipe.use_prefetcher)
    if recipe.timm and recipe.use_prefetcher:
        return require("timm.data.loader", "--use-prefetcher", "timm").fast_collate
    return None


def train_sampler(dataset: Any, *, rank: int, world_size: int, seed: int, repeats: int) -> Optional[Any]:
    """timm's ``RepeatAugSampler`` for ``--num-aug-repeats N`` (each sample N times, spread over the ranks)."""
    if repeats <= 0:
        return None
    sampler_module = require("timm.data.distributed_sampler", "--num-aug-repeats", "timm")
    sampler = sampler_module.RepeatAugSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeats
    )
    return _SeededRepeatSampler(sampler, seed)


class _SeededRepeatSampler(torch.utils.data.Sampler):
    """``RepeatAugSampler`` with ``--seed`` in its shuffle, yielding ``(copy, index)``: which repeat of the image it is.

    ``RepeatAugSampler`` shuffles by epoch alone; the epoch is offset by ``--seed`` so seeds
    differ. scmc seeds each image's augmentation by ``(seed, epoch, index)``, which would give
    every repeat of an image the same augmentation; the copy number (position ``i`` in the
    epoch's repeated list holds copy ``i % num_repeats``) makes the loader seed each copy apart
    (scmc_runtime.data.ResumableSampler reads copy ``c`` as epoch ``epoch + c * COPY_STRIDE``).
    """

    yields_copies = True

    def __init__(self, inner: Any, seed: int) -> None:
        self.inner = inner
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(self.seed * 100_003 + epoch)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        s = self.inner
        repeats = int(s.num_repeats)
        size = len(s.dataset) * repeats
        positions = range(s.rank, s.total_size, s.num_replicas)[: s.num_selected_samples]
        return iter([((i % size) % repeats, index) for i, index in zip(positions, s, strict=True)])

    def __len__(self) -> int:
        return len(self.inner)


# ---------------------------------------------------------------------------------------------
# Per-batch work: normalization on the device, erasing, dtype, mixing, soft targets


def as_soft_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels`` as ``[B, C]`` probabilities: already soft ones pass through, class indices become one-hot."""
    if labels.ndim == 2 and labels.is_floating_point():
        return labels
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


class BatchRecipe:
    """What happens to a training batch on the device, in timm's order.

    Prefetcher path: uint8 -> float, ``(x - mean) / std`` on the device, timm ``RandomErasing``
    on the device. Then the image dtype and memory format, then ``Mixup`` (which also applies the
    label smoothing) or, without mixing, smoothed one-hot targets. Returns ``(images, targets,
    labels)``: ``targets`` go to the loss (``[B, C]`` when soft), ``labels`` (class indices; the
    dominant target of a mixed batch) to the training metrics.
    """

    def __init__(self, recipe: Recipe, num_classes: int, device: torch.device, *, seed: int = 0, rank: int = 0):
        self.recipe = recipe
        self.num_classes = num_classes
        self.device = device
        self.seed = seed
        self.rank = rank
        self.dtype = IMAGE_DTYPES.get(recipe.image_dtype, torch.float32)
        self.memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
        self.mixup = None
        self.erasing = None
        self.mean = self.std = None
        if not recipe.timm:
            return
        timm_data = require("timm.data", "--data-pipeline timm", "timm")
        if recipe.mixes:
            self.mixup = timm_data.Mixup(
                mixup_alpha=recipe.mixup,
                cutmix_alpha=recipe.cutmix,
                cutmix_minmax=tuple(recipe.cutmix_minmax) or None,
                prob=recipe.mixup_prob,
                switch_prob=recipe.mixup_switch_prob,
                mode=recipe.mixup_mode,
                label_smoothing=recipe.label_smoothing,
                num_classes=num_classes,
            )
        if recipe.use_prefetcher:
            shape = (1, len(recipe.mean), 1, 1)
            self.mean = torch.tensor([255 * m for m in recipe.mean], device=device).view(shape)
            self.std = torch.tensor([255 * s for s in recipe.std], device=device).view(shape)
            if recipe.reprob > 0:
                from timm.data.random_erasing import RandomErasing

                self.erasing = RandomErasing(
                    recipe.reprob,
                    mode=recipe.remode,
                    max_count=recipe.recount,
                    num_splits=erase_splits(recipe.aug_splits, recipe.resplit),  # --resplit: the first split is kept
                    device=str(device),
                )

    def mixing(self, epoch: int) -> bool:
        """Whether batches of ``epoch`` (0-based) are mixed: until ``--mixup-off-epoch``, if it is set."""
        off = self.recipe.mixup_off_epoch
        return self.mixup is not None and not (off and epoch >= off)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        r = self.recipe
        mixing = self.mixing(epoch)
        random_batch = self.erasing is not None or mixing
        context = seeded(mix_seed(self.seed, self.rank, epoch, step), self.device) if random_batch else None
        with context or contextlib.nullcontext():
            if self.mean is not None:
                assert self.std is not None  # set with mean (--use-prefetcher)
                images = images.float().sub_(self.mean).div_(self.std)
                if self.erasing is not None:
                    images = self.erasing(images)
            targets = labels
            if mixing and images.shape[0] % 2 == 0:  # timm's Mixup pairs each image with its mirror in the batch
                assert self.mixup is not None  # mixing() is true only with a Mixup
                images, targets = self.mixup(images, labels)
            elif r.soft:
                mixup_target = require("timm.data.mixup", "--label-smoothing", "timm").mixup_target
                targets = mixup_target(labels, self.num_classes, lam=1.0, smoothing=r.label_smoothing)
        images = images.to(dtype=self.dtype, memory_format=self.memory_format)
        hard = targets.argmax(dim=-1) if targets.ndim == 2 else labels
        return images, targets, hard

    def side_stream(self) -> bool:
        """Whether :meth:`prefetch` prepares batches on a CUDA side stream: the prefetcher path on a CUDA device."""
        return self.recipe.timm and self.recipe.use_prefetcher and self.device.type == "cuda"

    def prefetch(
        self, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, epoch: int, first_step: int = 0
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``self(images, labels, epoch=epoch, step=step)`` of each loader batch, steps numbered from ``first_step``.

        On CUDA in the prefetcher path, batch ``k + 1`` is copied to the device, normalized, erased
        and mixed on a side stream while the training step of batch ``k`` runs on the current
        stream (timm's PrefetchLoader does the same): before a batch is handed out the current
        stream waits for the side stream, and each of its tensors is marked as used by the current
        stream (``record_stream``), so the caching allocator does not give its memory to the next
        batch while the step still reads it. Elsewhere (CPU, or without ``--use-prefetcher``) each
        batch is prepared when it is reached, exactly as a call per step. Either way the result is
        the same: the randomness of a batch is seeded by ``(seed, rank, epoch, step)`` alone.
        """
        steps = enumerate(batches, start=first_step)
        if not self.side_stream():
            for step, (images, labels) in steps:
                yield self(images, labels, epoch=epoch, step=step)
            return
        stream = torch.cuda.Stream(device=self.device)
        ready: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        for step, (images, labels) in steps:
            # The side stream starts after what the current stream has queued so far (the
            # previous step's use of the memory the allocator may hand out again).
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                upcoming = self(images, labels, epoch=epoch, step=step)
            if ready is not None:
                yield ready
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            for tensor in upcoming:
                tensor.record_stream(current)
            ready = upcoming
        if ready is not None:
            yield ready
