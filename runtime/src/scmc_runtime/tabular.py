"""Images with a row of tabular features and regression targets each: the ``image_table`` dataset.

A generated train.py of a package whose dataset preset is ``kind: image_table`` reads its data
through this module. The model takes two inputs (the image and the row's features) and the loss
and metric take two labels: ``label`` (the class index, from the image's folder) and ``target``
(the row's regression targets). The format on disk (``--data ROOT``)::

    ROOT/train/<class>/<image>.png      ROOT/val/<class>/<image>.png     (an ImageFolder tree)
    ROOT/train/table.csv                ROOT/val/table.csv

``table.csv`` has the header ``path,x0,...,x<F-1>,y0,...,y<T-1>`` and one row per image of the
split: ``path`` is the image's path relative to the split folder (``3/17.png``), ``x*`` are the
features and ``y*`` the regression targets, as decimal numbers. Every image needs exactly one
row and every row an image; a mistake is a :class:`TrainError` naming the file and the line.

Without ``--data`` the embedded digits are written in this format (:func:`prepare_digits_table`),
with features and targets that depend on the image and on each other, so a model can learn
them: ``x ~ N(0, 1)`` (seeded by the image), and target ``j`` is
``0.5 x[j % F] - 0.25 x[(j + 1) % F]`` plus the image's mean brightness scaled to [-1, 1]
(even ``j``) or its class scaled to [-1, 1] (odd ``j``).

    python -m scmc_runtime.tabular ROOT [--features 4] [--targets 2]   # write the digits table
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from scmc_runtime.data import ImageFolderDataset, ImageTransform, prepare_digits
from scmc_runtime.distributed import DistInfo
from scmc_runtime.train import TrainError, UsageError

__all__ = [
    "TABLE_NAME",
    "ImageTableDataset",
    "build_table_datasets",
    "prepare_digits_table",
    "read_table",
    "write_digits_table",
]

TABLE_NAME = "table.csv"
MAX_TABLE_BYTES = 256 * 1024 * 1024  # 256 MiB of CSV: millions of rows
_MARKER = ".scmc-digits-table-complete"


def _table_header(num_features: int, num_targets: int) -> List[str]:
    return ["path", *(f"x{i}" for i in range(num_features)), *(f"y{j}" for j in range(num_targets))]


def read_table(path: Path, num_features: int, num_targets: int) -> Dict[str, Tuple[List[float], List[float]]]:
    """``{relative image path: (features, targets)}`` from one split's ``table.csv``, every value checked."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise TrainError(
            f"{path}: no such file; an image_table split holds {TABLE_NAME} next to its class folders "
            f"(header: {','.join(_table_header(num_features, num_targets))})"
        ) from None
    except OSError as error:
        raise TrainError(f"{path}: cannot open the table: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TrainError(f"{path}: the table is not a regular file")
        if info.st_size > MAX_TABLE_BYTES:
            raise TrainError(f"{path}: {info.st_size:,} bytes, more than the {MAX_TABLE_BYTES:,} a table may have")
        raw = handle.read(MAX_TABLE_BYTES + 1)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TrainError(f"{path}: not UTF-8 text (byte {error.start})") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    expected = _table_header(num_features, num_targets)
    header = next(rows, None)
    if header is None:
        raise TrainError(f"{path}: empty; the first line must be the header {','.join(expected)}")
    header = [cell.strip() for cell in header]
    if header != expected:
        raise TrainError(
            f"{path}:1: the header is {','.join(header)[:200]}, but this package's data has {num_features} features "
            f"and {num_targets} targets: {','.join(expected)}"
        )
    table: Dict[str, Tuple[List[float], List[float]]] = {}
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(expected):
            raise TrainError(f"{path}:{line}: {len(row)} values, the header has {len(expected)}")
        name = row[0].strip().replace("\\", "/")
        try:
            values = [float(cell) for cell in row[1:]]
        except ValueError:
            bad = next(cell for cell in row[1:] if not _is_float(cell))
            raise TrainError(f"{path}:{line}: {bad.strip()[:40]!r} is not a number") from None
        if not all(math.isfinite(v) for v in values):
            raise TrainError(f"{path}:{line}: values must be finite (no nan or inf)")
        if name in table:
            raise TrainError(f"{path}:{line}: a second row for {name}")
        table[name] = (values[:num_features], values[num_features:])
    return table


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ImageTableDataset(Dataset):
    """``(image, features, class index, targets)`` items: an ImageFolder split joined with its ``table.csv``.

    Images are read and augmented exactly as :class:`~scmc_runtime.data.ImageFolderDataset` does
    (the same seeding by seed, epoch and index); features and targets are float32 vectors.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        num_features: int,
        num_targets: int,
        transform: Optional[Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]] = None,
        seed: int = 0,
    ) -> None:
        self.images = ImageFolderDataset(root, transform, seed=seed)
        self.root = self.images.root
        self.classes = self.images.classes
        table_path = self.root / TABLE_NAME
        table = read_table(table_path, num_features, num_targets)
        rows: List[Tuple[torch.Tensor, torch.Tensor]] = []
        seen = set()
        for path, _ in self.images.samples:
            name = path.relative_to(self.root).as_posix()
            if name not in table:
                raise TrainError(f"{table_path}: no row for the image {name}; every image of the split needs one")
            seen.add(name)
            features, targets = table[name]
            rows.append((torch.tensor(features, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32)))
        stray = sorted(set(table) - seen)
        if stray:
            raise TrainError(
                f"{table_path}: {len(stray)} row(s) name no image of {self.root} (e.g. {stray[0][:200]}); "
                "`path` is relative to the split folder, e.g. 3/17.png"
            )
        self.rows = rows

    @property
    def samples(self) -> List[Tuple[Path, int]]:
        return self.images.samples

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def drop_unreadable(self) -> List[Tuple[Path, str]]:
        """Drop the images that fail to decode, and their rows (``--skip-bad-images``)."""
        before = list(zip(self.images.samples, self.rows, strict=True))
        dropped = self.images.drop_unreadable()
        kept = set(self.images.samples)
        self.rows = [row for sample, row in before if sample in kept]
        return dropped

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        image, label = self.images[index]
        features, targets = self.rows[index]
        return image, features, label, targets


# ---------------------------------------------------------------------------------------------
# The embedded digits as an image table


def _digits_rows(root: Path, split: str, num_features: int, num_targets: int) -> List[List[Any]]:
    from PIL import Image  # the digits need Pillow anyway (scmc-runtime[data])

    rows = []
    folder = root / split
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = int(class_dir.name)
        for path in sorted(class_dir.glob("*.png")):
            with Image.open(path) as image:
                pixels = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
            brightness = float(pixels.float().mean()) / 255.0
            generator = torch.Generator().manual_seed(int(path.stem) * 7919 + 17)
            x = torch.randn(num_features, generator=generator).tolist()
            y = []
            for j in range(num_targets):
                image_term = 2.0 * brightness - 1.0 if j % 2 == 0 else (label - 4.5) / 4.5
                y.append(0.5 * x[j % num_features] - 0.25 * x[(j + 1) % num_features] + image_term)
            rows.append([f"{label}/{path.name}", *(f"{v:.6f}" for v in x), *(f"{v:.6f}" for v in y)])
    return rows


def write_digits_table(root: Union[str, os.PathLike], num_features: int = 4, num_targets: int = 2) -> Path:
    """Write the digits ImageFolder (if absent) and a ``table.csv`` per split under ``root``; returns ``root``."""
    if num_features < 1 or num_targets < 1:
        raise ValueError("num_features and num_targets must be at least 1")
    root = Path(root)
    prepare_digits(root)
    for split in ("train", "val"):
        rows = _digits_rows(root, split, num_features, num_targets)
        staging = root / split / f".{TABLE_NAME}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(staging, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(_table_header(num_features, num_targets))
            writer.writerows(rows)
        os.replace(staging, root / split / TABLE_NAME)  # atomic: a reader sees the old table or the new one
    return root


def prepare_digits_table(
    root: Union[str, os.PathLike], num_features: int, num_targets: int, *, is_writer: bool = True
) -> Path:
    """``root/digits_table_f<F>_t<T>``, written once (by ``is_writer`` ranks; the others wait for it)."""
    import time

    target = Path(root) / f"digits_table_f{num_features}_t{num_targets}"
    marker = target / _MARKER
    if marker.exists():
        return target
    if not is_writer:
        deadline = time.monotonic() + 600.0
        while not marker.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited 600s for {marker}; did the writing rank fail?")
            time.sleep(0.2)
        return target
    write_digits_table(target, num_features, num_targets)
    marker.write_text(f"num_features={num_features} num_targets={num_targets}\n")
    return target


# ---------------------------------------------------------------------------------------------
# train.py's data and evaluation for an image_table package


def build_table_datasets(
    dist: DistInfo,
    *,
    num_features: int,
    num_targets: int,
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
) -> Tuple[Dataset, Dataset, List[str]]:
    """(train set, validation set, class names) of an image table: ``data``, or the embedded digits table."""
    if timm_dataset:
        raise UsageError(
            "--timm-dataset: this package's model takes an image and a row of features; give --data ROOT "
            f"(ROOT/train and ROOT/val, each with class folders and {TABLE_NAME})"
        )
    if data:
        root = Path(data)
    else:
        root = prepare_digits_table(Path(cache_dir), num_features, num_targets, is_writer=dist.local_rank == 0)
    val_root = root / "val" if (root / "val").is_dir() else root / "validation"
    missing = [name for name, folder in (("train/", root / "train"), ("val/", val_root)) if not folder.is_dir()]
    if missing:
        raise TrainError(
            f"--data {root}: no {' and no '.join(missing)} folder; it must hold train/ and val/, each with one "
            f"sub-folder of images per class and a {TABLE_NAME}"
        )
    train_tf = ImageTransform(image_size, mean=mean, std=std, translate=translate, hflip=hflip)
    val_tf = ImageTransform(image_size, mean=mean, std=std)
    splits = []
    for folder, transform in ((root / "train", train_tf), (val_root, val_tf)):
        try:
            dataset = ImageTableDataset(folder, num_features, num_targets, transform, seed=seed)
        except FileNotFoundError as error:
            raise TrainError(f"--data {root}: {error}") from None
        if skip_bad_images:
            dropped = dataset.drop_unreadable()
            if dropped and log is not None:
                log(f"--skip-bad-images: skipped {len(dropped)} unreadable image(s) in {folder}, e.g. {dropped[0][0]}")
        if not len(dataset):
            raise TrainError(f"--data {root}: {folder.name}/ holds no images")
        splits.append(dataset)
    train_set, val_set = splits
    if val_set.classes != train_set.classes:
        raise TrainError(
            f"--data {root}: train/ and {val_root.name}/ have different class folders "
            f"({len(train_set.classes)} and {len(val_set.classes)}); both need the same ones"
        )
    return train_set, val_set, list(train_set.classes)


@torch.no_grad()
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scmc_runtime.tabular",
        description="Write scikit-learn's digits as an image_table dataset (class folders plus table.csv).",
    )
    parser.add_argument("root", help="folder to write (ROOT/train, ROOT/val)")
    parser.add_argument("--features", type=int, default=4, help="features per image (default 4)")
    parser.add_argument("--targets", type=int, default=2, help="regression targets per image (default 2)")
    args = parser.parse_args(argv)
    if args.features < 1 or args.targets < 1:
        parser.error("--features and --targets must be at least 1")
    root = write_digits_table(args.root, args.features, args.targets)
    print(f"wrote {root}/train and {root}/val (class folders and {TABLE_NAME})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
