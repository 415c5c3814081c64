"""Optimizers and learning-rate schedules for generated ``backward.py`` files.

A backward template's ``OPTIMIZER`` pattern is called with the named parameters of some layers
and returns an optimizer. ``structcast_model.torch.optimizers.X`` in old templates maps to
``scmc_runtime.optim.X``:

* :func:`create` -- parameter groups (weight decay / layer-wise lr decay) and a timm optimizer
  (``timm.optim.create_optimizer_v2``; plain ``torch.optim`` for adam/adamw/sgd/momentum when
  timm is not installed). Each group's ``lr_scale`` is multiplied into its ``lr`` once.
* :func:`create_with_scheduler` -- the same optimizer plus a schedule, returned together as an
  :class:`Optimization` object. The training loop calls :meth:`Optimization.step_update` after
  every optimizer update and :meth:`Optimization.step_epoch` at the end of every epoch; there
  are no global callbacks.

Learning-rate schedules keep the layer-decay invariant ``group lr == schedule lr * lr_scale``:
timm's schedulers multiply ``lr_scale`` in themselves; for ``torch.optim.lr_scheduler``
schedulers :class:`Optimization` steps the scheduler on the unscaled learning rates and writes the
scaled ones into the optimizer afterwards.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.optim import lr_scheduler as torch_schedulers

from scmc_runtime._optional import require
from scmc_runtime.checkpoint import unwrap
from scmc_runtime.regexes import Regexes, compile_all

__all__ = [
    "Optimization",
    "create",
    "create_with_scheduler",
    "named_parameters",
    "param_groups",
    "as_optimization",
    "parameters",
    "scale_gradients",
]

NamedParameters = Iterable[Tuple[str, nn.Parameter]]

# optimizers built with plain torch.optim when timm is missing, with timm's defaults for them
_TORCH_FALLBACK: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
}
_SGD_DROPS = ("betas", "eps")

# scheduler_kwargs keys that scmc itself reads (never passed to a scheduler)
_OWN_SCHEDULER_KEYS = ("name", "criterion")

# how an Optimization steps its scheduler
_NONE, _TIMM, _EPOCH, _UPDATE, _PLATEAU = "none", "timm", "native_epoch", "native_update", "native_plateau"


# --------------------------------------------------------------------------- parameters


def named_parameters(module: nn.Module, prefix: str = "", *, submodule: str = "") -> List[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of ``module`` under any DDP/DataParallel and ``torch.compile`` wrappers.

    Names never carry ``module.`` or ``_orig_mod.``; ``prefix`` (if any) is joined with a dot.
    ``submodule="backbone"`` takes the parameters of ``module.backbone`` only, still named
    from the model's root (``backbone.stem.conv.weight``), so layer-decay regexes match.
    Names are the template's: a layer inside a generated ``nn.Sequential`` stage is named by its
    step (``backbone.block2.fc1.weight``, not the state-dict key ``backbone.blocks1.0.fc1.weight``),
    as the class's ``step_names`` record, so regexes written against the template still match.
    """
    root = unwrap(module)
    params = root.get_submodule(submodule).named_parameters(prefix=submodule) if submodule else root.named_parameters()
    return [(".".join(p for p in (prefix, step_name(root, name)) if p), param) for name, param in params]


def step_name(root: nn.Module, name: str) -> str:
    """NAME (a dotted parameter name under ROOT) with every ``stage.index`` of a generated
    ``nn.Sequential`` replaced by the template's step name, from the class's ``step_names``."""
    parts = name.split(".")
    out: List[str] = []
    current: Optional[nn.Module] = root
    i = 0
    while i < len(parts):
        part = parts[i]
        steps = getattr(type(current), "step_names", None)
        child = current._modules.get(part) if current is not None else None
        if isinstance(steps, dict) and part in steps and child is not None and i + 1 < len(parts):
            index = parts[i + 1]
            if index.isdigit() and int(index) < len(steps[part]):
                out.append(str(steps[part][int(index)]))
                current = child._modules.get(index)
                i += 2
                continue
        out.append(part)
        current = child
        i += 1
    return ".".join(out)


def _as_named(params: Union[nn.Module, NamedParameters]) -> List[Tuple[str, nn.Parameter]]:
    if isinstance(params, nn.Module):
        return named_parameters(params)
    named = []
    for item in params:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                "expected (name, parameter) pairs, e.g. scmc_runtime.optim.named_parameters(module); "
                f"got an item of type {type(item).__name__}"
            )
        named.append(item)
    return named


def _no_weight_decay(
    name: str, param: torch.Tensor, decay: List["re.Pattern[str]"], no_decay: List["re.Pattern[str]"]
) -> bool:
    """Upstream rule: a weight-decay regex match wins; else 1-D (or 0-D) params and no-decay matches."""
    if any(pattern.match(name) for pattern in decay):
        return False
    return param.ndim <= 1 or any(pattern.match(name) for pattern in no_decay)


def param_groups(
    params: Union[nn.Module, NamedParameters],
    *,
    weight_decay: float = 0.0,
    layer_decay: Optional[float] = None,
    layer_group_regexes: Regexes = (),
    weight_decay_regexes: Regexes = (),
    no_weight_decay_regexes: Regexes = (),
) -> List[Dict[str, Any]]:
    """Optimizer parameter groups, with structcast-model's grouping rules.

    ``params`` are ``(name, parameter)`` pairs (or a module). Frozen parameters are left out and a
    parameter listed twice is kept once. Regexes are ``re.match``-ed against the names.

    * ``layer_decay`` > 0: one group per (layer group, decay/no-decay). A parameter belongs to the
      first of ``layer_group_regexes`` that matches it; group ``i`` of ``n`` gets
      ``lr_scale = layer_decay ** (n - i)`` and parameters matching none get ``lr_scale = 1.0``.
      Order: layer groups in regex order, then the unmatched parameters; no-decay before decay.
    * otherwise, ``weight_decay`` > 0 and some (no-)weight-decay regex given: a no-decay and a decay
      group, in that order.
    * otherwise one group with ``weight_decay`` for every parameter (as upstream: without regexes
      even biases and norm weights are decayed).

    A parameter is in a no-decay group (``weight_decay`` 0.0) when no ``weight_decay_regexes``
    matches it and it is 1-D or matches a ``no_weight_decay_regexes``. Empty groups are dropped.
    Every group carries ``param_names``.
    """
    named: List[Tuple[str, nn.Parameter]] = []
    seen = set()
    for name, param in _as_named(params):
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            named.append((name, param))
    decay = compile_all(weight_decay_regexes)
    no_decay = compile_all(no_weight_decay_regexes)

    if layer_decay is not None and layer_decay > 0.0:
        layers = compile_all(layer_group_regexes)
        count = len(layers)
        groups: Dict[Tuple[int, int], Dict[str, Any]] = {}
        for name, param in named:
            layer = next((i for i, pattern in enumerate(layers) if pattern.match(name)), count)
            decayed = 0 if _no_weight_decay(name, param, decay, no_decay) else 1
            group = groups.get((layer, decayed))
            if group is None:
                group = groups[(layer, decayed)] = {
                    "params": [],
                    "param_names": [],
                    "weight_decay": weight_decay if decayed else 0.0,
                    # layer `count` is "matched none": layer_decay ** 0 == 1.0, like upstream's
                    # layer_scales[-1]
                    "lr_scale": float(layer_decay ** (count - layer)),
                }
            group["params"].append(param)
            group["param_names"].append(name)
        return [groups[key] for key in sorted(groups)]

    if weight_decay > 0.0 and (decay or no_decay):
        split: Tuple[Dict[str, Any], Dict[str, Any]] = (
            {"params": [], "param_names": [], "weight_decay": 0.0},
            {"params": [], "param_names": [], "weight_decay": weight_decay},
        )
        for name, param in named:
            group = split[0] if _no_weight_decay(name, param, decay, no_decay) else split[1]
            group["params"].append(param)
            group["param_names"].append(name)
        return [group for group in split if group["params"]]

    if not named:
        return []
    return [
        {
            "params": [param for _, param in named],
            "param_names": [name for name, _ in named],
            "weight_decay": weight_decay,
        }
    ]


# --------------------------------------------------------------------------- optimizers


def _timm_optimizer_factory() -> Any:
    try:
        from timm.optim import create_optimizer_v2
    except ImportError:
        return None
    return create_optimizer_v2


def _torch_optimizer(groups: List[Dict[str, Any]], opt: str, kwargs: Dict[str, Any]) -> torch.optim.Optimizer:
    name = opt.lower()
    if name not in _TORCH_FALLBACK:
        require("timm.optim", f"optimizer {opt!r}", "timm")  # raises with the install hint
    cls, defaults = _TORCH_FALLBACK[name]
    arguments = {**defaults, **kwargs}
    if arguments.get("lr") is None:
        arguments.pop("lr", None)  # the optimizer's default, as timm does
    if cls is torch.optim.SGD:
        for key in _SGD_DROPS:
            arguments.pop(key, None)
    return cls(groups, **arguments)


def _build_optimizer(
    params: Union[nn.Module, NamedParameters],
    *,
    opt: str = "sgd",
    weight_decay: float = 0.0,
    layer_decay: Optional[float] = None,
    layer_group_regexes: Regexes = (),
    weight_decay_regexes: Regexes = (),
    no_weight_decay_regexes: Regexes = (),
    **kwargs: Any,
) -> torch.optim.Optimizer:
    groups = param_groups(
        params,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        layer_group_regexes=layer_group_regexes,
        weight_decay_regexes=weight_decay_regexes,
        no_weight_decay_regexes=no_weight_decay_regexes,
    )
    if not groups:
        raise ValueError("no trainable parameters: every parameter given to the optimizer is frozen (or none given)")
    if "betas" in kwargs and kwargs["betas"] is not None:
        kwargs["betas"] = tuple(kwargs["betas"])  # YAML gives a list
    factory = _timm_optimizer_factory()
    if factory is None:
        return _torch_optimizer(groups, opt, {"weight_decay": weight_decay, **kwargs})
    # every group carries its own weight_decay; the default only shows in optimizer.defaults
    return factory(groups, opt=opt, weight_decay=weight_decay, **kwargs)


def _set_lr(group: Dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def _apply_lr_scale_once(optimizer: torch.optim.Optimizer) -> None:
    """Multiply each group's ``lr_scale`` into its ``lr`` and drop the key (nothing will apply it again)."""
    for group in optimizer.param_groups:
        scale = group.pop("lr_scale", None)
        if scale is not None:
            _set_lr(group, float(group["lr"]) * scale)
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * scale


def create(params: Union[nn.Module, NamedParameters], **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer over ``params`` (``(name, parameter)`` pairs), without a schedule.

    ``optimizer_kwargs``: ``opt`` (a timm optimizer name, default ``"sgd"``), ``lr``,
    ``weight_decay``, ``layer_decay``, ``layer_group_regexes``, ``weight_decay_regexes``,
    ``no_weight_decay_regexes`` (see :func:`param_groups`) and any keyword of
    ``timm.optim.create_optimizer_v2`` or of the optimizer (``betas``, ``eps``, ``momentum`` ...).
    Layer-decay ``lr_scale`` is multiplied into each group's ``lr`` once and removed.
    """
    optimizer = _build_optimizer(params, **optimizer_kwargs)
    _apply_lr_scale_once(optimizer)
    return optimizer


# --------------------------------------------------------------------------- schedulers


def _is_timm_scheduler(scheduler: Any) -> bool:
    return hasattr(scheduler, "step_update") and hasattr(scheduler, "t_in_epochs")


def _native_class(name: str) -> Optional[type]:
    cls = getattr(torch_schedulers, name, None)
    if isinstance(cls, type) and issubclass(cls, (torch_schedulers.LRScheduler, torch_schedulers.ReduceLROnPlateau)):
        return cls
    return None


def _check_kwargs(what: str, given: Mapping[str, Any], accepted: Iterable[str]) -> None:
    accepted = set(accepted)
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise TypeError(
            f"unknown scheduler kwargs for {what}: {', '.join(unknown)} " f"(accepted: {', '.join(sorted(accepted))})"
        )


def _native_scheduler(optimizer: torch.optim.Optimizer, name: str, kwargs: Dict[str, Any]) -> Any:
    cls = _native_class(name)
    if cls is None:
        raise ValueError(f"{name!r} is not a torch.optim.lr_scheduler scheduler")
    kwargs = dict(kwargs)
    if "schedulers" in kwargs:  # SequentialLR / ChainedScheduler: nested {name: ..., **kwargs} dicts
        nested = []
        for item in kwargs["schedulers"]:
            item = dict(item)
            if "name" not in item:
                raise ValueError(f"each entry of 'schedulers' for {name} needs a 'name', got {item!r}")
            nested.append(_native_scheduler(optimizer, item.pop("name"), item))
        kwargs["schedulers"] = nested
    signature = inspect.signature(cls)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        _check_kwargs(f"torch.optim.lr_scheduler.{name}", kwargs, set(signature.parameters) - {"optimizer"})
    return cls(optimizer=optimizer, **kwargs)


def _timm_scheduler(optimizer: torch.optim.Optimizer, name: str, kwargs: Dict[str, Any]) -> Tuple[Any, Optional[int]]:
    factory = require("timm.scheduler", f"the {name!r} learning-rate schedule", "timm").create_scheduler_v2
    accepted = set(inspect.signature(factory).parameters) - {"optimizer", "sched"}
    _check_kwargs(f"timm scheduler {name!r}", kwargs, accepted)
    if not kwargs.get("step_on_epochs", True) and not kwargs.get("updates_per_epoch"):
        raise ValueError(
            f"scheduler {name!r} with step_on_epochs=False needs updates_per_epoch (optimizer updates per epoch)"
        )
    with warnings.catch_warnings():
        # timm deprecates 'plateau' because timm does not checkpoint its state; Optimization does
        warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
        scheduler, num_epochs = factory(optimizer, sched=name, **kwargs)
    return scheduler, num_epochs


class Optimization:
    """An optimizer with its learning-rate schedule, stepped explicitly by the training loop.

    Per timm's convention, after every optimizer update call ``step_update(num_updates)`` with the
    number of updates done so far, and at the end of every epoch call ``step_epoch(epoch + 1,
    metric)`` with the index of the next epoch. Each scheduler reacts to the call it is meant for:

    * timm schedulers: both calls are forwarded (timm skips the one it does not step on);
      ``plateau`` needs the metric at ``step_epoch``.
    * ``torch.optim.lr_scheduler`` schedulers: stepped at ``step_epoch``, except
      ``CosineAnnealingWarmRestarts`` (stepped at ``step_update`` with the fractional epoch
      ``num_updates / updates_per_epoch``) and ``ReduceLROnPlateau`` (stepped at ``step_epoch``
      with the metric).

    Layer-decay ``lr_scale`` values are honoured: each group's lr is the schedule's lr times its
    ``lr_scale``. Without a scheduler ``lr_scale`` is multiplied into the lr once, as in :func:`create`.

    ``param_groups``, ``state``, ``defaults``, ``step()`` and ``zero_grad()`` are the optimizer's
    (pass ``.optimizer`` to ``torch.amp.GradScaler``). ``state_dict()`` holds the optimizer and the
    schedule as tensors and plain values only.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        criterion: Optional[str] = None,
        updates_per_epoch: Optional[int] = None,
        num_epochs: Optional[int] = None,
    ) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.criterion = criterion
        self.updates_per_epoch = updates_per_epoch
        self.num_epochs = num_epochs
        # lrs of the native schedule before lr_scale (None unless a torch scheduler is used)
        self._unscaled: Optional[List[float]] = None
        if scheduler is None:
            self._kind = _NONE
            _apply_lr_scale_once(optimizer)
        elif _is_timm_scheduler(scheduler):
            self._kind = _TIMM  # timm's Scheduler.update_groups multiplies lr_scale itself
        elif isinstance(scheduler, torch_schedulers.ReduceLROnPlateau):
            self._kind = _PLATEAU
        elif isinstance(scheduler, torch_schedulers.CosineAnnealingWarmRestarts):
            if not updates_per_epoch or updates_per_epoch <= 0:
                raise ValueError("CosineAnnealingWarmRestarts steps per update: pass updates_per_epoch > 0")
            self._kind = _UPDATE
        elif isinstance(scheduler, torch_schedulers.LRScheduler):
            self._kind = _EPOCH
        else:
            raise TypeError(f"unsupported scheduler type {type(scheduler).__qualname__}")
        if self._kind in (_PLATEAU, _UPDATE, _EPOCH):
            self._unscaled = [float(group["lr"]) for group in optimizer.param_groups]
            self._write_scaled()

    # ---- what the optimizer offers
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> Dict[str, Any]:
        return self.optimizer.defaults

    def step(self, closure: Any = None) -> Any:
        """``optimizer.step(closure)`` (does not step the schedule)."""
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ---- schedule
    @property
    def step_on_epochs(self) -> bool:
        """Whether the learning rate changes at ``step_epoch`` (True) or at ``step_update`` (False)."""
        if self._kind == _TIMM:
            return bool(self.scheduler.t_in_epochs)
        return self._kind != _UPDATE

    def lrs(self) -> List[float]:
        """The learning rate of each parameter group, as the next update will use it."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def step_update(self, num_updates: int, metric: Optional[float] = None) -> None:
        """Call after every optimizer update; ``num_updates`` counts the updates done so far (from 1)."""
        metric = None if metric is None else float(metric)
        if self._kind == _TIMM:
            self.scheduler.step_update(num_updates, metric)
        elif self._kind == _UPDATE:
            assert self.updates_per_epoch  # _UPDATE is chosen only with updates_per_epoch > 0
            self._native_step(num_updates / self.updates_per_epoch)

    def step_epoch(self, epoch: int, metric: Optional[float] = None) -> None:
        """Call at the end of each epoch with the index of the next epoch (``epoch + 1``)."""
        metric = None if metric is None else float(metric)
        needs_metric = self._kind == _PLATEAU or (
            self._kind == _TIMM and hasattr(self.scheduler, "lr_scheduler")  # timm's plateau
        )
        if needs_metric and metric is None:
            what = f" ({self.criterion!r})" if self.criterion else ""
            raise ValueError(f"the plateau schedule needs the monitored metric{what} at step_epoch")
        if self._kind == _TIMM:
            self.scheduler.step(epoch, metric)
        elif self._kind == _PLATEAU:
            self._native_step(metric)
        elif self._kind == _EPOCH:
            self._native_step()

    def _native_step(self, *args: Any) -> None:
        assert self._unscaled is not None
        for group, value in zip(self.optimizer.param_groups, self._unscaled, strict=False):
            _set_lr(group, value)
        self.scheduler.step(*args)
        self._unscaled = [float(group["lr"]) for group in self.optimizer.param_groups]
        self._write_scaled()

    def _write_scaled(self) -> None:
        assert self._unscaled is not None
        for group, value in zip(self.optimizer.param_groups, self._unscaled, strict=False):
            if "lr_scale" in group:
                _set_lr(group, value * group["lr_scale"])

    # ---- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """``{"optimizer", "scheduler", "unscaled_lrs"}``: tensors and plain values only."""
        scheduler = None
        if self._kind == _TIMM:
            scheduler = {k: v for k, v in vars(self.scheduler).items() if k not in ("optimizer", "lr_scheduler")}
            inner = getattr(self.scheduler, "lr_scheduler", None)  # timm's plateau wraps a torch scheduler
            if inner is not None:
                scheduler["lr_scheduler"] = inner.state_dict()
        elif self.scheduler is not None:
            scheduler = self.scheduler.state_dict()
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler,
            "unscaled_lrs": None if self._unscaled is None else list(self._unscaled),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        scheduler = state_dict.get("scheduler")
        if (scheduler is None) != (self.scheduler is None):
            raise ValueError(
                "checkpoint and Optimization disagree on whether there is a learning-rate schedule "
                f"(checkpoint: {'yes' if scheduler is not None else 'no'}, "
                f"here: {'yes' if self.scheduler is not None else 'no'})"
            )
        if self._kind == _TIMM:
            assert scheduler is not None  # checked above: there is a schedule here, so in the checkpoint too
            scheduler = dict(scheduler)
            inner = scheduler.pop("lr_scheduler", None)
            if inner is not None:
                self.scheduler.lr_scheduler.load_state_dict(inner)
            self.scheduler.__dict__.update(scheduler)
        elif self.scheduler is not None:
            self.scheduler.load_state_dict(scheduler)
        if state_dict.get("unscaled_lrs") is not None:
            self._unscaled = [float(v) for v in state_dict["unscaled_lrs"]]

    def __repr__(self) -> str:
        scheduler = type(self.scheduler).__name__ if self.scheduler is not None else None
        return (
            f"Optimization(optimizer={type(self.optimizer).__name__}, scheduler={scheduler}, "
            f"step_on_epochs={self.step_on_epochs}, criterion={self.criterion!r})"
        )


def create_with_scheduler(
    params: Union[nn.Module, NamedParameters],
    optimizer_kwargs: Optional[Mapping[str, Any]] = None,
    scheduler_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    updates_per_epoch: Optional[int] = None,
    num_epochs: Optional[int] = None,
) -> Optimization:
    """An optimizer (see :func:`create`) and its learning-rate schedule, as an :class:`Optimization`.

    ``scheduler_kwargs``: ``name`` -- a timm scheduler (``cosine``, ``step``, ``multistep``,
    ``plateau``, ``poly``, ``tanh``, ``wsd``, ``rsqrt``, ``constant``, ``none``) or a class of
    ``torch.optim.lr_scheduler`` (``StepLR``, ``CosineAnnealingWarmRestarts``, ``ReduceLROnPlateau``,
    ``SequentialLR`` with ``schedulers: [{name: ..., ...}, ...]`` ...); ``criterion`` -- the name of
    the metric a plateau schedule monitors (kept on the result for the training loop); the rest are
    keywords of ``timm.scheduler.create_scheduler_v2`` (``num_epochs``, ``warmup_epochs``,
    ``warmup_lr``, ``warmup_prefix``, ``min_lr``, ``step_on_epochs``, ``k_decay``, ``decay_epochs``,
    ``decay_rate``, ``patience_epochs``, ``plateau_mode`` ...) or of the torch scheduler class.
    Unknown keywords raise TypeError. No ``scheduler_kwargs`` (or ``name`` None) means no schedule.

    ``updates_per_epoch`` (optimizer updates per epoch) is needed by per-update schedules.
    ``num_epochs`` overrides ``scheduler_kwargs["num_epochs"]`` of timm schedules, so a run with
    another epoch count keeps its schedule consistent.
    """
    optimizer = _build_optimizer(params, **dict(optimizer_kwargs or {}))
    kwargs = dict(scheduler_kwargs or {})
    name = kwargs.pop("name", None)
    criterion = kwargs.pop("criterion", None)
    if name is None:
        if kwargs:
            raise TypeError(f"scheduler_kwargs without a 'name': {', '.join(sorted(kwargs))}")
        return Optimization(optimizer, None, criterion=criterion, updates_per_epoch=updates_per_epoch)

    if _native_class(name) is not None:
        scheduler = _native_scheduler(optimizer, name, kwargs)
        return Optimization(optimizer, scheduler, criterion=criterion, updates_per_epoch=updates_per_epoch)

    if num_epochs is not None:
        kwargs["num_epochs"] = num_epochs
    if updates_per_epoch is not None:
        kwargs["updates_per_epoch"] = updates_per_epoch
    scheduler, scheduled_epochs = _timm_scheduler(optimizer, name, kwargs)
    return Optimization(
        optimizer,
        scheduler,
        criterion=criterion,
        updates_per_epoch=kwargs.get("updates_per_epoch"),
        num_epochs=None if scheduled_epochs is None else int(scheduled_epochs),
    )


# --------------------------------------------------------------------------- used by backward.py


def as_optimization(result: Any) -> Optimization:
    """What an OPTIMIZER pattern returned, as an :class:`Optimization`.

    ``create_with_scheduler`` already returns one; any plain ``torch.optim.Optimizer`` (e.g.
    ``torch.optim.AdamW`` bound with its arguments) gets no scheduler.
    """
    if isinstance(result, Optimization):
        return result
    if isinstance(result, torch.optim.Optimizer):
        return Optimization(result, None)
    raise TypeError(f"an OPTIMIZER pattern must return a torch.optim.Optimizer, not {type(result).__name__}")


def parameters(optimization: Union[Optimization, torch.optim.Optimizer]) -> List[nn.Parameter]:
    """Every parameter an optimizer updates (for gradient clipping)."""
    return [p for group in optimization.param_groups for p in group["params"]]


@torch.no_grad()
def scale_gradients(optimization: Union[Optimization, torch.optim.Optimizer], factor: float) -> None:
    """Multiply every gradient by ``factor``: a partial accumulation window at the end of an
    epoch was divided by the full window size, so its gradients are rescaled to an average."""
    grads = [p.grad for p in parameters(optimization) if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)
