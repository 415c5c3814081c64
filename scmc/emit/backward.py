"""BackwardDef -> backward.py: the optimizer/step class, written out step by step.

Per training step: (loss / N) -> scale (float16 only) -> backward. On update steps (every
N-th step, and the last step of an epoch, which flushes a partial window): unscale -> clip
-> optimizer step -> scaler update -> zero_grad -> per-update scheduler step.
"""

from __future__ import annotations

from scmc.addresses import module_of
from scmc.emit.python import _docstring, addresses_in, format_python, literal, minimal_imports
from scmc.ir import BackwardDef, OptimizerDef


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


def _call(ctor, first: str, extra: list[str] = ()) -> str:
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
    values = dict(zip(names, ctor.args))
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
        kwargs = bound.get("optimizer_kwargs") if isinstance(bound.get("optimizer_kwargs"), dict) else {}
        schedule = bound.get("scheduler_kwargs") if isinstance(bound.get("scheduler_kwargs"), dict) else None
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
    custom = any(o.clip is not None and c is None for o, c in zip(bdef.optimizers, clips))
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


def emit_backward(bdef: BackwardDef, header: list[str], docstring: str) -> str:
    n = bdef.accumulate
    scaled = bdef.scaler_kwargs is not None
    modules = ["torch", "scmc_runtime.optim", "scmc_runtime.overrides"]
    clips = {o.name: _clip_settings(o.clip) for o in bdef.optimizers}
    for opt in bdef.optimizers:
        for ctor in (opt.factory, opt.clip if clips[opt.name] is None else None):
            if ctor is not None:
                for address in addresses_in(ctor):
                    modules.append(module_of(address, None)[0])
    for _, value in bdef.scaler_kwargs or ():
        modules.extend(module_of(a, None)[0] for a in addresses_in(value))
    names = [o.name for o in bdef.optimizers]
    compiled = compiled_settings(bdef)

    summary = [f"Optimizer logic compiled from `{bdef.template}`.", ""]
    loss_div = f"(loss / {n})" if n > 1 else "loss"
    summary.append(f"Every training step: {loss_div}{' -> scale' if scaled else ''} -> backward.")
    when = f"Every {n} steps, and at the last step of an epoch" if n > 1 else "Every step"
    clip = " -> clip" if any(o.clip for o in bdef.optimizers) else ""
    summary.append(
        f"{when}: {'unscale -> ' if scaled else ''}{clip.strip(' ->') + ' -> ' if clip else ''}"
        f"optimizer step{' -> scaler update' if scaled else ''} -> zero_grad -> scheduler step."
    )
    summary += [
        "",
        "These are the compiled defaults (``compiled``); ``overrides`` (train.py's --lr, --weight-decay,",
        "--warmup-epochs, --clip-grad, --grad-accum-steps, --precision) change them for one run.",
    ]
    models = ", ".join(f"{m}: torch.nn.Module" for m in bdef.models)
    losses = ", ".join(f"{l}: torch.Tensor" for l in bdef.losses)

    lines = [f"class {bdef.classname}:", f"    {_docstring(chr(10).join(summary))}", ""]
    lines.append(f"    accumulate = {n}")
    lines.append(f"    autocast_dtype = {'torch.' + bdef.autocast_dtype if bdef.autocast_dtype else 'None'}")
    lines.append(f"    compiled = {literal(compiled)}")
    lines.append("")
    lines.append(
        f"    def __init__(self, {models}, *, updates_per_epoch: int, epochs: int | None = None, "
        f'device_type: str = "cpu", overrides: dict | None = None) -> None:'
    )
    lines.append("        run = scmc_runtime.overrides.RunSettings(self.compiled, overrides)")
    lines.append("        self.settings = run")
    lines.append("        self.accumulate = run.grad_accum_steps  # steps per optimizer update")
    lines.append("        self.autocast_dtype = run.autocast_dtype")
    for opt in bdef.optimizers:
        lines.append(f"        self.{opt.name} = scmc_runtime.optim.as_optimization({_factory_call(opt)})")
    # one scaler for all optimizers, updated once per step (torch.amp's rule); enabled for float16 only
    kwargs = "".join(f", {k}={literal(v)}" for k, v in bdef.scaler_kwargs or ())
    lines.append(f"        self.scaler = run.grad_scaler(device_type{kwargs})")
    lines.append("        self.grad_norms: dict[str, torch.Tensor] = {}  # before clipping, at the last update")
    lines.append("        self.updates = 0  # optimizer updates so far")
    lines.append("        self.pending = 0  # steps since the last update")
    lines.append("")
    lines.append("    def autocast(self, device_type: str):")
    lines.append('        """The autocast context for forward passes (a no-op in float32)."""')
    lines.append(
        "        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)"
    )
    lines.append("")
    lines.append("    def will_update(self, last_in_epoch: bool = False) -> bool:")
    lines.append('        """Whether the next call steps the optimizers (DDP syncs gradients only then)."""')
    lines.append("        return last_in_epoch or self.pending + 1 >= self.accumulate")
    lines.append("")
    lines.append(f"    def __call__(self, {losses}, *, last_in_epoch: bool = False) -> bool:")
    lines.append('        """Back-propagate one training step; returns True when the optimizers stepped."""')
    lines.append("        update = self.will_update(last_in_epoch)")
    lines.append("        self.pending += 1")
    for step in bdef.steps:
        kwargs = ", ".join(f"{k}={literal(v)}" for k, v in step.kwargs)
        lines.append(f"        self.scaler.scale({step.loss} / self.accumulate).backward({kwargs})")
    lines.append("        if not update:")
    lines.append("            return False")
    lines.append("        if self.pending < self.accumulate:  # a partial window at the end of an epoch")
    for name in names:
        lines.append(f"            scmc_runtime.optim.scale_gradients(self.{name}, self.accumulate / self.pending)")
    for opt in bdef.optimizers:
        inner = f"self.{opt.name}.optimizer"
        lines.append(f"        self.scaler.unscale_({inner})")
        settings = clips[opt.name]
        if opt.clip is not None and settings is None:  # a CLIP whose limit is not a run-time setting
            lines.append(f"        self.grad_norms[{opt.name!r}] = scmc_runtime.overrides.grad_norm(self.{opt.name})")
            lines.append(f"        {_call(opt.clip, f'scmc_runtime.optim.parameters(self.{opt.name})')}")
        else:
            value, mode, norm_type = settings if settings is not None else (None, "norm", 2.0)
            lines.append(
                f"        self.grad_norms[{opt.name!r}] = scmc_runtime.overrides.clip_gradients(self.{opt.name}, "
                f"max_value=self.settings.clip_value({value!r}), "
                f"mode={mode!r}, norm_type={norm_type!r})"
            )
        lines.append(f"        self.scaler.step({inner})")
    lines.append("        self.scaler.update()")
    for name in names:
        lines.append(f"        self.{name}.zero_grad(set_to_none=True)")
    lines.append("        self.pending = 0")
    lines.append("        self.updates += 1")
    for name in names:
        lines.append(f"        self.{name}.step_update(self.updates)")
    lines.append("        return True")
    lines.append("")
    lines.append("    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:")
    lines.append('        """Step the per-epoch schedulers after epoch `epoch` (0-based) with its metrics."""')
    for name in names:
        lines.append(f'        self.{name}.step_epoch(epoch + 1, metrics.get(self.{name}.criterion or ""))')
    lines.append("")
    dict_of = lambda suffix: "{" + ", ".join(f"{nm!r}: self.{nm}{suffix}" for nm in names) + "}"  # noqa: E731
    lines.append("    @property")
    lines.append("    def optimizers(self) -> dict:")
    lines.append(f"        return {dict_of('')}")
    lines.append("")
    lines.append("    @property")
    lines.append("    def grad_scalers(self) -> dict:")
    lines.append("        return {'scaler': self.scaler} if self.scaler.is_enabled() else {}")
    lines.append("")
    lines.append("    @property")
    lines.append("    def learning_rates(self) -> dict[str, float]:")
    lines.append('        """The learning rate of every parameter group, keyed `optimizer/group`."""')
    lines.append(
        '        return {f"{name}/{i}": group["lr"] for name, opt in self.optimizers.items() '
        "for i, group in enumerate(opt.param_groups)}"
    )
    lines.append("")
    lines.append("    @property")
    lines.append("    def param_groups(self) -> dict[str, list[dict]]:")
    lines.append(
        '        return {name: [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] '
        "for name, opt in self.optimizers.items()}"
    )
    lines.append("")
    lines.append("    def state_dict(self) -> dict:")
    state = ", ".join(
        [f"{nm!r}: self.{nm}.state_dict()" for nm in names]
        + ["'scaler': self.scaler.state_dict()", "'updates': self.updates", "'pending': self.pending"]
    )
    lines.append(f"        return {{{state}}}")
    lines.append("")
    lines.append("    def load_state_dict(self, state: dict) -> None:")
    for nm in names:
        lines.append(f"        self.{nm}.load_state_dict(state[{nm!r}])")
    lines.append("        if state.get('scaler'):")
    lines.append("            self.scaler.load_state_dict(state['scaler'])")
    lines.append("        self.updates = state['updates']")
    lines.append("        self.pending = state['pending']")

    parts = ["\n".join(f"# {line}" for line in header), _docstring(docstring), ""]
    parts += [f"import {m}" for m in minimal_imports(modules)]
    parts += ["", f"__all__ = [{bdef.classname!r}]", "", ""]
    parts += lines
    source = "\n".join(parts) + "\n"
    return format_python(source)
