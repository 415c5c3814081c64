"""Zero-rate dropout layers become ``torch.nn.Identity()``, as hand-written code has them.

timm writes ``DropPath(drop_path) if drop_path > 0. else nn.Identity()``; a template writes the
layer with whatever rate its parameters give, ``timm.layers.DropPath(drop_prob=0.0)`` included.
This pass, run on the de-duplicated program, replaces every dropout constructor whose rate is a
literal zero with ``torch.nn.Identity()``. A user layer that is then the identity in training and
in inference (ConvNeXt's ``DropPath`` wrapper: the drop in training, a plain assignment at
inference) is itself replaced by ``torch.nn.Identity()`` where it is used, and its class goes.

None of these layers holds a parameter or a buffer, so the state_dict keys do not change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from scmc.ir import Child, Ctor, ModuleDef, Node, OutName, Program, Var

IDENTITY = Ctor("torch.nn.Identity")

# dropout layers and the argument that holds their rate (also the first positional argument)
ZERO_RATE = {
    "timm.layers.DropPath": "drop_prob",
    "timm.layers.drop.DropPath": "drop_prob",
    "torch.nn.Dropout": "p",
    "torch.nn.Dropout1d": "p",
    "torch.nn.Dropout2d": "p",
    "torch.nn.Dropout3d": "p",
    "torch.nn.AlphaDropout": "p",
    "torch.nn.modules.dropout.Dropout": "p",
}


def zero_rate(ctor: Ctor) -> bool:
    """Whether CTOR is a dropout layer with a literal zero rate (an identity in every mode)."""
    name = ZERO_RATE.get(ctor.address)
    if name is None or ctor.user:
        return False
    rate = ctor.kwarg(name, ctor.args[0] if ctor.args else None)
    return type(rate) in (int, float) and rate == 0


def _is_identity_graph(graph: tuple[Node, ...], module: ModuleDef, identities: set[str]) -> bool:
    """Whether GRAPH hands its one input to its one output through identities and assignments only."""
    aliases = {module.inputs[0]}
    for node in graph:
        if node.kwargs or len(node.args) != 1 or not isinstance(node.out, OutName):
            return False
        arg = node.args[0]
        if not isinstance(arg, Var) or (node.layer is not None and node.layer not in identities):
            return False
        if arg.name in aliases:
            aliases.add(node.out.name)
        else:
            aliases.discard(node.out.name)
    return module.outputs[0] in aliases


def is_identity(module: ModuleDef) -> bool:
    """Whether MODULE computes `out = inp` in training and at inference, with nothing to construct."""
    if module.params or module.structured or len(module.inputs) != 1 or len(module.outputs) != 1:
        return False
    if any(c.kind != "module" or c.ctor != IDENTITY for c in module.children):
        return False
    identities = {c.attr for c in module.children}
    graphs = (module.flow,) if module.inference is None else (module.flow, module.inference)
    return all(_is_identity_graph(g, module, identities) for g in graphs)


def _replace(value: Any) -> Any:
    """VALUE with every zero-rate dropout constructor in it (nested ones too) made an identity."""
    if isinstance(value, Ctor):
        if zero_rate(value):
            return IDENTITY
        args = tuple(_replace(a) for a in value.args)
        kwargs = tuple((k, _replace(v)) for k, v in value.kwargs)
        return (
            value
            if (args, kwargs) == (value.args, value.kwargs)
            else dataclasses.replace(value, args=args, kwargs=kwargs)
        )
    if isinstance(value, list):
        return [_replace(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace(v) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v) for k, v in value.items()}
    return value


def _uses(value: Any, name: str) -> bool:
    if isinstance(value, Ctor):
        return (value.user and value.address == name) or any(
            _uses(v, name) for v in (*value.args, *dict(value.kwargs).values())
        )
    if isinstance(value, (list, tuple)):
        return any(_uses(v, name) for v in value)
    if isinstance(value, dict):
        return any(_uses(v, name) for v in value.values())
    return False


def _positional_calls(module: ModuleDef, attr: str) -> bool:
    """Whether MODULE calls its layer ATTR only as `attr(x)` (`torch.nn.Identity` takes `input`, not `inp=`)."""
    graphs = (module.flow,) if module.inference is None else (module.flow, module.inference)
    return all(len(n.args) == 1 and not n.kwargs for g in graphs for n in g if n.layer == attr)


def identities(program: Program) -> Program:
    """PROGRAM with zero-rate dropouts, and user layers that reduce to the identity, as `torch.nn.Identity()`."""
    gone: set[str] = set()  # classes that compute the identity
    modules: list[ModuleDef] = []
    for module in program.modules:  # leaves first: a class is decided before its users
        children = []
        for child in module.children:
            if child.kind == "user" and child.ctor.address in gone and _positional_calls(module, child.attr):
                children.append(Child(child.attr, "module", IDENTITY, child.span))
            elif child.kind != "function":
                children.append(dataclasses.replace(child, ctor=_replace(child.ctor)))
            else:
                children.append(child)
        module = dataclasses.replace(module, children=tuple(children))
        if module.name != program.root and is_identity(module):
            gone.add(module.name)
        modules.append(module)
    # a class still named somewhere (an argument of another layer, ...) stays defined
    kept = [
        m
        for m in modules
        if m.name not in gone or any(_uses(c.ctor, m.name) for other in modules for c in other.children)
    ]
    return Program(tuple(kept), program.root)
