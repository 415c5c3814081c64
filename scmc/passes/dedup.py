"""De-duplicate user-layer instances into classes and lift differing constants.

Instances with the same structure (children, forward graph, signature types) share one
class. Where their constructor constants differ, the constant becomes a typed constructor
argument of the class. The argument takes the name of the template parameter (``PARAM``)
whose values match it across all instances (``fout``, ``drop_path``), an integer multiple
of one (``fout * 4``), or else a name made from the layer and argument
(``conv2d_in_channels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scmc.ir import (
    Child,
    Ctor,
    Instance,
    ModuleDef,
    Param,
    ParamExpr,
    Program,
    Ref,
    format_arg,
    format_out,
)
from scmc.names import JOINED, Namespace, is_name, to_snake

HOLE = "\x00hole"


@dataclass
class Group:
    hint: str
    signature: str
    members: list[Instance] = field(default_factory=list)
    name: str = ""
    params: list[tuple[str, str]] = field(default_factory=list)
    # per hole position: a literal, a Param or a ParamExpr (filled in phase 2)
    resolved: list[Any] = field(default_factory=list)
    hole_labels: list[str] = field(default_factory=list)


def _holes(value: Any, out: list[Any], labels: list[str], label: str) -> str:
    """Signature of a constructor value with its literals replaced by holes."""
    if isinstance(value, Ref):
        return f"ref:{value.address}"
    if isinstance(value, Ctor):
        args = [_holes(a, out, labels, f"{label}_{i}") for i, a in enumerate(value.args)]
        kwargs = [f"{k}={_holes(v, out, labels, k)}" for k, v in value.kwargs]
        return f"{value.address}({','.join(args + kwargs)})"
    if isinstance(value, tuple):
        return "(" + ",".join(_holes(v, out, labels, label) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ",".join(_holes(v, out, labels, label) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_holes(v, out, labels, str(k))}" for k, v in value.items()) + "}"
    out.append(value)
    labels.append(label)
    return HOLE


def _fill(value: Any, it) -> Any:
    if isinstance(value, Ref):
        return value
    if isinstance(value, Ctor):
        args = tuple(_fill(a, it) for a in value.args)
        kwargs = tuple((k, _fill(v, it)) for k, v in value.kwargs)
        return Ctor(value.address, args, kwargs, value.user)
    if isinstance(value, tuple):
        return tuple(_fill(v, it) for v in value)
    if isinstance(value, list):
        return [_fill(v, it) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, it) for k, v in value.items()}
    return next(it)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _annotation(values: list[Any]) -> str:
    types = {type(v) for v in values}
    if types == {bool}:
        return "bool"
    if types <= {int} and types:
        return "int"
    if types <= {int, float} and types:
        return "float"
    if types == {str}:
        return "str"
    non_none = types - {type(None)}
    if type(None) in types and len(non_none) == 1:
        return f"{_annotation([v for v in values if v is not None])} | None"
    return "Any"


class Deduplicator:
    def __init__(self) -> None:
        self.groups: list[Group] = []
        self.by_key: dict[tuple[str, str], Group] = {}
        self.group_of: dict[int, Group] = {}
        self.leaf_values: dict[int, list[Any]] = {}
        self.leaf_labels: dict[int, list[str]] = {}

    # phase 1: structure
    def visit(self, inst: Instance, is_root: bool = False) -> Group:
        for child in inst.children:
            if child.instance is not None:
                self.visit(child.instance)
        values: list[Any] = []
        labels: list[str] = []
        parts = [
            f"root={is_root}",
            f"in={inst.inputs}",
            f"out={inst.outputs}",
            f"structured={inst.structured}",
            f"types={sorted(inst.types.items())}",
        ]
        for child in inst.children:
            if child.kind == "user":
                parts.append(
                    f"{child.attr}:user:{self.group_of[id(child.instance)].hint}#{self.groups.index(self.group_of[id(child.instance)])}"
                )
            else:
                parts.append(f"{child.attr}:{child.kind}:{_holes(child.ctor, values, labels, child.attr)}")
        for label, graph in (("flow", inst.flow), ("inference", inst.inference)):
            if graph is None:
                parts.append(f"{label}:none")
                continue
            for node in graph:
                args = [format_arg(a) for a in node.args] + [f"{k}={format_arg(v)}" for k, v in node.kwargs]
                parts.append(f"{label}:{format_out(node.out)}<-{node.layer}{node.augment}({','.join(args)})")
        signature = "\n".join(parts)
        key = (inst.class_hint, signature)
        group = self.by_key.get(key)
        if group is None:
            group = Group(inst.class_hint, signature)
            self.by_key[key] = group
            self.groups.append(group)
        group.members.append(inst)
        self.group_of[id(inst)] = group
        self.leaf_values[id(inst)] = values
        self.leaf_labels[id(inst)] = [f"{label}" for label in labels]
        return group

    # phase 2: constants -> literals or parameters
    def param_values(self, inst: Instance) -> list[Any]:
        """The values of the group's constructor parameters for one instance."""
        group = self.group_of[id(inst)]
        values = self.all_values(inst)
        out = []
        for name, _ in group.params:
            if name in inst.params:
                out.append(inst.params[name])
                continue
            pos = next(i for i, r in enumerate(group.resolved) if isinstance(r, Param) and r.name == name)
            out.append(values[pos])
        return out

    def all_values(self, inst: Instance) -> list[Any]:
        values = list(self.leaf_values[id(inst)])
        for child in inst.children:
            if child.instance is not None:
                values.extend(self.param_values(child.instance))
        return values

    def resolve_group(self, group: Group) -> None:
        first = group.members[0]
        labels = list(self.leaf_labels[id(first)])
        for child in first.children:
            if child.instance is not None:
                sub = self.group_of[id(child.instance)]
                labels.extend(f"{child.attr}_{name}" for name, _ in sub.params)
        table = [self.all_values(m) for m in group.members]
        n = len(labels)
        group.hole_labels = labels
        resolved: list[Any] = []
        params: list[tuple[str, str]] = []
        lifted_values: dict[str, list[Any]] = {}
        candidates = []
        for key in first.params:
            if is_name(key) and key != "self":
                candidates.append(key)
        arguments = Namespace(["self", *candidates])  # the made-up arguments: never a template parameter
        for pos in range(n):
            column = [row[pos] for row in table]
            if all(_same(v, column[0]) for v in column[1:]):
                resolved.append(column[0])
                continue
            choice: Any = None
            for key in candidates:
                if all(key in m.params and _same(m.params[key], v) for m, v in zip(group.members, column, strict=True)):
                    choice = Param(key)
                    break
            if choice is None and all(isinstance(v, int) and not isinstance(v, bool) for v in column):
                for key in candidates:
                    given = [m.params.get(key) for m in group.members]
                    ints = [b for b in given if isinstance(b, int) and not isinstance(b, bool) and b != 0]
                    if len(ints) == len(given):
                        factor = column[0] // ints[0]
                        if factor > 1 and all(b * factor == v for b, v in zip(ints, column, strict=True)):
                            choice = ParamExpr(f"{key} * {factor}", (key,))
                            break
            if choice is None:
                for name, vals in lifted_values.items():
                    if all(_same(a, b) for a, b in zip(vals, column, strict=True)):
                        choice = Param(name)
                        break
            if choice is None:
                choice = Param(arguments.fresh(to_snake(labels[pos]) or "arg"))  # stride, stride_2
            for name in choice.names if isinstance(choice, ParamExpr) else (choice.name,):
                if name not in lifted_values:
                    source = (
                        [m.params.get(name) for m in group.members]
                        if isinstance(choice, ParamExpr) or name in candidates
                        else column
                    )
                    lifted_values[name] = source
                    params.append((name, _annotation(source)))
            resolved.append(choice)
        # order: template parameters first (in PARAM order), then the made-up ones
        order = {k: i for i, k in enumerate(candidates)}
        params.sort(key=lambda p: (order.get(p[0], len(order)), 0))
        group.params = params
        group.resolved = resolved

    def module_def(self, group: Group, name_of: dict[int, str]) -> ModuleDef:
        inst = group.members[0]
        it = iter(group.resolved)
        children: list[Child] = []
        leaf_children = [c for c in inst.children if c.kind != "user"]
        for child in inst.children:
            if child.kind != "user":
                children.append(Child(child.attr, child.kind, _fill(child.ctor, it), child.span))
        for child in inst.children:
            if child.kind == "user":
                sub = self.group_of[id(child.instance)]
                kwargs = tuple((pname, next(it)) for pname, _ in sub.params)
                children.append(Child(child.attr, "user", Ctor(name_of[id(sub)], (), kwargs, user=True), child.span))
        order = {c.attr: i for i, c in enumerate(inst.children)}
        children.sort(key=lambda c: order[c.attr])
        del leaf_children
        types = tuple((k, v) for k, v in inst.types.items() if k in inst.inputs or k in inst.outputs)
        return ModuleDef(
            name=name_of[id(group)],
            params=tuple(group.params),
            children=tuple(children),
            inputs=tuple(inst.inputs),
            outputs=tuple(inst.outputs),
            structured=inst.structured,
            flow=tuple(inst.flow),
            inference=tuple(inst.inference) if inst.inference is not None else None,
            types=types,
            template=inst.template,
            doc=_doc(inst, is_root=group is self.groups[-1]),
        )


def _doc(inst: Instance, is_root: bool) -> str:
    path = inst.span.path
    if is_root:
        return f"The root layer graph of `{path}`."
    if inst.template == path:
        return f"The layer graph of `{path}`."
    return f"User layer `{inst.template}` of `{path}`."


def deduplicate(root: Instance, root_name: str, reserved: set[str] | None = None) -> Program:
    d = Deduplicator()
    root_group = d.visit(root, is_root=True)
    for group in d.groups:
        d.resolve_group(group)
    names: dict[int, str] = {}
    classes = Namespace(reserved or (), numbering=JOINED)
    classes.reserve([root_name])
    for group in d.groups:
        names[id(group)] = root_name if group is root_group else classes.fresh(group.hint)  # Block, Block2
    modules = tuple(d.module_def(g, names) for g in d.groups)
    return Program(modules, root_name)
