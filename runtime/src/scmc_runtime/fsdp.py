"""FSDP2 for the generated ``train.py`` (``--strategy fsdp``): sharding, sharded EMA, sharded checkpoints.

``--strategy fsdp`` shards the model with ``torch.distributed.fsdp.fully_shard``: one FSDP unit
per instance of a repeating generated layer class (by default the generated class with the
most instances that hold parameters, e.g. ConvNeXt's ``Block``; ``--fsdp-unit ClassName``
chooses another), then the root. Each rank keeps 1/N of every parameter, of its gradient and of
the optimizer state; parameters are all-gathered per unit for forward and backward, gradients
reduce-scattered.

* Mixed precision: ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` when the
  compiled backward autocasts to bfloat16, float32 otherwise (the CPU default).
* Accumulation: between micro-steps gradients are neither reduce-scattered nor resharded
  (:meth:`Sharding.no_sync`, the FSDP2 counterpart of DDP's ``no_sync``).
* Gradient clipping in the compiled backward (``torch.nn.utils.clip_grad_norm_``) works on the
  sharded DTensor gradients: the norm it returns is the total norm over all shards.
* EMA (:class:`ShardedEma`) is kept of the *sharded* parameters: each rank averages its own
  shards (1/N of the memory of a full copy, no communication per update). Validation of the
  EMA weights swaps them into the sharded model for the duration (:meth:`ShardedEma.applied`).
* Checkpoints are written with ``torch.distributed.checkpoint`` (DCP): every rank writes its
  shards of the model, the optimizer state and the EMA into a temporary folder next to the
  checkpoint, which is renamed into place when complete; then ``last.pt`` (or ``best.pt``) is
  written atomically as a small ``weights_only`` file holding the non-tensor training state and
  the name of its shards folder. A crash at any point leaves ``last.pt`` naming a complete
  folder, so a half-written checkpoint is never resumed from. DCP reshards on load: a
  checkpoint saved by 2 ranks resumes on 1 or on 4.
* :func:`load_consolidated` turns a sharded checkpoint into a plain one (full tensors, no
  process group needed): what ``scmc export`` and the package's ``load_checkpoint`` read.

With a single process there is nothing to shard: the model stays a plain module, but EMA and
checkpoints take the sharded form above, so a 2-rank checkpoint resumes on one process.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, cast

import torch
import torch.distributed as torch_dist
from torch import nn

from scmc_runtime.checkpoint import (
    CheckpointError,
    PathLike,
    _fsync_directory,
    load_checkpoint,
    save_checkpoint,
    unwrap,
)
from scmc_runtime.distributed import DistInfo, is_distributed

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

__all__ = [
    "STRATEGIES",
    "Sharding",
    "ShardedEma",
    "check_strategy",
    "unit_candidates",
    "default_unit",
    "shard_model",
    "save_sharded",
    "load_sharded",
    "load_consolidated",
    "shards_folder",
    "local_bytes",
    "averaged_model",
]

STRATEGIES = ("ddp", "fsdp")
# The key of last.pt/best.pt that names its shards folder (a sibling folder of the file).
SHARDED_KEY = "sharded"
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: the local shard of a DTensor, the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


# ---------------------------------------------------------------------------------------------
# Flags


def check_strategy(cfg: Any) -> None:
    """``UsageError`` unless ``--strategy`` and the FSDP flags of a generated ``TrainConfig`` fit together."""
    from scmc_runtime.train import UsageError

    strategy = getattr(cfg, "strategy", "ddp")
    problems: List[str] = []
    if strategy not in STRATEGIES:
        problems.append(f"--strategy {strategy}: must be one of {', '.join(STRATEGIES)}")
    elif strategy != "fsdp":
        if getattr(cfg, "fsdp_unit", ""):
            problems.append(f"--fsdp-unit {cfg.fsdp_unit}: only with --strategy fsdp")
        if getattr(cfg, "activation_checkpointing", False):
            problems.append("--activation-checkpointing: only with --strategy fsdp (it wraps the FSDP units)")
        if not getattr(cfg, "reshard_after_forward", True):
            problems.append("--no-reshard-after-forward: only with --strategy fsdp")
    unit = getattr(cfg, "fsdp_unit", "")
    if unit and not unit.isidentifier():
        problems.append(f"--fsdp-unit {unit}: must be a class name of model.py, e.g. Block")
    if problems:
        if len(problems) == 1:
            raise UsageError(problems[0])
        raise UsageError(f"{len(problems)} problems with the flags:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# Wrap units


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def unit_candidates(model: nn.Module) -> Dict[str, int]:
    """Generated layer classes below the root that hold parameters -> their number of instances.

    "Generated" means defined in the root's own module (``model.py``); ordered by first appearance.
    """
    home = type(model).__module__
    counts: Dict[str, int] = {}
    for module in model.modules():
        if module is model or type(module).__module__ != home or not _has_parameters(module):
            continue
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def default_unit(model: nn.Module) -> Optional[str]:
    """The generated class with the most instances (ties: the one whose instances hold more parameters)."""
    counts = unit_candidates(model)
    if not counts:
        return None
    sizes: Dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name in counts and name not in sizes:
            sizes[name] = sum(p.numel() for p in module.parameters())
    return max(counts, key=lambda name: (counts[name], sizes[name]))


@dataclass
class Sharding:
    """How ``shard_model`` sharded a model (``world_size`` 1: not at all)."""

    unit: Optional[str]  # the class of the FSDP units; None: the root only
    units: int  # FSDP units below the root
    world_size: int
    param_dtype: Optional[torch.dtype]  # what forward/backward compute in (None: the parameters' own)
    reshard_after_forward: bool
    activation_checkpointing: bool

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if not self.sharded:
            return "--strategy fsdp with one process: the model is not sharded (checkpoints are DCP folders)"
        where = f"{self.units} units of {self.unit}, then the root" if self.unit else "the root only"
        dtype = str(self.param_dtype).replace("torch.", "") if self.param_dtype is not None else "float32"
        extra = ", activation checkpointing per unit" if self.activation_checkpointing else ""
        reshard = "resharded" if self.reshard_after_forward else "kept unsharded"
        return (
            f"FSDP over {self.world_size} ranks: {where}; parameters in {dtype}, gradients reduced in float32, "
            f"{reshard} after forward{extra}"
        )

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """A micro-step that does not update: no reduce-scatter, no resharding after backward (FSDP2's no_sync)."""
        if not self.sharded:
            yield
            return
        fsdp_model = cast("FSDPModule", model)  # fully_shard made the model an FSDPModule
        fsdp_model.set_requires_gradient_sync(False)
        fsdp_model.set_reshard_after_backward(False)
        try:
            yield
        finally:
            fsdp_model.set_requires_gradient_sync(True)
            fsdp_model.set_reshard_after_backward(True)


def shard_model(
    model: nn.Module,
    dist: DistInfo,
    *,
    unit: str = "",
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Sharding:
    """``fully_shard`` ``model`` in place: each instance of ``unit`` (default :func:`default_unit`), then the root.

    Call it after moving the model to its device and before building the optimizers. An unknown
    ``unit`` is a ``UsageError`` naming the classes that can be units. With one process nothing
    is sharded (activation checkpointing still applies).
    """
    from scmc_runtime.train import UsageError

    candidates = unit_candidates(model)
    present = {type(m).__name__ for m in model.modules() if m is not model and _has_parameters(m)}
    if unit and unit not in present:
        listed = ", ".join(f"{name} ({count}x)" for name, count in candidates.items()) or "none"
        raise UsageError(
            f"--fsdp-unit {unit}: the model has no layer of that class holding parameters; "
            f"generated classes that can be units: {listed}"
        )
    chosen = unit or default_unit(model)
    units = [m for m in model.modules() if m is not model and type(m).__name__ == chosen] if chosen else []
    param_dtype = torch.bfloat16 if autocast_dtype == torch.bfloat16 else None
    sharding = Sharding(
        chosen, len(units), dist.world_size, param_dtype, reshard_after_forward, activation_checkpointing
    )
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for module in units:
            checkpoint(module)  # recompute the unit's activations in backward; keeps parameter names
    if not sharding.sharded:
        return sharding
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Children before parents (reverse pre-order), so nested units are sharded first.
    for module in reversed(units):
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return sharding


def _reshard(model: nn.Module) -> None:
    """Free every all-gathered parameter, so the next forward all-gathers the shards as they are now."""
    for module in model.modules():
        reshard = getattr(module, "reshard", None)
        if callable(reshard) and hasattr(module, "set_requires_gradient_sync"):
            reshard()


# ---------------------------------------------------------------------------------------------
# EMA of the sharded parameters


class ShardedEma:
    """Exponential moving average of a (sharded) model's state, each rank averaging its own shards.

    The decay schedule is :class:`scmc_runtime.ema.ModelEma`'s (timm ``ModelEmaV3``), so
    ``--strategy fsdp`` and ``ddp`` average identically; floating-point entries are lerped,
    integer buffers copied. The average lives in DTensors shaped like the model's state dict,
    so DCP saves it sharded and reshards it on load. There is no separate averaged module:
    :meth:`applied` puts the averaged weights into the model while it is evaluated.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False) -> None:
        from scmc_runtime.ema import ModelEma

        # The decay schedule alone (ModelEma.get_decay, the same formula as timm ModelEmaV3.get_decay).
        self._schedule = ModelEma(nn.Module(), decay, warmup=warmup, use_timm=False)
        self.decay = decay
        with torch.no_grad():
            self.shadow: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def get_decay(self, step: Optional[int] = None) -> float:
        return self._schedule.get_decay(step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Move the average towards ``model``'s current shards (call after the optimizer step)."""
        weight = 1.0 - self.get_decay(step)
        current = model.state_dict()
        averaged: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        for name, ema_value in self.shadow.items():
            ema_local, model_local = _local(ema_value), _local(current[name])
            if ema_local.is_floating_point():
                averaged.append(ema_local)
                values.append(model_local.to(dtype=ema_local.dtype))
            else:
                ema_local.copy_(model_local)
        if averaged:
            torch._foreach_lerp_(averaged, values, weight=weight)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` with the averaged weights for the duration (its own restored afterwards)."""
        inner = unwrap(model)  # under torch.compile: the module whose state_dict keys the average uses
        _reshard(inner)
        current = inner.state_dict()  # detached views of the parameters' storage
        saved = {name: _local(value).clone() for name, value in current.items()}
        with torch.no_grad():
            for name, value in current.items():
                _local(value).copy_(_local(self.shadow[name]))
        try:
            yield model
        finally:
            _reshard(inner)
            with torch.no_grad():
                for name, value in current.items():
                    _local(value).copy_(saved[name])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in self.shadow.items():
                source = state_dict[name]
                if type(source) is type(value):
                    _local(value).copy_(_local(source))
                else:
                    value.copy_(source)


def averaged_model(ema: Any, model: nn.Module) -> contextlib.AbstractContextManager:
    """The module to validate the EMA weights with: ``ema.module`` (ModelEma), or ``model`` with them applied."""
    if isinstance(ema, ShardedEma):
        return ema.applied(model)
    return contextlib.nullcontext(ema.module)


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)


def _optimizers(backward: Any) -> Dict[str, torch.optim.Optimizer]:
    """The torch optimizers of a compiled backward, by name (``Optimization`` wrappers unwrapped)."""
    found = getattr(backward, "optimizers", None)
    if found is None:
        found = {"optimizer": backward.optimizer}
    return {name: getattr(opt, "optimizer", opt) for name, opt in found.items()}


def _plain_backward(state: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """``backward.state_dict()`` with each optimizer's own state left out (DCP holds it)."""
    plain = dict(state)
    for name in names:
        entry = plain.get(name)
        if isinstance(entry, Mapping) and "optimizer" in entry:
            plain[name] = {**entry, "optimizer": None}
        elif isinstance(entry, Mapping) and "param_groups" in entry:
            plain[name] = None
    return plain


def _filled_backward(plain: Mapping[str, Any], current: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """The inverse of :func:`_plain_backward`, with the optimizers' current states in the holes."""
    filled = dict(plain)
    for name in names:
        entry = filled.get(name)
        if isinstance(entry, Mapping) and "optimizer" in entry and entry["optimizer"] is None:
            filled[name] = {**entry, "optimizer": current[name]["optimizer"]}
        elif entry is None and name in current:
            filled[name] = current[name]
    return filled


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _broadcast(value: Any) -> Any:
    if not is_distributed():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(
    path: Path, state: Mapping[str, Any], model: nn.Module, backward: Any = None, *, is_main: bool = True
) -> Path:
    """Write a training checkpoint as DCP shards plus a small ``path`` file; every rank must call it.

    ``state`` is what the generated train.py would write to ``path``: its ``model`` (and ``ema``,
    when a :class:`ShardedEma` state) go to the shards, with the optimizer state of ``backward``
    (``None``: no optimizer state, as for ``best.pt``); the rest, with the name of the shards
    folder, to ``path``. Order: shards into ``.<stem>-shards-<step>-<token>.tmp/``, renamed without the dot and ``.tmp``,
    then ``path`` replaced atomically, then older shards folders of the same ``path`` removed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    stem = path.stem
    token = _broadcast(secrets.token_hex(4) if is_main else None)
    final = f"{stem}-shards-{int(state.get('global_step', 0) or 0):08d}-{token}"
    temporary = path.parent / f".{final}.tmp"
    tensors: Dict[str, Any] = {"model": get_model_state_dict(model)}
    parts = ["model"]
    if state.get("ema") is not None:
        tensors["ema"] = dict(state["ema"])
        parts.append("ema")
    plain = {k: v for k, v in state.items() if k not in ("model", "ema")}
    if backward is not None:
        optimizers = _optimizers(backward)
        tensors["optim"] = {name: get_optimizer_state_dict(model, opt) for name, opt in optimizers.items()}
        parts.append("optim")
        if "backward" in plain:
            plain["backward"] = _plain_backward(plain["backward"], list(optimizers))
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
    if is_distributed():
        torch_dist.barrier()  # the folder exists before any rank writes into it
    # Every rank its shards; rank 0 the metadata last.
    with _single_process_quiet():
        dcp.save(tensors, checkpoint_id=str(temporary), no_dist=not is_distributed())
    if is_distributed():
        torch_dist.barrier()
    if is_main:
        os.replace(temporary, path.parent / final)
        _fsync_directory(path.parent)
        save_checkpoint(path, {**plain, SHARDED_KEY: final, "sharded_parts": parts, "ema": None})
        for old in path.parent.glob(f"{stem}-shards-*"):
            if old.name != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        for stale in path.parent.glob(f".{stem}-shards-*.tmp"):  # left by a crash in an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    if is_distributed():
        torch_dist.barrier()
    return path


def shards_folder(path: Path, state: Mapping[str, Any]) -> Path:
    """The shards folder a sharded ``last.pt``/``best.pt`` names, checked; ``CheckpointError`` otherwise."""
    path = Path(path)
    name = state.get(SHARDED_KEY)
    if not isinstance(name, str) or not _FOLDER_NAME.match(name) or name in (".", ".."):
        raise CheckpointError(f"{path}: the checkpoint names an invalid shards folder ({name!r})")
    folder = path.parent / name
    if not (folder / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: its shards folder {name}/ is missing or incomplete; a sharded checkpoint is the file and "
            "that folder next to it (copy both)"
        )
    return folder


def load_sharded(path: Path, state: Dict[str, Any], model: nn.Module, backward: Any, ema: Any = None) -> None:
    """Load the shards of a checked sharded checkpoint into ``model``, ``backward`` and ``ema`` (every rank).

    ``state`` is ``path`` as :func:`scmc_runtime.train.load_resume_state` read and checked it.
    The shards are resharded to this job's world size (and to a plain model with one process).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    folder = shards_folder(path, state)
    parts = state.get("sharded_parts") or ["model"]
    if "optim" not in parts:
        raise CheckpointError(f"{path}: the checkpoint holds no optimizer state (best.pt holds weights only)")
    optimizers = _optimizers(backward)
    tensors: Dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optim": {name: get_optimizer_state_dict(model, opt) for name, opt in optimizers.items()},
    }
    if ema is not None and "ema" in parts:
        tensors["ema"] = ema.state_dict()
    try:
        with _single_process_quiet():
            dcp.load(tensors, checkpoint_id=str(folder), no_dist=not is_distributed())
    except Exception as error:  # DCP reports missing or mismatched entries as CheckpointException
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: its shards in {folder.name}/ cannot be read ({reason[:200]})") from None
    set_model_state_dict(model, tensors["model"])
    current = backward.state_dict()
    backward.load_state_dict(_filled_backward(state["backward"], current, list(optimizers)))
    for name, opt in optimizers.items():
        set_optimizer_state_dict(model, opt, tensors["optim"][name])
    if "ema" in tensors:
        ema.load_state_dict(tensors["ema"])


def load_consolidated(path: PathLike) -> Dict[str, Any]:
    """A train.py checkpoint as one plain dict of full tensors, whether sharded or not; no process group needed.

    A plain checkpoint is returned as :func:`scmc_runtime.checkpoint.load_checkpoint` reads it.
    A sharded one (``last.pt``/``best.pt`` naming a DCP shards folder) gets its ``model`` and
    ``ema`` read from the shards, joined into full tensors (the optimizer state is not read):
    the result is what a DDP run would have written, minus the optimizer state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    state = load_checkpoint(path)
    if SHARDED_KEY not in state:
        return state
    folder = shards_folder(path, state)
    parts = [p for p in (state.get("sharded_parts") or ["model"]) if p in ("model", "ema")]
    tensors: Dict[str, Dict[str, torch.Tensor]] = {part: {} for part in parts}
    try:
        reader = dcp.FileSystemReader(str(folder))
        metadata = reader.read_metadata()
        # Full-size tensors for the model and EMA entries, from the metadata; DCP fills them in place.
        for key, meta in metadata.state_dict_metadata.items():
            where = (metadata.planner_data or {}).get(key, (key,))
            if isinstance(meta, TensorStorageMetadata) and len(where) == 2 and where[0] in tensors:
                tensors[where[0]][str(where[1])] = torch.empty(meta.size, dtype=meta.properties.dtype)
        with _single_process_quiet():
            dcp.load(tensors, storage_reader=reader, no_dist=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: its shards in {folder.name}/ cannot be read ({reason[:200]})") from None
    plain = {k: v for k, v in state.items() if k not in (SHARDED_KEY, "sharded_parts")}
    for part in parts:
        if not tensors[part]:
            raise CheckpointError(f"{path}: its shards in {folder.name}/ hold no {part}")
        plain[part] = {name: value for name, value in tensors[part].items()}
    return plain


# ---------------------------------------------------------------------------------------------
# Measuring


def local_bytes(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> Dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (DTensors: their local shards)."""

    def size(tensor: torch.Tensor) -> int:
        local = _local(tensor)
        return local.numel() * local.element_size()

    params = sum(size(p) for p in model.parameters())
    grads = sum(size(p.grad) for p in model.parameters() if p.grad is not None)
    state = 0
    for opt in optimizers:
        for entry in opt.state.values():
            state += sum(size(v) for v in entry.values() if isinstance(v, torch.Tensor))
    return {"parameters": params, "gradients": grads, "optimizer_state": state, "total": params + grads + state}
