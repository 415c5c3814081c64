"""The plumbing under a generated ``train.py``: model probes, data, evaluation, what a run prints.

The generic loop itself is :class:`scmc_runtime.trainer.Trainer`; flags are
:mod:`scmc_runtime.config`, run folders :mod:`scmc_runtime.runs`, errors
:mod:`scmc_runtime.errors` (all re-exported here). Everything works single-process and under
torchrun.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import Dataset

from scmc_runtime._optional import require
from scmc_runtime.config import COMPILE_MODES, config_parser, flag, parse_config, validate_config
from scmc_runtime.data import IMAGE_EXTENSIONS as IMAGE_SUFFIXES
from scmc_runtime.data import ImageFolderDataset, ImageTransform, prepare_digits
from scmc_runtime.distributed import DistInfo, is_distributed
from scmc_runtime.errors import TrainError, UsageError, run_main
from scmc_runtime.metrics import MetricAccumulator
from scmc_runtime.runs import FRESH_HINT, RUN_FILE, broadcast_object, load_resume_state, resolve_run, start_run

__all__ = [
    "TrainError",
    "UsageError",
    "run_main",
    "validate_config",
    "probe_model",
    "check_classes",
    "load_resume_state",
    "start_run",
    "compiled_hyperparameters",
    "next_steps",
    "flag",
    "config_parser",
    "parse_config",
    "configure_torch",
    "build_datasets",
    "TimmImageDataset",
    "resolve_run",
    "has_batchnorm",
    "evaluate",
    "broadcast_object",
    "format_metrics",
    "COMPILE_MODES",
    "FRESH_HINT",
    "RUN_FILE",
]


def probe_model(
    build: Callable[[], nn.Module], call: Callable[[nn.Module, torch.Tensor, torch.Tensor], Any], image_size: int
) -> List[Tuple[int, ...]]:
    """Shapes of the model's outputs for one ``image_size`` image, computed on the meta device (no memory, no time).

    ``call(model, images, labels)`` runs the forward as train.py does. A model that cannot take
    images of that size is a ``UsageError`` naming ``--image-size``.
    """
    with torch.device("meta"):
        model = build()
        images = torch.empty(1, 3, image_size, image_size)
        labels = torch.zeros(1, dtype=torch.long)
    try:
        with torch.no_grad():
            outputs = call(model.eval(), images, labels)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"--image-size {image_size}: the model cannot take {image_size}x{image_size} images ({reason[:200]}); "
            "try a larger size"
        ) from None
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    elif not isinstance(outputs, (tuple, list)):
        outputs = [outputs]
    return [tuple(o.shape) for o in outputs if isinstance(o, torch.Tensor)]


def check_classes(classes: Sequence[str], output_shapes: Sequence[Tuple[int, ...]], *, allow: bool = False) -> None:
    """The data's class count must match the model's head (its first ``(batch, K)`` output), unless ``allow``."""
    heads = [shape[1] for shape in output_shapes if len(shape) == 2]
    if not heads or allow or heads[0] == len(classes):
        return
    raise TrainError(
        f"the data has {len(classes)} classes but the model's head has {heads[0]} outputs; rebuild the package "
        f"for {len(classes)} classes (e.g. scmc build ... -p num_classes={len(classes)}), "
        "or pass --allow-class-mismatch to train it anyway"
    )


def configure_torch(device: torch.device, *, threads: int = 0, deterministic: bool = False) -> None:
    """CPU threads, and either reproducible kernels or the fastest ones (cuDNN autotuning, TF32)."""
    if threads > 0:
        torch.set_num_threads(threads)
    # DDP warns once when a gradient's strides differ from its bucket's only along size-1 dims
    # (depthwise convolution weights): same memory layout, nothing to fix.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------
# Data


class TimmImageDataset(Dataset):
    """A timm dataset (``timm.data.create_dataset``) read as uint8 tensors through an :class:`ImageTransform`.

    Augmentation is seeded by ``(seed, epoch, index)`` exactly as in :class:`ImageFolderDataset`.
    """

    def __init__(
        self, name: str, root: Path, split: str, transform: ImageTransform, seed: int = 0, download: bool = True
    ) -> None:
        timm_data = require("timm.data", "--timm-dataset", "timm")
        self.dataset = timm_data.create_dataset(
            name, root=str(root), split=split, is_training=split == "train", download=download
        )
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        classes = getattr(self.dataset, "classes", None)  # torchvision datasets
        if classes is None:  # timm readers map class names to indices
            mapping: Dict[str, int] = getattr(getattr(self.dataset, "reader", None), "class_to_idx", None) or {}
            classes = sorted(mapping, key=mapping.__getitem__)
        self.classes = [str(name) for name in classes]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        rgb = image.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        pixels = data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()
        generator = None
        if self.transform.random:
            mixed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % (2**63)
            generator = torch.Generator().manual_seed(mixed)
        return self.transform(pixels, generator), int(label)


def build_datasets(
    dist: DistInfo,
    *,
    data: str = "",
    timm_dataset: str = "",
    cache_dir: str = "data",
    image_size: int = 224,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    translate: int = 0,
    hflip: bool = False,
    seed: int = 0,
    skip_bad_images: bool = False,
    log: Optional[Callable[[str], None]] = None,
    transforms: Optional[Tuple[Any, Any]] = None,
) -> Tuple[Dataset, Dataset, List[str]]:
    """(train set, validation set, class names) from one of three sources, checked where it is cheap.

    ``data``: an ImageFolder root holding ``train/`` and ``val/`` (or ``validation/``);
    ``timm_dataset``: a timm dataset name such as ``torch/cifar10``, read from (and downloaded
    to, by local rank 0) ``cache_dir``;
    neither: scikit-learn's digits, unpacked once to ``cache_dir/digits`` (rank 0 of each node
    writes, the others wait). Training images get the random shift/flip, validation ones do not.

    An image folder must have both splits, the same class sub-folders in each, and images in
    every training class; a ``TrainError`` says what is missing. ``skip_bad_images`` decodes
    every image once up front and drops (and counts, through ``log``) those that fail;
    without it an unreadable image stops training with its path when it is reached.
    """
    if data and timm_dataset:
        raise UsageError("--data and --timm-dataset: pass one data source, not both")
    train_tf: Any = ImageTransform(image_size, mean=mean, std=std, translate=translate, hflip=hflip)
    val_tf: Any = ImageTransform(image_size, mean=mean, std=std)
    if transforms is not None:  # (train, validation), e.g. timm's (scmc_runtime.recipe.build_transforms)
        train_tf, val_tf = transforms
    if timm_dataset:
        root = Path(cache_dir)
        if dist.local_rank == 0:  # one download per node; the others read what it wrote
            train = TimmImageDataset(timm_dataset, root, "train", train_tf, seed)
        _barrier()
        if dist.local_rank != 0:
            train = TimmImageDataset(timm_dataset, root, "train", train_tf, seed, download=False)
        val = TimmImageDataset(timm_dataset, root, "validation", val_tf, seed, download=False)
        return train, val, train.classes
    if data:
        root = Path(data)
    else:
        root = prepare_digits(Path(cache_dir) / "digits", is_writer=dist.local_rank == 0)
    val_root = root / "val" if (root / "val").is_dir() else root / "validation"
    if not (root / "train").is_dir() or not val_root.is_dir():
        missing = [
            name for name, there in (("train/", (root / "train").is_dir()), ("val/", val_root.is_dir())) if not there
        ]
        raise TrainError(
            f"--data {root}: no {' and no '.join(missing)} folder; it must hold train/ and val/ (or validation/), "
            "each with one sub-folder of images per class (ImageFolder layout)"
        )
    splits = []
    for folder, transform in ((root / "train", train_tf), (val_root, val_tf)):
        if not any(entry.is_dir() for entry in folder.iterdir()):
            raise TrainError(f"--data {root}: {folder.name}/ has no class sub-folders (one folder of images per class)")
        dataset = ImageFolderDataset(folder, transform, seed=seed)
        if skip_bad_images:
            dropped = dataset.drop_unreadable()
            if dropped and log is not None:
                log(f"--skip-bad-images: skipped {len(dropped)} unreadable image(s) in {folder}, e.g. {dropped[0][0]}")
        if not dataset.samples:
            raise TrainError(f"--data {root}: {folder.name}/ holds no images ({', '.join(IMAGE_SUFFIXES)})")
        splits.append(dataset)
    train_set, val_set = splits
    if val_set.classes != train_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise TrainError(
            f"--data {root}: train/ and {val_root.name}/ have different class folders "
            f"(only in train/: {', '.join(only_train) or '-'}; only in {val_root.name}/: {', '.join(only_val) or '-'})"
        )
    counts = [0] * len(train_set.classes)
    for _, label in train_set.samples:
        counts[label] += 1
    empty = [name for name, count in zip(train_set.classes, counts, strict=True) if count == 0]
    if empty:
        raise TrainError(f"--data {root}: train/ has no images for class(es) {', '.join(empty[:10])}")
    return train_set, val_set, train_set.classes


def _barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


# ---------------------------------------------------------------------------------------------
# Model helpers and evaluation


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    score: Callable[[Any, torch.Tensor], Mapping[str, torch.Tensor]],
    *,
    device: torch.device,
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    memory_format: torch.memory_format = torch.preserve_format,
    max_steps: int = 0,
) -> Dict[str, float]:
    """Means of ``score(model(images), labels)`` over ``loader`` on every rank (eval mode, no grad).

    ``score`` returns named scalar tensors (losses and metrics). Each rank scores its own shard
    and the means are reduced once at the end, weighted by batch size. ``max_steps`` > 0 stops
    each rank after that many batches. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    meter = MetricAccumulator(device)
    for index, (images, labels) in enumerate(loader):
        if max_steps and index >= max_steps:
            break
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            values = score(model(images), labels)
        meter.update(values, n=labels.shape[0])
    model.train(was_training)
    return meter.compute()


def compiled_hyperparameters(package: str, backward: Any) -> Dict[str, Any]:
    """What the package was compiled with, for MLflow params: template parameters and optimizer settings.

    ``template.<name>`` from the manifest's resolved parameters; ``optimizer.<name>.<group>.<key>``
    (lr, weight_decay, betas, ...) from ``backward.param_groups`` when the backward has it.
    """
    params: Dict[str, Any] = {}
    try:
        from importlib import resources

        manifest = json.loads((resources.files(package) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, ModuleNotFoundError):
        manifest = {}
    for name, value in sorted((manifest.get("resolved_parameters") or {}).items()):
        params[f"template.{name}"] = value
    for name, groups in (getattr(backward, "param_groups", None) or {}).items():
        for index, group in enumerate(groups):
            for key, value in group.items():
                if isinstance(value, (int, float, str, bool, tuple, list)) and key != "params":
                    params[f"optimizer.{name}.{index}.{key}"] = value
    return params


def next_steps(package: str, run_dir: Path, checkpoint: Path, tracking_uri: Optional[str]) -> str:
    """The lines printed at the end of a run: where its records are and what to do with the checkpoint."""
    lines = [f"  metrics:  {run_dir / 'metrics.jsonl'}"]
    if tracking_uri:
        lines.append(f"  MLflow:   mlflow ui --backend-store-uri {tracking_uri}")
    lines.append(f"  export:   scmc export <package folder> --checkpoint {checkpoint}")
    lines.append(f"  predict:  python -m {package}.predict --onnx <export folder>/model.onnx IMAGE ...")
    lines.append(f"  in python: {package}.load_checkpoint({str(checkpoint)!r})  # the EMA weights")
    return "\n".join(lines)


def format_metrics(record: Mapping[str, Any]) -> str:
    """``epoch=3 val_acc1=0.9722 ...``: floats to 4 significant digits, other values as they are."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
