"""Fine-tuning: weights from an existing checkpoint file mapped into a generated model.

:func:`load_pretrained` (``<pkg>.load_pretrained`` and ``train.py --init-from``) reads

* a plain state dict (``torch.save(model.state_dict(), path)``), as timm and torchvision write them;
* a training checkpoint that holds one under ``state_dict``, ``model`` (timm's train.py, a scmc
  ``best.pt``/``last.pt``), or their moving averages (``state_dict_ema``, ``model_ema``, ``ema``)
  with ``ema=True``;
* a ``.safetensors`` file (read with safetensors, which never runs code).

Untrusted files: ``torch.load(weights_only=True)`` through :func:`scmc_runtime.checkpoint.load_checkpoint`
(no pickled objects), a size limit checked before anything is read, and the structure checked
(names are strings, values tensors of a floating or integer dtype) before a value is used. A
``DistributedDataParallel``/``torch.compile`` prefix (``module.``, ``_orig_mod.``) is removed.

How tensors are paired with the model's state dict:

1. **by name**, when every name of the model's state dict is in the checkpoint (shapes must agree);
2. **by order and shape** otherwise (not for ``.safetensors``, which keeps its tensors sorted by name): the model's tensors and the checkpoint's, each in its own order
   (registration order, what ``state_dict()`` gives), pair one to one; the counts must be equal,
   every pair must have the same shape (up to dimensions of size 1: a 1x1 convolution's weight
   fits a linear layer's), and a name both sides have must pair with itself.

Anything else -- a shape mismatch, a different count, a name that pairs elsewhere -- is refused
with a table of what did not map (:class:`PretrainedError`) and the model is left untouched.
BatchNorm's ``num_batches_tracked`` counters are optional on either side. ``reset_head=True``
leaves the classifier (the last ``Linear``) as the model has it, for another class count: its
tensors are taken out of the pairing on both sides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from scmc_runtime._optional import require
from scmc_runtime.checkpoint import CheckpointError, load_checkpoint, unwrap

__all__ = [
    "MAX_PRETRAINED_BYTES",
    "PretrainedError",
    "WeightMap",
    "describe",
    "head_names",
    "init_from",
    "load_pretrained",
    "map_weights",
    "read_weights",
]

PathLike = Union[str, "os.PathLike[str]"]
MAX_PRETRAINED_BYTES = 16 * 2**30  # a larger file is refused before it is opened
MAX_TENSORS = 100_000
MAX_TABLE_ROWS = 30
WEIGHT_KEYS = ("state_dict", "model")  # where training checkpoints keep the weights, in order of preference
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
PREFIXES = ("module.", "_orig_mod.")
OPTIONAL = "num_batches_tracked"


class PretrainedError(CheckpointError):
    """A pretrained checkpoint cannot be read or does not map onto the model; the message says why."""


@dataclass(frozen=True)
class WeightMap:
    """How a checkpoint maps onto a model: ``pairs`` (model name, checkpoint name) and how they were found."""

    pairs: Tuple[Tuple[str, str], ...]
    how: str  # "name" or "order"
    skipped: Tuple[str, ...]  # checkpoint tensors not loaded (strict=False, or the old head)
    kept: Tuple[str, ...]  # model tensors left as they are (the head with reset_head, strict=False)


def _fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same shape, or one that differs only by dimensions of size 1 (a 1x1 convolution's
    ``[out, in, 1, 1]`` and a linear layer's ``[out, in]``): the elements are in the same order."""
    return a.shape == b.shape or [d for d in a.shape if d != 1] == [d for d in b.shape if d != 1]


def _shape(value: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in value.shape) + "]"


def _table(rows: Sequence[Tuple[str, str, str, str, str]]) -> str:
    header = ("generated name", "checkpoint name", "generated shape", "checkpoint shape", "why")
    shown = list(rows[:MAX_TABLE_ROWS])
    widths = [max(len(header[i]), *(len(r[i]) for r in shown)) for i in range(4)]
    lines = []
    for row in [header, *shown]:
        lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"  ... and {len(rows) - MAX_TABLE_ROWS} more")
    return "\n".join(lines)


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def read_weights(
    path: PathLike, *, ema: bool = False, max_bytes: int = MAX_PRETRAINED_BYTES
) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (see the module docstring), checked; ``PretrainedError`` otherwise."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError:
        raise PretrainedError(f"{path}: no such file") from None
    if not path.is_file():
        raise PretrainedError(f"{path}: not a regular file")
    if info.st_size > max_bytes:
        raise PretrainedError(f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} a weights file may have")
    if path.suffix == ".safetensors":
        state: Mapping = _read_safetensors(path)
        where = path.name
    else:
        try:
            state = load_checkpoint(path)
        except CheckpointError as error:
            raise PretrainedError(str(error)) from None
        state, where = _weights_entry(state, path, ema)
    if len(state) > MAX_TENSORS:
        raise PretrainedError(f"{path}: {len(state):,} entries, more than {MAX_TENSORS:,}")
    weights: Dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise PretrainedError(f"{path}: {where} has a key {name!r} that is not a name")
        if not isinstance(value, torch.Tensor):
            raise PretrainedError(f"{path}: {where}[{name!r}] is a {type(value).__name__}, not a tensor")
        if value.is_complex() or value.dtype == torch.bool or value.is_sparse or value.is_quantized:
            raise PretrainedError(f"{path}: {where}[{name!r}] is a {value.dtype} tensor; only dense real tensors load")
        key = _strip(name)
        if key in weights:
            raise PretrainedError(f"{path}: {name!r} and another entry both name {key!r}")
        weights[key] = value
    if not weights:
        raise PretrainedError(f"{path}: {where} holds no tensors")
    return weights


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    safetensors = require("safetensors.torch", "reading .safetensors weights", "timm")
    try:
        return dict(safetensors.load_file(str(path), device="cpu"))
    except Exception as error:  # safetensors raises SafetensorError / OSError for a damaged header or data
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedError(f"{path}: not a readable .safetensors file ({reason[:200]})") from None


def _weights_entry(state: Mapping, path: Path, ema: bool) -> Tuple[Mapping, str]:
    """The state dict inside a training checkpoint, or the file itself when it is one."""
    keys = (*EMA_KEYS, *WEIGHT_KEYS) if ema else WEIGHT_KEYS
    for key in keys:
        value = state.get(key)
        if isinstance(value, Mapping) and value:
            return value, f"the checkpoint's {key!r}"
    if ema:
        raise PretrainedError(f"{path}: the checkpoint has no moving-average weights ({', '.join(EMA_KEYS)})")
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        return state, "the state dict"
    found = ", ".join(repr(k) for k in list(state)[:8])
    raise PretrainedError(
        f"{path}: neither a state dict nor a checkpoint holding one under {' or '.join(map(repr, WEIGHT_KEYS))} "
        f"(its keys: {found})"
    )


def head_names(model: nn.Module) -> List[str]:
    """The state-dict names of the classifier: the parameters of the model's last ``nn.Linear``."""
    model = unwrap(model)
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise PretrainedError("reset_head: the model has no nn.Linear classifier to re-initialize")
    prefix = f"{last}." if last else ""
    return [prefix + n for n, _ in unwrap(model).get_submodule(last).named_parameters(recurse=False)]


def map_weights(
    model_state: Mapping[str, torch.Tensor],
    checkpoint: Mapping[str, torch.Tensor],
    *,
    head: Sequence[str] = (),
    strict: bool = True,
    path: str = "the checkpoint",
    ordered: bool = True,
) -> WeightMap:
    """Pair the checkpoint's tensors with the model's (see the module docstring); ``PretrainedError`` if they do not."""
    head = list(head)
    ours = {k: v for k, v in model_state.items() if k not in head}
    theirs = dict(checkpoint)
    old_head: List[str] = []
    if head:  # the checkpoint's classifier: the same names, else its last tensors of the same ranks
        if all(n in theirs for n in head):
            old_head = list(head)
        else:
            tail = [k for k in theirs if not k.endswith(OPTIONAL)][-len(head) :]
            ranks = [model_state[n].dim() for n in head]
            if len(tail) == len(head) and [theirs[k].dim() for k in tail] == ranks:
                old_head = tail
            else:
                raise PretrainedError(
                    f"{path}: cannot tell which tensors of the checkpoint are its classifier (the model's is "
                    f"{', '.join(head)}); load it without reset_head, or save the checkpoint without its head"
                )
        for name in old_head:
            theirs.pop(name)
    rows: List[Tuple[str, str, str, str, str]] = []
    if all(k in theirs or k.endswith(OPTIONAL) for k in ours):
        how = "name"
        pairs = [(k, k) for k in ours if k in theirs]
        for k, _ in pairs:
            if not _fits(ours[k], theirs[k]):
                rows.append((k, k, _shape(ours[k]), _shape(theirs[k]), "shapes differ"))
        extra = [k for k in theirs if k not in ours and not k.endswith(OPTIONAL)]
        if strict:
            rows += [("-", k, "-", _shape(theirs[k]), "not in the model (strict)") for k in extra]
        skipped = tuple(old_head) + tuple(k for k in theirs if k not in ours)
    elif not ordered:
        how = "name"
        missing = [k for k in ours if k not in theirs and not k.endswith(OPTIONAL)]
        rows += [(k, "-", _shape(ours[k]), "-", "not in the file, which keeps no order to pair by") for k in missing]
        pairs, skipped = [], ()
    else:
        how = "order"
        mine = [k for k in ours if not k.endswith(OPTIONAL)]
        others = [k for k in theirs if not k.endswith(OPTIONAL)]
        pairs = []
        for index in range(max(len(mine), len(others))):
            a = mine[index] if index < len(mine) else None
            b = others[index] if index < len(others) else None
            if a is None or b is None:
                why = "no checkpoint tensor left to pair with" if b is None else "no model tensor left to pair with"
                rows.append((a or "-", b or "-", _shape(ours[a]) if a else "-", _shape(theirs[b]) if b else "-", why))
                continue
            if not _fits(ours[a], theirs[b]):
                rows.append((a, b, _shape(ours[a]), _shape(theirs[b]), "shapes differ at this position"))
            elif a != b and (a in theirs or b in ours):
                rows.append(
                    (a, b, _shape(ours[a]), _shape(theirs[b]), "ambiguous: a name both sides have pairs elsewhere")
                )
            pairs.append((a, b))
        if len(mine) != len(others):
            rows.insert(
                0,
                (
                    f"({len(mine)} tensors)",
                    f"({len(others)} tensors)",
                    "",
                    "",
                    "the names differ and the counts too: cannot pair by order",
                ),
            )
        # A BatchNorm's counter follows its running mean: model X.running_mean <-> checkpoint Y.running_mean.
        owners = {a[: -len("running_mean")]: b[: -len("running_mean")] for a, b in pairs if a.endswith("running_mean")}
        for k in ours:
            if k.endswith(OPTIONAL) and owners.get(k[: -len(OPTIONAL)], "\0") + OPTIONAL in theirs:
                pairs.append((k, owners[k[: -len(OPTIONAL)]] + OPTIONAL))
        used = {b for _, b in pairs}
        skipped = tuple(old_head) + tuple(k for k in theirs if k.endswith(OPTIONAL) and k not in used)
    if rows:
        raise PretrainedError(
            f"{path} does not map onto the model (matched by {how}; {len(rows)} problem(s)); nothing was loaded:\n"
            + _table(rows)
            + (
                "\n  if only the classifier differs (another class count), pass reset_head (train.py: --reset-head)"
                if not head
                else ""
            )
        )
    paired = {a for a, _ in pairs}
    kept = tuple(head) + tuple(k for k in ours if k not in paired)
    return WeightMap(tuple(pairs), how, skipped, kept)


@torch.no_grad()
def load_pretrained(
    model: nn.Module,
    path: PathLike,
    *,
    reset_head: bool = False,
    strict: bool = True,
    ema: bool = False,
) -> WeightMap:
    """Copy the weights of ``path`` into ``model`` (in place); returns how they were mapped.

    ``reset_head`` keeps the model's own classifier (the last ``nn.Linear``: another class count);
    ``strict=False`` also accepts checkpoint tensors the model does not have when matching by name
    (they are skipped). ``ema`` takes a checkpoint's moving-average weights. Raises
    :class:`PretrainedError` (nothing is changed) when the file cannot be read or does not map.
    """
    target = unwrap(model)
    state = target.state_dict()
    weights = read_weights(path, ema=ema)
    head = head_names(target) if reset_head else []
    ordered = Path(path).suffix != ".safetensors"  # safetensors stores its tensors sorted by name
    mapping = map_weights(state, weights, head=head, strict=strict, path=str(path), ordered=ordered)
    for ours, theirs in mapping.pairs:
        value = weights[theirs]
        if state[ours].is_floating_point() != value.is_floating_point():
            raise PretrainedError(f"{path}: {theirs} is {value.dtype}, the model's {ours} is {state[ours].dtype}")
    for ours, theirs in mapping.pairs:
        state[ours].copy_(
            weights[theirs].reshape(state[ours].shape)
        )  # state_dict() tensors share storage with the model's
    return mapping


def describe(mapping: WeightMap, path: PathLike) -> str:
    """One line for the training log: how many tensors came from where."""
    text = f"initialized {len(mapping.pairs)} tensors from {path} (matched by {mapping.how})"
    if mapping.kept:
        text += f"; kept the model's own {', '.join(mapping.kept[:4])}{' ...' if len(mapping.kept) > 4 else ''}"
    if mapping.skipped:
        text += f"; skipped {len(mapping.skipped)} checkpoint tensor(s)"
    return text


def init_from(model: nn.Module, path: PathLike, *, reset_head: bool = False) -> str:
    """train.py's ``--init-from``: :func:`load_pretrained` with the flag named in a refusal; the log line."""
    try:
        mapping = load_pretrained(model, path, reset_head=reset_head)
    except PretrainedError as error:
        raise PretrainedError(f"--init-from: {error}") from None
    return describe(mapping, path)
