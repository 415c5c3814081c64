"""The plumbing under a generated ``train.py``: flags from a dataclass, data, run folders, evaluation.

A generated ``train.py`` keeps the training loop itself in view (AMP, accumulation with
``no_sync``, EMA, DDP, checkpoints); the helpers here are the parts a reader does not need to
see to follow it. Everything works single-process and under torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import Dataset

from scmc_runtime._optional import require
from scmc_runtime.checkpoint import find_latest
from scmc_runtime.data import ImageFolderDataset, ImageTransform, prepare_digits
from scmc_runtime.distributed import DistInfo, is_distributed
from scmc_runtime.metrics import MetricAccumulator

__all__ = [
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
]

T = TypeVar("T")
C = TypeVar("C")


# ---------------------------------------------------------------------------------------------
# Configuration: a dataclass whose fields are the command-line flags


def flag(default: T, help: str) -> T:
    """A dataclass field with a default and the ``--help`` text of its flag."""
    return dataclasses.field(default=default, metadata={"help": help})


def _unwrap_optional(annotation: Any) -> Tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType":
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return annotation, False


def config_parser(
    cls: Type[Any], description: Optional[str] = None, prog: Optional[str] = None
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls``.

    ``epochs: int`` becomes ``--epochs N``; ``bool`` fields get both ``--ema`` and ``--no-ema``;
    ``tuple[float, ...]``/``list[...]`` take several values; ``Optional[X]`` accepts ``none``.
    Help text comes from :func:`flag`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        annotation, optional = _unwrap_optional(hints[field.name])
        origin = typing.get_origin(annotation)
        kwargs: Dict[str, Any] = {"dest": field.name, "default": default, "help": help_text}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (tuple, list, Sequence):
            item = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
            kwargs.update(nargs="+", type=item)
        elif annotation in (int, float, str):
            kwargs["type"] = _optional(annotation) if optional else annotation
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: cannot make a flag for type {annotation!r}")
        parser.add_argument(name, **kwargs)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; the description (a module docstring) keeps its lines."""


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def parse_config(
    cls: Type[C], argv: Optional[Sequence[str]] = None, description: Optional[str] = None, prog: Optional[str] = None
) -> C:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into an instance of the dataclass ``cls``."""
    namespace = config_parser(cls, description, prog).parse_args(argv)
    values = vars(namespace)
    for field in dataclasses.fields(cls):
        if isinstance(field.default, tuple) and isinstance(values[field.name], list):
            values[field.name] = tuple(values[field.name])
    return cls(**values)


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
            mapping = getattr(getattr(self.dataset, "reader", None), "class_to_idx", None) or {}
            classes = sorted(mapping, key=mapping.get)
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
) -> Tuple[Dataset, Dataset, List[str]]:
    """(train set, validation set, class names) from one of three sources.

    ``data``: an ImageFolder root holding ``train/`` and ``val/`` (or ``validation/``);
    ``timm_dataset``: a timm dataset name such as ``torch/cifar10``, read from (and downloaded
    to, by local rank 0) ``cache_dir``;
    neither: scikit-learn's digits, unpacked once to ``cache_dir/digits`` (rank 0 of each node
    writes, the others wait). Training images get the random shift/flip, validation ones do not.
    """
    if data and timm_dataset:
        raise ValueError("pass either --data or --timm-dataset, not both")
    train_tf = ImageTransform(image_size, mean=mean, std=std, translate=translate, hflip=hflip)
    val_tf = ImageTransform(image_size, mean=mean, std=std)
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
        raise FileNotFoundError(f"{root} must hold train/ and val/ folders of class sub-folders (ImageFolder layout)")
    train_set = ImageFolderDataset(root / "train", train_tf, seed=seed)
    val_set = ImageFolderDataset(val_root, val_tf, seed=seed)
    if val_set.classes != train_set.classes:
        raise ValueError(f"{root}: train/ and {val_root.name}/ have different class folders")
    return train_set, val_set, train_set.classes


def _barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


# ---------------------------------------------------------------------------------------------
# Run folders


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (itself when single-process)."""
    if not is_distributed():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def _runs_of(out: Path, package: str) -> List[Path]:
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.is_dir() and (p.name == package or p.name.startswith(package + "-"))]


def _decide_run(out: Path, run_name: str, package: str, resume: str, pattern: str) -> Tuple[Path, Optional[Path]]:
    if resume and resume != "auto":
        checkpoint = Path(resume)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
        return (out / run_name if run_name else checkpoint.parent), checkpoint
    if run_name:
        run_dir = out / run_name
        latest = find_latest(run_dir, pattern)
        if resume == "auto":
            return run_dir, latest
        if latest is not None:
            raise FileExistsError(
                f"{run_dir} already holds a run ({latest.name}); pass --resume auto to continue it, "
                "or choose another --run-name"
            )
        return run_dir, None
    if resume == "auto":
        found = [(c.stat().st_mtime_ns, c) for c in (find_latest(r, pattern) for r in _runs_of(out, package)) if c]
        if found:
            checkpoint = max(found)[1]
            return checkpoint.parent, checkpoint
    taken = {p.name for p in _runs_of(out, package) if any(p.iterdir())}  # an empty folder is reused
    name, index = package, 1
    while name in taken:
        index += 1
        name = f"{package}-{index}"
    return out / name, None


def resolve_run(
    dist: DistInfo, *, out: str, run_name: str, package: str, resume: str, pattern: str = "last.pt"
) -> Tuple[Path, Optional[Path]]:
    """(run folder, checkpoint to resume from or None), decided on rank 0 and shared with every rank.

    ``resume``: ``""`` starts a new run (``<out>/<package>``, then ``<package>-2``, ... unless
    ``run_name`` is given; a named run that already has a checkpoint is refused rather than
    overwritten); ``"auto"`` continues the newest complete ``last.pt`` of ``run_name`` (or of
    the newest ``<package>*`` run) and starts fresh when there is none; a path resumes from
    that file. Rank 0 creates the folder.
    """
    decision: Any
    if dist.is_main:
        try:
            run_dir, checkpoint = _decide_run(Path(out), run_name, package, resume, pattern)
            run_dir.mkdir(parents=True, exist_ok=True)
            decision = (str(run_dir), str(checkpoint) if checkpoint else None)
        except (OSError, ValueError) as error:
            decision = error
    else:
        decision = None
    decision = broadcast_object(decision)
    if isinstance(decision, BaseException):
        raise decision
    run_dir_text, checkpoint_text = decision
    return Path(run_dir_text), (Path(checkpoint_text) if checkpoint_text else None)


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


def format_metrics(record: Mapping[str, Any]) -> str:
    """``epoch=3 val_acc1=0.9722 ...``: floats to 4 significant digits, other values as they are."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
