"""Run-time control of what a backward template compiled in, without a rebuild.

A generated ``backward.py`` records what it was compiled with in ``Backward.compiled``::

    {"lr": 0.002, "weight_decay": 0.05, "warmup_epochs": 1, "clip_grad": None, "clip_mode": "norm",
     "grad_accum_steps": 1, "precision": "float32"}

and builds itself through a :class:`RunSettings`, which lays the run's overrides (train.py's
``--lr``, ``--weight-decay``, ``--warmup-epochs``, ``--clip-grad``, ``--grad-accum-steps``,
``--precision``) over those values: the learning rate and weight decay go into every optimizer's
keyword arguments (layer-decay scales and no-weight-decay groups still apply on top), the warmup
into its schedule, the rest into the step itself (autocast dtype, GradScaler, clipping, the
accumulation window). A value of ``None`` keeps what was compiled.

:func:`clip_gradients` clips (or not) and returns the total gradient norm before clipping, which
train.py logs with the AMP scale. :func:`resume_problem` is the check ``--resume`` makes: a changed
value would make the resumed run differ from the one that was interrupted, so it is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

__all__ = [
    "OVERRIDES",
    "PRECISIONS",
    "MATMUL_PRECISIONS",
    "RESUME_FIXED",
    "RunSettings",
    "check_run_flags",
    "clip_gradients",
    "grad_norm",
    "override_problems",
    "resume_problem",
    "run_overrides",
    "step_metrics",
]

# train.py flag (TrainConfig field) -> what a changed value on resume would break
OVERRIDES = {
    "lr": "the learning-rate schedule",
    "weight_decay": "the optimizer's updates",
    "warmup_epochs": "the learning-rate schedule",
    "clip_grad": "the optimizer's updates",
    "grad_accum_steps": "the update count and the position of every update",
    "precision": "the forward's numerics and the GradScaler's state",
}
# flags that are not backward overrides but that a resumed run must keep as well
RESUME_FIXED = {
    "aug_splits": "the images of every batch and the loss",
    "resplit": "the random erasing of every batch",
    "jsd_alpha": "the loss",
}
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATMUL_PRECISIONS = ("highest", "high", "medium")
CLIP_MODES = ("norm", "value", "agc")


class RunSettings:
    """The compiled settings of a backward with one run's overrides laid over them (see the module docstring)."""

    def __init__(self, compiled: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> None:
        self.compiled = dict(compiled)
        given = {k: v for k, v in dict(overrides or {}).items() if v is not None}
        unknown = sorted(set(given) - set(OVERRIDES))
        if unknown:
            raise TypeError(f"unknown backward override(s): {', '.join(unknown)}; known: {', '.join(OVERRIDES)}")
        problems = override_problems(given, self.compiled)
        if problems:
            raise ValueError("; ".join(problems))
        self.overrides = given
        values = {**self.compiled, **given}
        self.lr: Optional[float] = given.get("lr")
        self.weight_decay: Optional[float] = given.get("weight_decay")
        self.warmup_epochs: Optional[float] = given.get("warmup_epochs")
        self.clip_grad: Optional[float] = values.get("clip_grad")  # the same for every optimizer, or None
        self.clip_mode: str = self.compiled.get("clip_mode") or "norm"
        self.grad_accum_steps: int = int(values.get("grad_accum_steps") or 1)
        self.precision: str = values.get("precision") or "float32"
        self.autocast_dtype: Optional[torch.dtype] = PRECISIONS[self.precision]

    def clip_value(self, compiled: Optional[float]) -> Optional[float]:
        """The clipping limit of an optimizer compiled with ``compiled`` (None: no clipping): ``--clip-grad``'s, if given."""
        return self.overrides.get("clip_grad", compiled)

    def optimizer_kwargs(self, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """An optimizer factory's keyword arguments with ``lr`` and ``weight_decay`` overridden."""
        out = dict(kwargs)
        if self.lr is not None:
            out["lr"] = self.lr
        if self.weight_decay is not None:
            out["weight_decay"] = self.weight_decay
        return out

    def scheduler_kwargs(self, kwargs: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
        """A schedule's keyword arguments with ``warmup_epochs`` overridden."""
        if kwargs is None:
            return None
        out = dict(kwargs)
        if self.warmup_epochs is not None:
            out["warmup_epochs"] = self.warmup_epochs
        return out

    def grad_scaler(self, device_type: str, **kwargs: Any) -> torch.amp.GradScaler:
        """The GradScaler of the step: enabled for float16 only (otherwise every call passes through)."""
        return torch.amp.GradScaler(device_type, enabled=self.precision == "float16", **kwargs)


def override_problems(given: Mapping[str, Any], compiled: Mapping[str, Any]) -> List[str]:
    """What is wrong with the override values ``given`` (None entries are not given), one line each."""
    problems = []
    given = {k: v for k, v in given.items() if v is not None}

    def bad(name: str, message: str) -> None:
        problems.append(f"--{name.replace('_', '-')} {given[name]}: {message}")

    for name in ("lr", "weight_decay", "warmup_epochs"):
        if name in given and not (
            isinstance(given[name], (int, float)) and math.isfinite(given[name]) and given[name] >= 0
        ):
            bad(name, "must be a number >= 0")
    if "warmup_epochs" in given and not compiled.get("has_schedule", True):
        bad("warmup_epochs", "the compiled backward has no learning-rate schedule to warm up")
    if "clip_grad" in given:
        value = given["clip_grad"]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            bad("clip_grad", "must be a positive max gradient norm (or none: no clipping)")
        elif compiled.get("clip_mode", "norm") not in CLIP_MODES:
            bad("clip_grad", f"the compiled CLIP ({compiled.get('clip_mode')}) takes no value to replace")
    if "grad_accum_steps" in given and not (
        isinstance(given["grad_accum_steps"], int) and given["grad_accum_steps"] >= 1
    ):
        bad("grad_accum_steps", "must be at least 1 (1: update every step)")
    if "precision" in given and given["precision"] not in PRECISIONS:
        bad("precision", f"must be one of {', '.join(PRECISIONS)}")
    return problems


def _gradients(optimizers: Sequence[Any]) -> List[torch.Tensor]:
    return [p.grad for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]


@torch.no_grad()
def grad_norm(*optimizers: Any, norm_type: float = 2.0) -> torch.Tensor:
    """The total norm of the gradients the optimizers will apply (a tensor: no host sync)."""
    grads = _gradients(optimizers)
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)


@torch.no_grad()
def clip_gradients(
    *optimizers: Any, max_value: Optional[float], mode: str = "norm", norm_type: float = 2.0
) -> torch.Tensor:
    """Clip the gradients of ``optimizers`` as timm's ``dispatch_clip_grad`` does (``max_value`` None: not at
    all) and return their total norm before clipping (a tensor, for the training log)."""
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_value is not None and mode == "norm":
        return torch.nn.utils.clip_grad_norm_(params, max_value, norm_type=norm_type)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=norm_type)
    if max_value is not None and mode == "value":
        torch.nn.utils.clip_grad_value_(params, max_value)
    elif max_value is not None and mode == "agc":
        from scmc_runtime._optional import require

        require("timm.utils.agc", "adaptive gradient clipping", "timm").adaptive_clip_grad(
            params, max_value, norm_type=norm_type
        )
    return norm


def resume_problem(saved: Mapping[str, Any], config: Mapping[str, Any], path: Any) -> Optional[str]:
    """The message refusing a resume whose override flags differ from the checkpoint's, else None."""
    from scmc_runtime.train import FRESH_HINT

    watched = {**OVERRIDES, **RESUME_FIXED}
    differ = [n for n in watched if n in saved and n in config and saved[n] != config[n]]
    if not differ:
        return None
    flag = lambda n, v: f"--{n.replace('_', '-')} {'none' if v is None else v}"  # noqa: E731
    was = " ".join(flag(n, saved[n]) for n in differ)
    now = " ".join(flag(n, config[n]) for n in differ)
    broken = ", ".join(dict.fromkeys(watched[n] for n in differ))
    return (
        f"{path} was trained with {was}, not {now}: a resumed run continues exactly, and this would change "
        f"{broken}; resume with {was}, or {FRESH_HINT}"
    )


def run_overrides(cfg: Any, compiled: Mapping[str, Any]) -> Dict[str, Any]:
    """The override flags of a generated ``TrainConfig`` that differ from what was compiled (for ``Backward``)."""
    out = {}
    for name in OVERRIDES:
        value = getattr(cfg, name, None)
        if value is not None and value != compiled.get(name):
            out[name] = value
    return out


def check_run_flags(cfg: Any, compiled: Mapping[str, Any]) -> None:
    """``UsageError`` (exit 2, nothing created) for bad override, --val-every, --matmul-precision or
    --reset-head values: every problem, one line each."""
    from scmc_runtime.train import UsageError

    problems = override_problems(run_overrides(cfg, compiled), compiled)
    if getattr(cfg, "val_every", 1) < 1:
        problems.append(f"--val-every {cfg.val_every}: must be at least 1 (1: every epoch)")
    if getattr(cfg, "matmul_precision", "highest") not in MATMUL_PRECISIONS:
        problems.append(f"--matmul-precision {cfg.matmul_precision}: must be one of {', '.join(MATMUL_PRECISIONS)}")
    if getattr(cfg, "reset_head", False) and not getattr(cfg, "init_from", ""):
        problems.append("--reset-head: only with --init-from (it keeps this model's classifier instead of the file's)")
    init_from = getattr(cfg, "init_from", "")
    if init_from and not Path(init_from).is_file():
        problems.append(f"--init-from {init_from}: no such file")
    if len(problems) == 1:
        raise UsageError(problems[0])
    if problems:
        raise UsageError(f"{len(problems)} problems with the flags:\n  " + "\n  ".join(problems))


def step_metrics(backward: Any) -> Dict[str, float]:
    """``grad_norm`` (before clipping, at the last update) and ``amp_scale`` (float16 only) for the training log;
    ``grad_norm_<optimizer>`` where there are several. One host sync: call it at log steps only."""
    out: Dict[str, float] = {}
    norms = dict(getattr(backward, "grad_norms", None) or {})
    for name, value in norms.items():
        out["grad_norm" if len(norms) == 1 else f"grad_norm_{name}"] = float(value)
    scalers = dict(getattr(backward, "grad_scalers", None) or {})
    for name, scaler in scalers.items():
        out["amp_scale" if len(scalers) == 1 else f"amp_scale_{name}"] = float(scaler.get_scale())
    return out
