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


def emit_backward(bdef: BackwardDef, header: list[str], docstring: str) -> str:
    n = bdef.accumulate
    scaled = bdef.scaler_kwargs is not None
    modules = ["torch", "scmc_runtime.optim"]
    for opt in bdef.optimizers:
        for ctor in (opt.factory, opt.clip):
            if ctor is not None:
                for address in addresses_in(ctor):
                    modules.append(module_of(address, None)[0])
    if bdef.autocast_dtype is None:
        modules.append("contextlib")
    for _, value in bdef.scaler_kwargs or ():
        modules.extend(module_of(a, None)[0] for a in addresses_in(value))
    names = [o.name for o in bdef.optimizers]

    summary = [f"Optimizer logic compiled from `{bdef.template}`.", ""]
    loss_div = f"(loss / {n})" if n > 1 else "loss"
    summary.append(f"Every training step: {loss_div}{' -> scale' if scaled else ''} -> backward.")
    when = f"Every {n} steps, and at the last step of an epoch" if n > 1 else "Every step"
    clip = " -> clip" if any(o.clip for o in bdef.optimizers) else ""
    summary.append(
        f"{when}: {'unscale -> ' if scaled else ''}{clip.strip(' ->') + ' -> ' if clip else ''}"
        f"optimizer step{' -> scaler update' if scaled else ''} -> zero_grad -> scheduler step."
    )
    models = ", ".join(f"{m}: torch.nn.Module" for m in bdef.models)
    losses = ", ".join(f"{l}: torch.Tensor" for l in bdef.losses)

    lines = [f"class {bdef.classname}:", f"    {_docstring(chr(10).join(summary))}", ""]
    lines.append(f"    accumulate = {n}")
    lines.append(f"    autocast_dtype = {'torch.' + bdef.autocast_dtype if bdef.autocast_dtype else 'None'}")
    lines.append("")
    lines.append(
        f"    def __init__(self, {models}, *, updates_per_epoch: int, epochs: int | None = None, "
        f'device_type: str = "cpu") -> None:'
    )
    for opt in bdef.optimizers:
        extra = ["updates_per_epoch=updates_per_epoch", "num_epochs=epochs"] if opt.takes_schedule else []
        lines.append(
            f"        self.{opt.name} = scmc_runtime.optim.as_optimization("
            f"{_call(opt.factory, _params_expr(opt), extra)})"
        )
    if scaled:  # one scaler for all optimizers, updated once per step (torch.amp's rule)
        kwargs = "".join(f", {k}={literal(v)}" for k, v in bdef.scaler_kwargs or ())
        lines.append(f"        self.scaler = torch.amp.GradScaler(device_type{kwargs})")
    lines.append("        self.updates = 0  # optimizer updates so far")
    lines.append("        self.pending = 0  # steps since the last update")
    lines.append("")
    lines.append("    def autocast(self, device_type: str):")
    lines.append('        """The autocast context for forward passes."""')
    if bdef.autocast_dtype:
        lines.append(f"        return torch.autocast(device_type, dtype=torch.{bdef.autocast_dtype})")
    else:
        lines.append("        return contextlib.nullcontext()")
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
        value = f"{step.loss} / self.accumulate" if n > 1 else step.loss
        kwargs = ", ".join(f"{k}={literal(v)}" for k, v in step.kwargs)
        target = f"self.scaler.scale({value})" if scaled else f"({value})"
        lines.append(f"        {target}.backward({kwargs})")
    lines.append("        if not update:")
    lines.append("            return False")
    if n > 1:
        lines.append("        if self.pending < self.accumulate:  # a partial window at the end of an epoch")
        for name in names:
            lines.append(f"            scmc_runtime.optim.scale_gradients(self.{name}, self.accumulate / self.pending)")
    for opt in bdef.optimizers:
        inner = f"self.{opt.name}.optimizer"
        if scaled:
            lines.append(f"        self.scaler.unscale_({inner})")
        if opt.clip is not None:
            lines.append(f"        {_call(opt.clip, f'scmc_runtime.optim.parameters(self.{opt.name})')}")
        lines.append(f"        self.scaler.step({inner})" if scaled else f"        self.{opt.name}.step()")
    if scaled:
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
    lines.append("        return {'scaler': self.scaler}" if scaled else "        return {}")
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
        + (["'scaler': self.scaler.state_dict()"] if scaled else [])
        + ["'updates': self.updates", "'pending': self.pending"]
    )
    lines.append(f"        return {{{state}}}")
    lines.append("")
    lines.append("    def load_state_dict(self, state: dict) -> None:")
    for nm in names:
        lines.append(f"        self.{nm}.load_state_dict(state[{nm!r}])")
    if scaled:
        lines.append("        self.scaler.load_state_dict(state['scaler'])")
    lines.append("        self.updates = state['updates']")
    lines.append("        self.pending = state['pending']")

    parts = ["\n".join(f"# {line}" for line in header), _docstring(docstring), ""]
    parts += [f"import {m}" for m in minimal_imports(modules)]
    parts += ["", f"__all__ = [{bdef.classname!r}]", "", ""]
    parts += lines
    source = "\n".join(parts) + "\n"
    return format_python(source)
