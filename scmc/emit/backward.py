"""BackwardDef -> backward.py: the optimizer/step class, written out step by step.

What to emit is decided here, into a :class:`BackwardContext`; the text is
``templates/backward.py.j2``, rendered through the one environment of :mod:`scmc.emit.jinja`.

Per training step: (loss / N) -> scale (float16 only) -> backward. On update steps (every
N-th step, and the last step of an epoch, which flushes a partial window): unscale -> clip
-> optimizer step -> scaler update -> zero_grad -> per-update scheduler step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scmc.addresses import module_of
from scmc.emit.jinja import environment
from scmc.emit.python import _docstring, addresses_in, format_python, literal, minimal_imports
from scmc.ir import BackwardDef, OptimizerDef

TEMPLATE = "backward.py.j2"


def _params_expr(opt: OptimizerDef) -> str:
    parts = []
    for layer in opt.layers:
        root, _, sub = layer.partition(".")
        if sub:
            parts.append(f"scmc_runtime.optim.named_parameters({root}, submodule={sub!r})")
        else:
            parts.append(f"scmc_runtime.optim.named_parameters({root})")
    if len(parts) == 1:
        return parts[0]
    return "[" + ", ".join(f"*{p}" for p in parts) + "]"


def _call(ctor, first: str, extra: Sequence[str] = ()) -> str:
    args = [first] + [literal(a) for a in ctor.args] + [f"{k}={literal(v)}" for k, v in ctor.kwargs] + list(extra)
    return f"{ctor.address}({', '.join(args)})"


# CLIP patterns whose limit a run may replace (--clip-grad): address -> (value, mode, norm_type) parameter
# names after the parameters, and the mode when the function has none.
_CLIPS = {
    "timm.utils.clip_grad.dispatch_clip_grad": (("value", "mode", "norm_type"), None),
    "timm.utils.dispatch_clip_grad": (("value", "mode", "norm_type"), None),
    "torch.nn.utils.clip_grad_norm_": (("max_norm", "norm_type"), "norm"),
    "torch.nn.utils.clip_grad.clip_grad_norm_": (("max_norm", "norm_type"), "norm"),
    "torch.nn.utils.clip_grad_value_": (("clip_value",), "value"),
    "torch.nn.utils.clip_grad.clip_grad_value_": (("clip_value",), "value"),
}
_SCHEDULED = ("scmc_runtime.optim.create_with_scheduler",)


def _bound(ctor, names: tuple[str, ...]) -> dict:
    """The arguments of ``ctor`` (after the parameters) by name."""
    values = dict(zip(names, ctor.args, strict=False))
    values.update(dict(ctor.kwargs))
    return values


def _clip_settings(clip) -> tuple[float | None, str, float] | None:
    """(max value, mode, norm type) of a CLIP a run may override; None for one it cannot read."""
    if clip is None or clip.address not in _CLIPS:
        return None
    names, mode = _CLIPS[clip.address]
    bound = _bound(clip, names)
    value = bound.get(names[0])
    mode = mode or bound.get("mode", "norm")
    norm_type = bound.get("norm_type", 2.0)
    if not isinstance(value, (int, float)) or mode not in ("norm", "value", "agc"):
        return None
    if not isinstance(norm_type, (int, float)):
        return None
    return float(value), mode, float(norm_type)


def _optimizer_values(opt: OptimizerDef) -> tuple[dict, dict | None]:
    """The optimizer keyword arguments and the schedule keyword arguments (None: no schedule) of a factory."""
    if opt.factory.address in _SCHEDULED:
        bound = _bound(opt.factory, ("optimizer_kwargs", "scheduler_kwargs"))
        given, scheduler = bound.get("optimizer_kwargs"), bound.get("scheduler_kwargs")
        kwargs = given if isinstance(given, dict) else {}
        schedule = scheduler if isinstance(scheduler, dict) else None
        if schedule is not None and schedule.get("name") is None:
            schedule = None
        return kwargs, schedule
    return dict(opt.factory.kwargs), None


def _unique(values: list):
    return values[0] if values and all(v == values[0] for v in values) else None


def compiled_settings(bdef: BackwardDef) -> dict:
    """What the backward was compiled with, as the run-time overrides name it (``Backward.compiled``).

    ``lr``/``weight_decay``/``warmup_epochs``/``clip_grad`` are None where the optimizers disagree
    or do not say; ``clip_mode`` is ``custom`` for a CLIP whose limit cannot be replaced.
    """
    values = [_optimizer_values(o) for o in bdef.optimizers]
    clips = [_clip_settings(o.clip) for o in bdef.optimizers]

    def number(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    schedules = [s for _, s in values if s is not None]
    custom = any(o.clip is not None and c is None for o, c in zip(bdef.optimizers, clips, strict=True))
    return {
        "lr": _unique([number(k.get("lr")) for k, _ in values]),
        "weight_decay": _unique([number(k.get("weight_decay")) for k, _ in values]),
        "warmup_epochs": _unique([number(s.get("warmup_epochs", 0)) for s in schedules]) if schedules else None,
        "has_schedule": bool(schedules),
        "clip_grad": _unique([c[0] if c else None for c in clips]),
        "clip_mode": "custom" if custom else _unique([c[1] for c in clips if c]) or "norm",
        "grad_accum_steps": int(bdef.accumulate),
        "precision": bdef.autocast_dtype or "float32",
    }


def _factory_call(opt: OptimizerDef) -> str:
    """The factory call with its learning rate, weight decay and warmup open to the run's overrides."""
    extra = ["updates_per_epoch=updates_per_epoch", "num_epochs=epochs"] if opt.takes_schedule else []
    params = _params_expr(opt)
    if opt.factory.address in _SCHEDULED:
        names = ("optimizer_kwargs", "scheduler_kwargs")
        bound = _bound(opt.factory, names)
        if set(bound) <= set(names):
            args = [params]
            if "optimizer_kwargs" in bound:
                args.append(f"optimizer_kwargs=run.optimizer_kwargs({literal(bound['optimizer_kwargs'])})")
            if "scheduler_kwargs" in bound:
                args.append(f"scheduler_kwargs=run.scheduler_kwargs({literal(bound['scheduler_kwargs'])})")
            return f"{opt.factory.address}({', '.join(args + extra)})"
    kwargs = {k: v for k, v in opt.factory.kwargs}
    args = [params] + [literal(a) for a in opt.factory.args] + [f"**run.optimizer_kwargs({literal(kwargs)})"] + extra
    return f"{opt.factory.address}({', '.join(args)})"


@dataclass(frozen=True)
class OptimizerCode:
    """One optimizer of the generated class: its attribute, its factory call and how it clips."""

    name: str
    factory: str  # the factory call, open to the run's overrides
    custom_clip: str | None  # a CLIP call emitted as written (its limit is not a run-time setting)
    max_value: str  # else clip_gradients' compiled limit (`None`: no clipping), mode and norm type, as literals
    mode: str
    norm_type: str


@dataclass(frozen=True)
class StepCode:
    """One ``backward`` call of a training step."""

    loss: str
    kwargs: tuple[tuple[str, str], ...]  # name -> Python literal


@dataclass(frozen=True)
class BackwardContext:
    """What ``templates/backward.py.j2`` prints; every decision is made in :func:`backward_context`."""

    header: tuple[str, ...]
    module_docstring: str  # a docstring literal
    imports: tuple[str, ...]
    classname: str
    class_docstring: str  # a docstring literal
    accumulate: int
    autocast_dtype: str  # an expression: `torch.float16`, `None`
    compiled: str  # a dict literal
    models: tuple[str, ...]
    losses: tuple[str, ...]
    optimizers: tuple[OptimizerCode, ...]
    steps: tuple[StepCode, ...]
    scaler_kwargs: tuple[tuple[str, str], ...]  # name -> Python literal


def _summary(bdef: BackwardDef) -> str:
    """The class docstring: the step sequence as compiled."""
    n = bdef.accumulate
    scaled = bdef.scaler_kwargs is not None
    loss_div = f"(loss / {n})" if n > 1 else "loss"
    when = f"Every {n} steps, and at the last step of an epoch" if n > 1 else "Every step"
    clip = "clip -> " if any(o.clip for o in bdef.optimizers) else ""
    unscale, update = ("unscale -> ", " -> scaler update") if scaled else ("", "")
    return "\n".join(
        [
            f"Optimizer logic compiled from `{bdef.template}`.",
            "",
            f"Every training step: {loss_div}{' -> scale' if scaled else ''} -> backward.",
            f"{when}: {unscale}{clip}optimizer step{update} -> zero_grad -> scheduler step.",
            "",
            "These are the compiled defaults (``compiled``); ``overrides`` (train.py's --lr, --weight-decay,",
            "--warmup-epochs, --clip-grad, --grad-accum-steps, --precision) change them for one run.",
        ]
    )


def _optimizer_code(opt: OptimizerDef) -> OptimizerCode:
    settings = _clip_settings(opt.clip)
    if opt.clip is not None and settings is None:  # a CLIP whose limit is not a run-time setting
        custom = _call(opt.clip, f"scmc_runtime.optim.parameters(self.{opt.name})")
        return OptimizerCode(opt.name, _factory_call(opt), custom, "None", "'norm'", "2.0")
    value, mode, norm_type = settings if settings is not None else (None, "norm", 2.0)
    return OptimizerCode(opt.name, _factory_call(opt), None, literal(value), literal(mode), literal(norm_type))


def backward_context(bdef: BackwardDef, header: list[str], docstring: str) -> BackwardContext:
    """The typed context of ``backward.py`` for ``bdef``."""
    optimizers = tuple(_optimizer_code(o) for o in bdef.optimizers)
    modules = ["torch", "scmc_runtime.optim", "scmc_runtime.overrides"]
    for opt, code in zip(bdef.optimizers, optimizers, strict=True):
        for ctor in (opt.factory, opt.clip if code.custom_clip is not None else None):
            if ctor is not None:
                modules.extend(module_of(address, None)[0] for address in addresses_in(ctor))
    for _, value in bdef.scaler_kwargs or ():
        modules.extend(module_of(a, None)[0] for a in addresses_in(value))
    return BackwardContext(
        header=tuple(header),
        module_docstring=_docstring(docstring),
        imports=tuple(minimal_imports(modules)),
        classname=bdef.classname,
        class_docstring=_docstring(_summary(bdef)),
        accumulate=bdef.accumulate,
        autocast_dtype=f"torch.{bdef.autocast_dtype}" if bdef.autocast_dtype else "None",
        compiled=literal(compiled_settings(bdef)),
        models=tuple(bdef.models),
        losses=tuple(bdef.losses),
        optimizers=optimizers,
        steps=tuple(StepCode(s.loss, tuple((k, literal(v)) for k, v in s.kwargs)) for s in bdef.steps),
        scaler_kwargs=tuple((k, literal(v)) for k, v in bdef.scaler_kwargs or ()),
    )


def emit_backward(bdef: BackwardDef, header: list[str], docstring: str) -> str:
    """Black-formatted source of ``backward.py``: :func:`backward_context` rendered by ``templates/backward.py.j2``."""
    context = backward_context(bdef, header, docstring)
    source = environment().get_template(TEMPLATE).render(b=context)
    return format_python(source)
