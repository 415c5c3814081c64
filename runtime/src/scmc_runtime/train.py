"""The plumbing under a generated ``train.py``: flags from a dataclass, data, run folders, evaluation.

A generated ``train.py`` keeps the training loop itself in view (AMP, accumulation with
``no_sync``, EMA, DDP, checkpoints); the helpers here are the parts a reader does not need to
see to follow it. Everything works single-process and under torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import traceback
import typing
import warnings
from pathlib import Path
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    List,
    Mapping,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
)

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import Dataset

from scmc_runtime._optional import require
from scmc_runtime.checkpoint import RESUME_KEYS, CheckpointError, check_checkpoint, load_checkpoint
from scmc_runtime.data import IMAGE_EXTENSIONS as IMAGE_SUFFIXES
from scmc_runtime.data import ImageFolderDataset, ImageTransform, prepare_digits
from scmc_runtime.distributed import DistInfo, is_distributed
from scmc_runtime.metrics import MetricAccumulator

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
]

T = TypeVar("T")
C = TypeVar("C")


# ---------------------------------------------------------------------------------------------
# Errors: a user mistake is one message and an exit code, never a traceback


class TrainError(Exception):
    """A mistake in the flags, the data or a checkpoint: printed as its message, exit status 1."""

    exit_code = 1


class UsageError(TrainError):
    """Flags that cannot work together or hold values out of range: exit status 2, nothing created."""

    exit_code = 2


_RUN_DIR: List[Optional[Path]] = [None]  # where an internal error's traceback goes, once known


def run_main(main: Callable[[], int], prog: str) -> NoReturn:
    """Run a generated ``main()`` and exit: user errors as one message, internal ones pointing to a log.

    ``TrainError`` and ``CheckpointError`` are the user's to fix: ``prog: error: message`` on
    stderr, exit 1 (2 for ``UsageError``). Ctrl-C outside the training loop exits 130. Anything
    else is a bug or an environment failure: its traceback is written to
    ``<run folder>/traceback.log`` (a temporary file before the run folder exists) and the
    message says so, exit 1.
    """
    from scmc_runtime.distributed import cleanup

    rank = os.environ.get("RANK", "0")
    who = prog if os.environ.get("WORLD_SIZE", "1") in ("", "1") else f"{prog} (rank {rank})"
    code = 0
    try:
        code = main()
    except (TrainError, CheckpointError) as error:
        print(f"{who}: error: {error}", file=sys.stderr, flush=True)
        code = getattr(error, "exit_code", 1)
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr, flush=True)
        code = 130
    except SystemExit:
        raise
    except BaseException as error:
        text = traceback.format_exc()
        log = _write_traceback(text, prog, rank)
        summary = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        print(
            f"{who}: internal error ({summary[:300]}); this is not a mistake in your flags. "
            f"The traceback is in {log}",
            file=sys.stderr,
            flush=True,
        )
        code = 1
    finally:
        try:
            cleanup()
        except Exception:  # a broken process group must not hide the message above
            pass
    raise SystemExit(code)


def _write_traceback(text: str, prog: str, rank: str) -> str:
    name = "traceback.log" if rank == "0" else f"traceback-rank{rank}.log"
    run_dir = _RUN_DIR[0]
    try:
        if run_dir is not None and run_dir.is_dir():
            path = run_dir / name
            path.write_text(text, encoding="utf-8")
            return str(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{prog.split()[-1].replace('.', '-')}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return tmp
    except OSError:
        sys.stderr.write(text)
        return "the output above"


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
    """Defaults after each flag's help (unless the help already says it); the description keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        if "(default" in text or action.default in ("", None):
            return text
        return super()._get_help_string(action)


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
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]  # C is unbound; cls is a config dataclass
        if isinstance(field.default, tuple) and isinstance(values[field.name], list):
            values[field.name] = tuple(values[field.name])
    return cls(**values)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def _device_problem(device: str) -> Optional[str]:
    if device in ("auto", "cpu"):
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        return "must be auto, cpu, cuda or cuda:N"
    if resolved.type != "cuda":
        return "must be auto, cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return "no CUDA device is available here; use --device cpu (or auto)"
    count = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    index = resolved.index if resolved.index is not None else local_rank
    if index >= count:
        return f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return None


def validate_config(
    cfg: Any,
    *,
    losses: Sequence[str] = (),
    metrics: Sequence[str] = (),
    world_size: Optional[int] = None,
) -> None:
    """Check every flag of a generated ``TrainConfig`` before anything is created; raise one ``UsageError``.

    Ranges, choices and combinations, the device really present, and ``best_metric`` among the
    names validation reports (``val_<loss or metric>``, ``ema_val_...`` with EMA,
    ``train_...``). Every problem is listed, one line each, naming the flag and what it accepts.
    Fields a config does not have are skipped.
    """
    values = dataclasses.asdict(cfg)
    problems: List[str] = []
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)

    def bad(name: str, message: str) -> None:
        problems.append(f"{_flag(name)} {_shown(values[name])}: {message}")

    at_least = {
        "epochs": 1,
        "batch_size": 1,
        "image_size": 1,
        "log_every": 1,
        "max_steps": 0,
        "max_val_steps": 0,
        "workers": 0,
        "threads": 0,
        "save_every": 0,
        "translate": 0,
    }
    for name, low in at_least.items():
        if name in values and values[name] < low:
            bad(name, f"must be at least {low}" + (" (0: all)" if name in ("max_steps", "max_val_steps") else ""))
    if values.get("batch_size", 0) >= 1 and world > 1 and values["batch_size"] % world:
        bad("batch_size", f"the global batch must be a multiple of the {world} ranks")
    for name in ("mean", "std"):
        if name in values and len(values[name]) != 3:
            bad(name, "give 3 values, one per RGB channel")
    if "std" in values and any(v <= 0 for v in values["std"]):
        bad("std", "every value must be positive")
    if "ema_decay" in values and not 0.0 <= values["ema_decay"] < 1.0:
        bad("ema_decay", "must be in [0, 1), e.g. 0.9998")
    if "best_mode" in values and values["best_mode"] not in ("max", "min"):
        bad("best_mode", "must be max or min")
    if "compile_mode" in values and values["compile_mode"] not in COMPILE_MODES:
        bad("compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
    if "device" in values:
        problem = _device_problem(values["device"])
        if problem:
            bad("device", problem)
    if values.get("data") and values.get("timm_dataset"):
        problems.append("--data and --timm-dataset: pass one data source, not both")
    if values.get("data"):
        root = Path(values["data"])
        if not root.is_dir():
            bad("data", "no such folder" if not root.exists() else "not a folder")
    resume = values.get("resume", "")
    if resume and resume != "auto" and not Path(resume).is_file():
        bad("resume", "no such checkpoint file (or pass auto: the newest last.pt of the run)")
    if values.get("fresh") and resume:
        problems.append(f"--fresh and --resume {resume}: --fresh starts a new run, --resume continues one")
    run_name = values.get("run_name", "")
    if run_name and (run_name in (".", "..") or "/" in run_name or os.sep in run_name):
        bad("run_name", "must be a folder name inside --out, without / or ..")
    out = Path(values.get("out", "") or ".")
    if out.exists() and not out.is_dir():
        bad("out", "exists and is not a folder")
    if "best_metric" in values and (losses or metrics):
        names = [f"val_{n}" for n in (*losses, *metrics)]
        if values.get("ema", False):
            names += [f"ema_val_{n}" for n in (*losses, *metrics)]
        names += [f"train_{n}" for n in (*losses, *metrics)]
        if values["best_metric"] not in names:
            bad("best_metric", f"must be one of {', '.join(names)}")
    if problems:
        if len(problems) == 1:
            raise UsageError(problems[0])
        raise UsageError(f"{len(problems)} problems with the flags:\n  " + "\n  ".join(problems))


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
# Run folders


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (itself when single-process)."""
    if not is_distributed():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


RUN_FILE = "run.json"  # written into every run folder: which package the run trains
FRESH_HINT = "pass --fresh to start a new run in a new folder next to it (nothing is overwritten)"


def _checkpoints_in(folder: Path) -> List[Path]:
    """Checkpoint files in a run folder, complete or not (temporary files of interrupted writes aside)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.pt") if p.is_file() and not p.name.startswith("."))


def _package_of(folder: Path) -> Optional[str]:
    try:
        value = json.loads((folder / RUN_FILE).read_text(encoding="utf-8")).get("package")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _runs_of(out: Path, package: str) -> List[Path]:
    """Run folders of ``package`` in ``out``: those whose run.json names it (or, without one, named after it)."""
    if not out.is_dir():
        return []
    runs = []
    for folder in out.iterdir():
        if not folder.is_dir():
            continue
        owner = _package_of(folder)
        if owner == package or (owner is None and (folder.name == package or folder.name.startswith(package + "-"))):
            runs.append(folder)
    return runs


def _free_folder(out: Path, base: str) -> Path:
    """``out/base``, else ``base-2``, ``base-3``, ...: the first that does not exist or holds nothing but run.json."""
    name, index = base, 1
    while not _reusable(out / name):
        index += 1
        name = f"{base}-{index}"
    return out / name


def _reusable(folder: Path) -> bool:
    if not folder.exists():
        return True
    return folder.is_dir() and all(entry.name == RUN_FILE for entry in folder.iterdir())


def _decide_run(
    out: Path, run_name: str, package: str, resume: str, fresh: bool = False
) -> Tuple[Path, Optional[Path]]:
    if resume and resume != "auto":
        checkpoint = Path(resume)
        if not checkpoint.is_file():
            raise UsageError(f"--resume {resume}: no such checkpoint file")
        run_dir = out / run_name if run_name else checkpoint.parent
        if run_dir.resolve() != checkpoint.parent.resolve() and _checkpoints_in(run_dir):
            raise TrainError(
                f"--run-name {run_name}: {run_dir} already holds another run's checkpoints "
                f"({', '.join(p.name for p in _checkpoints_in(run_dir))}); choose another --run-name"
            )
        return run_dir, checkpoint
    if fresh:
        return _free_folder(out, run_name or package), None
    if run_name:
        run_dir = out / run_name
        existing = _checkpoints_in(run_dir)
        last = run_dir / "last.pt"
        if resume == "auto":
            if last.is_file():
                return run_dir, last  # read and checked before anything is written
            if existing:
                raise TrainError(
                    f"{run_dir} holds {', '.join(p.name for p in existing)} but no last.pt to resume; {FRESH_HINT}, "
                    "or pass --resume with one of them"
                )
            return run_dir, None
        if existing:
            raise TrainError(
                f"{run_dir} already holds a run ({', '.join(p.name for p in existing)}); pass --resume auto to "
                f"continue it, --fresh to start a new run next to it, or choose another --run-name"
            )
        return run_dir, None
    if resume == "auto":
        runs = [r for r in _runs_of(out, package) if (r / "last.pt").is_file()]
        if runs:
            newest = max(runs, key=lambda r: ((r / "last.pt").stat().st_mtime_ns, r.name))  # the last.pt written last
            return newest, newest / "last.pt"
    return _free_folder(out, package), None


def resolve_run(
    dist: DistInfo,
    *,
    out: str,
    run_name: str,
    package: str,
    resume: str,
    fresh: bool = False,
    create: bool = True,
) -> Tuple[Path, Optional[Path]]:
    """(run folder, checkpoint to resume from or None), decided on rank 0 and shared with every rank.

    ``resume``: ``""`` starts a new run (``<out>/<package>``, then ``<package>-2``, ... unless
    ``run_name`` is given; a named run folder that holds any checkpoint, readable or not, is
    refused rather than overwritten); ``"auto"`` continues ``<run_name>/last.pt``, or the
    newest ``last.pt`` among this package's runs (the folders whose run.json names it), and
    starts fresh only when there is none; a path resumes from that file. A ``last.pt`` that
    exists is always returned, never skipped: the caller reads and checks it, and stops if it
    cannot be used. ``fresh``: a new run in the first free folder named after ``run_name`` (or
    the package). With ``create``, rank 0 creates the folder (see :func:`start_run`).
    """
    decision: Any
    if dist.is_main:
        try:
            run_dir, checkpoint = _decide_run(Path(out), run_name, package, resume, fresh)
            if create:
                start_run(dist, run_dir, package)
            decision = (str(run_dir), str(checkpoint) if checkpoint else None)
        except (OSError, TrainError) as error:
            decision = error
    else:
        decision = None
    decision = broadcast_object(decision)
    if isinstance(decision, OSError):
        raise TrainError(f"--out {out}: {decision.strerror or decision} ({decision.filename or out})")
    if isinstance(decision, BaseException):
        raise decision
    run_dir_text, checkpoint_text = decision
    return Path(run_dir_text), (Path(checkpoint_text) if checkpoint_text else None)


def start_run(dist: DistInfo, run_dir: Path, package: str) -> None:
    """Create the run folder (rank 0) with its run.json, and note it as the place for an internal error's log."""
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = run_dir / RUN_FILE
        if not marker.exists():
            marker.write_text(json.dumps({"package": package}) + "\n", encoding="utf-8")
    _RUN_DIR[0] = run_dir


def load_resume_state(
    path: Path,
    *,
    package: str,
    model: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    world_size: int,
    must_match: Iterable[str] = ("epochs", "batch_size", "max_steps", "seed"),
) -> Dict[str, Any]:
    """The training state in ``path``, checked before any of it is used; ``TrainError`` otherwise.

    Readable with ``weights_only`` (no pickled objects), written by ``package``, a resumable
    checkpoint (``last.pt``, not ``best.pt``), weights of exactly this model (names, shapes and
    dtypes), and the flags that fix the learning-rate schedule and the position in the data
    (``must_match``) the same as when it was written: a resume with another ``--epochs`` or
    ``--batch-size`` is refused rather than re-planned. A run stopped mid-epoch resumes only
    with the same number of ranks.
    """
    try:
        state = load_checkpoint(path)
        check_checkpoint(state, path, package=package, model=model, require=RESUME_KEYS)
    except CheckpointError as error:
        raise TrainError(
            f"{error}. Nothing was changed; to continue from another checkpoint pass --resume PATH, or {FRESH_HINT}"
        ) from None
    saved: Mapping[str, Any] = state["config"] if isinstance(state.get("config"), Mapping) else {}
    differ = [name for name in must_match if name in saved and name in config and saved[name] != config[name]]
    if differ:
        was = " ".join(f"{_flag(n)} {_shown(saved[n])}" for n in differ)
        now = " ".join(f"{_flag(n)} {_shown(config[n])}" for n in differ)
        raise TrainError(
            f"{path} was trained with {was}, not {now}: the learning-rate schedule and the position in the "
            f"data depend on them, so the run is not re-planned; resume with {was}, or {FRESH_HINT}"
        )
    saved_world = state.get("world_size", world_size)
    if state.get("step_in_epoch", 0) and saved_world != world_size:
        raise TrainError(
            f"{path} stopped mid-epoch with {saved_world} rank(s); resume it with {saved_world} rank(s) "
            f"(here: {world_size}), or from the checkpoint of an epoch's end"
        )
    return state


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
