"""The intermediate representation: plain, frozen dataclasses.

``Program`` -> ``ModuleDef`` (one generated class) -> ``Child`` (an attribute built in
``__init__``) and ``Node`` (one line of ``forward``). Values in constructor arguments are
Python literals or one of :class:`Ref` (a dotted name), :class:`Ctor` (a constructor call),
:class:`Param` (a constructor argument of the enclosing class) or :class:`ParamExpr`.

Before de-duplication the lowering produces an :class:`Instance` tree (one per use of a
user layer); the passes turn it into classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from scmc.diagnostics import Span
from scmc.expr import Expr

# dtypes an input may have in INPUT_SHAPES or -s NAME=DIMS:DTYPE (materialization makes meta tensors of them)
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")

# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Ref:
    """A dotted name, emitted as is (after importing its module)."""

    address: str


@dataclass(frozen=True)
class Ctor:
    """``address(*args, **kwargs)``; ``user`` marks a generated class (address is its name)."""

    address: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    user: bool = False

    def kwarg(self, name: str, default: Any = None) -> Any:
        for key, value in self.kwargs:
            if key == name:
                return value
        return default


@dataclass(frozen=True)
class Param:
    """A constructor argument of the enclosing generated class."""

    name: str


@dataclass(frozen=True)
class ParamExpr:
    """An arithmetic expression over constructor arguments, e.g. ``dim * 4``."""

    source: str
    names: tuple[str, ...]


# --------------------------------------------------------------------------- forward graph


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Index:
    base: "Arg"
    key: Union[int, str]


@dataclass(frozen=True)
class ListArg:
    items: tuple["Arg", ...]


@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class ExprArg:
    expr: Expr


Arg = Union[Var, Index, ListArg, Const, ExprArg]


@dataclass(frozen=True)
class OutName:
    name: str


@dataclass(frozen=True)
class OutTuple:
    items: tuple["Out", ...]


@dataclass(frozen=True)
class OutDict:
    """Bind names to keys of a mapping result: ``name = result[key]``."""

    pairs: tuple[tuple[str, Union[str, int]], ...]


Out = Union[OutName, OutTuple, OutDict]


@dataclass(frozen=True)
class Node:
    """``out = layer(*args, **kwargs)``; ``layer is None`` is a plain assignment of args[0].

    ``augment`` (``"+"``, set only by :mod:`scmc.passes.inplace`) makes a layer-less node an
    augmented assignment, ``out += args[1]`` with ``args[0]`` naming ``out``: the same value as
    ``out = args[0] + args[1]``, computed in place.
    """

    layer: str | None
    args: tuple[Arg, ...]
    kwargs: tuple[tuple[str, Arg], ...]
    out: Out
    span: Span = field(compare=False, hash=False, default=Span("<none>"))
    comment: str = field(compare=False, hash=False, default="")  # the template's comment on the step
    augment: str = ""


def arg_names(arg: Arg) -> list[str]:
    if isinstance(arg, Var):
        return [arg.name]
    if isinstance(arg, Index):
        return arg_names(arg.base)
    if isinstance(arg, ListArg):
        return [n for item in arg.items for n in arg_names(item)]
    if isinstance(arg, ExprArg):
        return list(arg.expr.names)
    return []


def node_reads(node: Node) -> list[str]:
    names: list[str] = []
    for arg in (*node.args, *(v for _, v in node.kwargs)):
        for n in arg_names(arg):
            if n not in names:
                names.append(n)
    return names


def out_names(out: Out) -> list[str]:
    if isinstance(out, OutName):
        return [out.name]
    if isinstance(out, OutTuple):
        return [n for item in out.items for n in out_names(item)]
    return [name for name, _ in out.pairs]


# --------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class Child:
    """An attribute of a generated module.

    kind ``module``: ``self.attr = ctor``; ``user``: ``self.attr = UserClass(**kwargs)``;
    ``function``: no attribute; forward calls ``ctor.address(*bound, ...)`` directly.
    """

    attr: str
    kind: str
    ctor: Ctor
    span: Span = field(compare=False, hash=False, default=Span("<none>"))


@dataclass(frozen=True)
class ModuleDef:
    name: str
    params: tuple[tuple[str, str], ...]  # (name, annotation)
    children: tuple[Child, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    structured: bool
    flow: tuple[Node, ...]
    inference: tuple[Node, ...] | None
    types: tuple[tuple[str, str], ...] = ()  # annotations of inputs and outputs, when known
    template: str = ""  # the template name (user layer key or root file)
    doc: str = ""


@dataclass(frozen=True)
class Program:
    modules: tuple[ModuleDef, ...]  # leaves first, root last
    root: str

    def module(self, name: str) -> ModuleDef:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(name)


# --------------------------------------------------------------------------- backward steps
# What a backward template lowers to (scmc/backward.py) and emit/backward.py prints.


@dataclass(frozen=True)
class OptimizerDef:
    name: str
    factory: Ctor  # address + bound arguments; called with the named parameters
    layers: tuple[str, ...]  # "model" or "model.backbone"
    clip: Ctor | None  # address + bound arguments; called with the parameters
    takes_schedule: bool  # the factory accepts updates_per_epoch / num_epochs
    span: Span


@dataclass(frozen=True)
class BackwardStepDef:
    name: str
    loss: str
    optimizers: tuple[str, ...]
    kwargs: tuple[tuple[str, Any], ...]
    span: Span = field(compare=False, hash=False, default=Span("<none>"))  # of its LOSS key


@dataclass(frozen=True)
class BackwardDef:
    classname: str
    models: tuple[str, ...]
    losses: tuple[str, ...]
    optimizers: tuple[OptimizerDef, ...]
    steps: tuple[BackwardStepDef, ...]
    autocast_dtype: str | None  # "bfloat16" | "float16" | None
    scaler_kwargs: tuple[tuple[str, Any], ...] | None  # only for float16
    accumulate: int
    template: str
    spans: tuple[tuple[str, Span], ...] = field(compare=False, hash=False, default=())  # LOSSES/MODELS entries


# --------------------------------------------------------------------------- instances


@dataclass
class ChildInst:
    attr: str
    kind: str  # module | user | function
    ctor: Ctor | None = None  # module/function
    instance: "Instance | None" = None  # user
    span: Span = Span("<none>")
    lazy: bool = False
    name_given: bool = False  # named in the template (kept verbatim)


@dataclass
class Instance:
    """One use of a layer graph, rendered with its own parameters."""

    template: str  # user layer key (TYPE path) or the root class name
    class_hint: str
    params: dict[str, Any]
    children: list[ChildInst]
    inputs: list[str]
    outputs: list[str]
    structured: bool
    flow: list[Node]
    inference: list[Node] | None
    span: Span
    input_shapes: dict[str, Any] | None = None
    types: dict[str, str] = field(default_factory=dict)
    output_shapes: dict[str, tuple[int, ...]] | None = None  # without the batch; set by materialize
    # (graph, node index) of each `eval: a + b` step whose operands had one shape and dtype in every
    # meta run of materialize (scmc.passes.inplace may then add in place)
    matched_sums: set[tuple[str, int]] = field(default_factory=set)
    macs: int | None = None  # multiply-accumulates of one sample in inference (FlopCounterMode / 2); materialize


# --------------------------------------------------------------------------- dump / verify


def format_value(value: Any) -> str:
    if isinstance(value, Ref):
        return value.address
    if isinstance(value, Param):
        return value.name
    if isinstance(value, ParamExpr):
        return value.source
    if isinstance(value, Ctor):
        parts = [format_value(a) for a in value.args] + [f"{k}={format_value(v)}" for k, v in value.kwargs]
        return f"{value.address}({', '.join(parts)})"
    if isinstance(value, tuple):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def format_arg(arg: Arg) -> str:
    if isinstance(arg, Var):
        return arg.name
    if isinstance(arg, Index):
        return f"{format_arg(arg.base)}[{arg.key!r}]"
    if isinstance(arg, ListArg):
        return "[" + ", ".join(format_arg(a) for a in arg.items) + "]"
    if isinstance(arg, Const):
        return format_value(arg.value)
    return f"({arg.expr.source})"


def format_out(out: Out) -> str:
    if isinstance(out, OutName):
        return out.name
    if isinstance(out, OutTuple):
        return "(" + ", ".join(format_out(o) for o in out.items) + ")"
    return "{" + ", ".join(f"{n}<-[{k!r}]" for n, k in out.pairs) + "}"


def dump(program: Program) -> str:
    """A stable text form of the program, for tests and internal-error reports."""
    lines = [f"program root={program.root}"]
    for m in program.modules:
        params = ", ".join(f"{n}: {t}" for n, t in m.params)
        lines.append(f"module {m.name}({params}) template={m.template!r} structured={m.structured}")
        for c in m.children:
            lines.append(f"  child {c.attr} [{c.kind}] = {format_value(c.ctor)}")
        lines.append(f"  inputs {', '.join(m.inputs)} -> outputs {', '.join(m.outputs)}")
        for label, graph in (("flow", m.flow), ("inference", m.inference)):
            if graph is None:
                continue
            lines.append(f"  {label}:")
            for n in graph:
                call = n.layer or (f"{n.augment}=" if n.augment else "=")
                args = [format_arg(a) for a in n.args] + [f"{k}={format_arg(v)}" for k, v in n.kwargs]
                lines.append(f"    {format_out(n.out)} <- {call}({', '.join(args)})")
    return "\n".join(lines) + "\n"


class VerifyError(Exception):
    """An IR invariant broke: a bug in scmc, reported as an internal compiler error."""


def verify(program: Program) -> None:
    seen: set[str] = set()
    for m in program.modules:
        if m.name in seen:
            raise VerifyError(f"class {m.name} defined twice")
        attrs = [c.attr for c in m.children]
        if len(set(attrs)) != len(attrs):
            raise VerifyError(f"{m.name}: duplicate attributes {attrs}")
        for c in m.children:
            if c.kind == "user" and c.ctor.address not in seen:
                raise VerifyError(f"{m.name}.{c.attr} uses class {c.ctor.address} before it is defined")
        callable_attrs = set(attrs)
        for graph in (m.flow,) if m.inference is None else (m.flow, m.inference):
            defined = set(m.inputs)
            for n in graph:
                for name in node_reads(n):
                    if name not in defined:
                        raise VerifyError(f"{m.name}: {name} read before it is written")
                if n.layer is not None and n.layer not in callable_attrs:
                    raise VerifyError(f"{m.name}: unknown layer {n.layer}")
                if n.augment and (
                    n.layer is not None or len(n.args) != 2 or n.args[0] != Var(out_names(n.out)[0]) or n.kwargs
                ):
                    raise VerifyError(f"{m.name}: augmented assignment {format_out(n.out)} is not `x {n.augment}= y`")
                defined.update(out_names(n.out))
            for name in m.outputs:
                if name not in defined:
                    raise VerifyError(f"{m.name}: output {name} never written")
        seen.add(m.name)
    if program.modules and program.modules[-1].name != program.root:
        raise VerifyError("the root module must come last")
