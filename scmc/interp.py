"""An IR interpreter: an :class:`~scmc.ir.Instance` tree or a :class:`~scmc.ir.Program`
as a live ``torch.nn.Module``.

Materialization runs it on the meta device to give lazy layers their sizes; tests compare
generated code against it. Every callable it touches was resolved through
:func:`scmc.addresses.resolve` (judged by what it is) and is called through
:func:`scmc.expr.call_checked`: sizes estimated before a tensor is made, and while the build
runs the graph on the meta device an explicit ``device=`` stays on it.
"""

from __future__ import annotations

from typing import Any

import torch

from scmc.addresses import AllowList, resolve
from scmc.expr import call_checked, evaluate, sum_operands
from scmc.ir import (
    Arg,
    ChildInst,
    Const,
    Ctor,
    ExprArg,
    Index,
    Instance,
    ListArg,
    Node,
    Out,
    OutName,
    OutTuple,
    Param,
    ParamExpr,
    Program,
    Ref,
    Var,
)


def build_value(value: Any, allow: AllowList, params: dict[str, Any] | None = None) -> Any:
    if isinstance(value, Ref):
        return resolve(value.address, allow)
    if isinstance(value, Param):
        return (params or {})[value.name]
    if isinstance(value, ParamExpr):

        from scmc.expr import Expr

        return evaluate(Expr(value.source, value.names, ()), dict(params or {}), allow)
    if isinstance(value, Ctor):
        if value.address == "functools.partial":
            import functools

            fn = build_value(value.args[0], allow, params)
            return functools.partial(
                fn,
                *[build_value(a, allow, params) for a in value.args[1:]],
                **{k: build_value(v, allow, params) for k, v in value.kwargs},
            )
        fn = resolve(value.address, allow)
        return call_checked(
            fn,
            [build_value(a, allow, params) for a in value.args],
            {k: build_value(v, allow, params) for k, v in value.kwargs},
        )
    if isinstance(value, tuple):
        return tuple(build_value(v, allow, params) for v in value)
    if isinstance(value, list):
        return [build_value(v, allow, params) for v in value]
    if isinstance(value, dict):
        return {k: build_value(v, allow, params) for k, v in value.items()}
    return value


class StepFailed(Exception):
    """A step raised while the graph ran; carries the step (and so its template position)."""

    def __init__(self, node: Node, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.node = node
        self.error = error


class GraphModule(torch.nn.Module):
    """Runs a forward graph node by node."""

    instance: Instance  # the lowered graph it runs, set by build_instance

    def __init__(
        self,
        inputs: list[str],
        outputs: list[str],
        structured: bool,
        flow: list[Node],
        inference: list[Node] | None,
        functions: dict[str, Any],
        allow: AllowList,
    ):
        super().__init__()
        self._inputs = list(inputs)
        self._outputs = list(outputs)
        self._structured = structured
        self._flow = list(flow)
        self._inference = list(inference) if inference is not None else None
        self._functions = functions
        self._allow = allow
        self.observed: dict[str, str] = {}
        # (graph, node index) -> whether the operands of its `a + b` argument had one shape and dtype in every run
        self.sums: dict[tuple[str, int], bool] = {}

    def _arg(self, arg: Arg, env: dict[str, Any]) -> Any:
        if isinstance(arg, Var):
            return env[arg.name]
        if isinstance(arg, Index):
            return self._arg(arg.base, env)[arg.key]
        if isinstance(arg, ListArg):
            return [self._arg(a, env) for a in arg.items]
        if isinstance(arg, Const):
            return arg.value
        assert isinstance(arg, ExprArg)
        return evaluate(arg.expr, env, self._allow)

    def _observe_sums(self, node: Node, where: tuple[str, int], env: dict[str, Any]) -> None:
        for arg in node.args:
            names = sum_operands(arg.expr) if isinstance(arg, ExprArg) else None
            if names is None:
                continue
            a, b = (env.get(n) for n in names)
            same = (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and a.dtype == b.dtype
            )
            self.sums[where] = self.sums.get(where, True) and same

    def _bind(self, out: Out, value: Any, env: dict[str, Any]) -> None:
        if isinstance(out, OutName):
            env[out.name] = value
        elif isinstance(out, OutTuple):
            values = list(value)
            if len(values) != len(out.items):
                raise ValueError(f"expected {len(out.items)} values to unpack, got {len(values)}")
            for item, v in zip(out.items, values, strict=True):
                self._bind(item, v, env)
        else:
            for name, key in out.pairs:
                env[name] = value[key]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        env: dict[str, Any] = dict(zip(self._inputs, args, strict=False))
        env.update(kwargs)
        graph = self._flow if (self.training or self._inference is None) else self._inference
        label = "flow" if graph is self._flow else "inference"
        for index, node in enumerate(graph):
            try:
                self._observe_sums(node, (label, index), env)
                call_args = [self._arg(a, env) for a in node.args]
                call_kwargs = {k: self._arg(v, env) for k, v in node.kwargs}
                if node.augment:  # `out += y`: the same value as out + y
                    value = call_args[0] + call_args[1]
                elif node.layer is None:
                    value = call_args[0]
                elif node.layer in self._functions:
                    value = call_checked(self._functions[node.layer], call_args, call_kwargs)
                else:
                    value = getattr(self, node.layer)(*call_args, **call_kwargs)
                self._bind(node.out, value, env)
            except StepFailed:
                raise
            except Exception as exc:
                raise StepFailed(node, exc) from exc
        for name in self._inputs:
            self.observed.setdefault(name, type_name(env.get(name)))
        for name in self._outputs:
            self.observed[name] = type_name(env[name])
        if self._structured:
            return {name: env[name] for name in self._outputs}
        if len(self._outputs) == 1:
            return env[self._outputs[0]]
        return tuple(env[name] for name in self._outputs)


def type_name(value: Any) -> str:
    """A TorchScript-friendly annotation for an observed value."""
    if isinstance(value, torch.Tensor):
        return "torch.Tensor"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return "list[torch.Tensor]" if isinstance(value, list) else f"tuple[{', '.join(['torch.Tensor'] * len(value))}]"
    if (
        isinstance(value, dict)
        and value
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    ):
        return "dict[str, torch.Tensor]"
    return "Any"


def build_instance(
    inst: Instance, allow: AllowList, record: dict[int, tuple[ChildInst, torch.nn.Module, type]] | None = None
) -> GraphModule:
    """A live module for an instance tree. ``record`` collects (child, module, original class)."""
    functions: dict[str, Any] = {}
    modules: dict[str, torch.nn.Module] = {}
    for child in inst.children:
        if child.kind == "function":
            assert child.ctor is not None
            fn = resolve(child.ctor.address, allow)
            bound_args = [build_value(a, allow) for a in child.ctor.args]
            bound_kwargs = {k: build_value(v, allow) for k, v in child.ctor.kwargs}
            if bound_args or bound_kwargs:
                import functools

                fn = functools.partial(fn, *bound_args, **bound_kwargs)
            functions[child.attr] = fn
        elif child.kind == "user":
            assert child.instance is not None
            modules[child.attr] = build_instance(child.instance, allow, record)
        else:
            assert child.ctor is not None
            cls = resolve(child.ctor.address, allow)
            module = build_value(child.ctor, allow)
            modules[child.attr] = module
            if record is not None:
                record[id(child)] = (child, module, cls)
    gm = GraphModule(inst.inputs, inst.outputs, inst.structured, inst.flow, inst.inference, functions, allow)
    for name, module in modules.items():
        gm.add_module(name, module)
    gm.instance = inst
    return gm


def build_program(
    program: Program, allow: AllowList, cls: str | None = None, kwargs: dict[str, Any] | None = None
) -> GraphModule:
    """A live module for a class of a compiled program (default: the root, no arguments)."""
    mdef = program.module(cls or program.root)
    params = dict(kwargs or {})
    functions: dict[str, Any] = {}
    modules: dict[str, torch.nn.Module] = {}
    for child in mdef.children:
        if child.kind == "function":
            fn = resolve(child.ctor.address, allow)
            bound_args = [build_value(a, allow, params) for a in child.ctor.args]
            bound_kwargs = {k: build_value(v, allow, params) for k, v in child.ctor.kwargs}
            if bound_args or bound_kwargs:
                import functools

                fn = functools.partial(fn, *bound_args, **bound_kwargs)
            functions[child.attr] = fn
        elif child.kind == "user":
            sub_kwargs = {k: build_value(v, allow, params) for k, v in child.ctor.kwargs}
            modules[child.attr] = build_program(program, allow, child.ctor.address, sub_kwargs)
        else:
            modules[child.attr] = build_value(child.ctor, allow, params)
    gm = GraphModule(
        list(mdef.inputs),
        list(mdef.outputs),
        mdef.structured,
        list(mdef.flow),
        list(mdef.inference) if mdef.inference is not None else None,
        functions,
        allow,
    )
    for name, module in modules.items():
        gm.add_module(name, module)
    return gm
