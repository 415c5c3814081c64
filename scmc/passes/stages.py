"""Repeated blocks as ``torch.nn.Sequential`` stages, the way timm and torchvision write them.

A template that repeats a block writes one step per block (``block0 .. block11``,
``layer1_0, layer1_1``). Hand-written PyTorch holds such a run in one ``nn.Sequential``
attribute called in one line (``x = self.blocks(x)``). This pass finds every maximal run of
two or more consecutive steps that

- are all generated classes (user layers), or all the same library layer,
- share a name stem: the step name without its trailing number (``block`` of ``block3``,
  ``layer1`` of ``layer1_0``), so the grouping follows the template's names and never the
  classes dedup made (a positive drop-path rate makes ``block0`` another class than
  ``block1`` without changing what the template means),
- are chained: each takes one positional argument, the previous step's single output, and
  nothing else (another step, the outputs, the inference graph) reads the values in between,
- are each called exactly once and are adjacent attributes, so construction order (and with
  it the seeded initial weights) does not change,

and replaces it by one ``Sequential`` child. Names: the stem when it ends with a digit
(``layer1``, torchvision's), else its plural (``blocks``), numbered in order when one module
has several runs of the same stem (``blocks0 .. blocks3``, like timm's ``stages.N``).

State-dict keys change (``backbone.block2.fc1.weight`` -> ``backbone.blocks1.0.fc1.weight``):
this is the package's model format 2 (``MODEL_FORMAT``). The template's names stay available
to what matches them (backward regexes for layer decay): each ``Stage`` records the step names
of its members, emitted as the class's ``step_names``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from scmc.ir import (
    Arg,
    Child,
    Const,
    Ctor,
    ExprArg,
    Index,
    ListArg,
    ModuleDef,
    Node,
    OutName,
    Program,
    Var,
    out_names,
)
from scmc.names import Namespace

# 1: every step an attribute of its own (block0 .. block11); 2: repeated blocks as nn.Sequential.
MODEL_FORMAT = 2

SEQUENTIAL = "torch.nn.Sequential"
_NUMBERED = re.compile(r"^(?P<stem>.*?[A-Za-z0-9])_?(?P<index>\d+)$")


@dataclass(frozen=True)
class Stage:
    """One Sequential attribute of a module and the template's names of its members, in order."""

    attr: str
    steps: tuple[str, ...]


def stem_of(name: str) -> str | None:
    """The name without its trailing number (`block` of `block3`, `layer1` of `layer1_0`); None without one."""
    match = _NUMBERED.match(name)
    if match is None or not match.group("stem").strip("_"):
        return None
    return match.group("stem")


def _reads(arg: Arg) -> list[str]:
    if isinstance(arg, Var):
        return [arg.name]
    if isinstance(arg, Index):
        return _reads(arg.base)
    if isinstance(arg, ListArg):
        return [n for item in arg.items for n in _reads(item)]
    if isinstance(arg, ExprArg):
        return list(arg.expr.names)
    assert isinstance(arg, Const)
    return []


def _node_reads(node: Node) -> list[str]:
    return [n for a in (*node.args, *(v for _, v in node.kwargs)) for n in _reads(a)]


def _readers(graph: tuple[Node, ...], index: int, outputs: tuple[str, ...]) -> int | None:
    """How many later reads the single output of GRAPH[INDEX] has (the outputs count as one); None
    when it is not a single name."""
    out = graph[index].out
    if not isinstance(out, OutName):
        return None
    count = 0
    for node in graph[index + 1 :]:
        count += _node_reads(node).count(out.name)
        if out.name in out_names(node.out):
            return count
    return count + (out.name in outputs)


def _tensor_layer(program: Program, child: Child, inline: frozenset[str]) -> bool:
    """A child that takes one tensor and returns one (a generated class must say so; a library layer is
    taken at its word, as its step already passes one value). INLINE: layers the emitter writes as an
    operator, which stay steps of their own."""
    if child.kind == "module":
        return child.ctor.address != SEQUENTIAL and child.ctor.address not in inline
    if child.kind != "user":
        return False
    m = program.module(child.ctor.address)
    types = dict(m.types)
    return (
        len(m.inputs) == 1
        and len(m.outputs) == 1
        and not m.structured
        and all(types.get(n, "torch.Tensor") == "torch.Tensor" for n in (*m.inputs, *m.outputs))
    )


def _group_key(child: Child) -> str:
    return "user" if child.kind == "user" else child.ctor.address


def _runs(
    program: Program, m: ModuleDef, graph: tuple[Node, ...], calls: dict[str, int], inline: frozenset[str]
) -> list[tuple[int, int]]:
    """(start, end) of every run of GRAPH to become one Sequential, end exclusive."""
    children = {c.attr: c for c in m.children}
    position = {c.attr: i for i, c in enumerate(m.children)}

    def member(i: int) -> bool:
        node = graph[i]
        child = children.get(node.layer or "")
        return (
            child is not None
            and calls[child.attr] == 1
            and len(node.args) == 1
            and not node.kwargs
            and stem_of(child.attr) is not None
            and _tensor_layer(program, child, inline)
        )

    def joins(i: int) -> bool:
        """Whether GRAPH[i] continues the run that GRAPH[i - 1] is in."""
        prev, node = graph[i - 1], graph[i]
        a, b = children[prev.layer or ""], children[node.layer or ""]
        return (
            stem_of(a.attr) == stem_of(b.attr)
            and _group_key(a) == _group_key(b)
            and position[b.attr] == position[a.attr] + 1
            and isinstance(prev.out, OutName)
            and node.args == (Var(prev.out.name),)
            and _readers(graph, i - 1, m.outputs) == 1
        )

    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(graph):
        if not member(i):
            i += 1
            continue
        end = i + 1
        while end < len(graph) and member(end) and joins(end):
            end += 1
        if end - i >= 2:
            runs.append((i, end))
        i = end
    return runs


def _stage_names(m: ModuleDef, stems: list[str]) -> list[str]:
    """An attribute name per run: the stem if it ends with a digit, else its plural; numbered from 0 when
    several runs share it; never a name the module already uses."""
    bases = [stem if stem[-1].isdigit() else (stem if stem.endswith("s") else stem + "s") for stem in stems]
    attributes = Namespace(c.attr for c in m.children)
    attributes.reserve(p for p, _ in m.params)
    attributes.reserve(m.inputs)
    for graph in (m.flow, m.inference or ()):
        for node in graph:
            attributes.reserve(out_names(node.out))
    names: list[str] = []
    for i, base in enumerate(bases):
        before = bases[:i].count(base)
        name = base
        if bases.count(base) > 1:  # blocks0, blocks1 (like timm's stages.N); layer1, layer1_1
            name = (
                f"{base}_{before}"
                if base[-1].isdigit() and before
                else base if base[-1].isdigit() else f"{base}{before}"
            )
        names.append(attributes.fresh(name))  # blocks0, then blocks0_2 if the module has a `blocks0`
    return names


def group_module(
    program: Program, m: ModuleDef, inline: frozenset[str] = frozenset()
) -> tuple[ModuleDef, tuple[Stage, ...]]:
    """M with its runs of repeated blocks as Sequential children, and the stages made."""
    calls: dict[str, int] = {}
    for graph in (m.flow, m.inference or ()):
        for node in graph:
            if node.layer is not None:
                calls[node.layer] = calls.get(node.layer, 0) + 1
    graphs = [m.flow] + ([m.inference] if m.inference is not None else [])
    runs = [(g, run) for g, graph in enumerate(graphs) for run in _runs(program, m, graph, calls, inline)]
    if not runs:
        return m, ()
    stems = [stem_of(graphs[g][start].layer or "") or "" for g, (start, _) in runs]
    names = _stage_names(m, stems)
    children = {c.attr: c for c in m.children}
    replaced: dict[str, Child] = {}  # first member's attr -> the Sequential
    dropped: set[str] = set()
    stages: list[Stage] = []
    new_graphs = [list(graph) for graph in graphs]
    for (g, (start, end)), name in sorted(zip(runs, names, strict=True), key=lambda r: (r[0][0], -r[0][1][0])):
        graph = graphs[g]
        members = [children[node.layer or ""] for node in graph[start:end]]
        replaced[members[0].attr] = Child(
            name, "module", Ctor(SEQUENTIAL, tuple(c.ctor for c in members)), members[0].span
        )
        dropped.update(c.attr for c in members[1:])
        stages.append(Stage(name, tuple(c.attr for c in members)))
        comment = "\n".join(node.comment for node in graph[start:end] if node.comment)
        first, last = graph[start], graph[end - 1]
        call = Node(name, first.args, (), last.out, first.span, comment)
        new_graphs[g][start:end] = [call]
    new_children = tuple(replaced.get(c.attr, c) for c in m.children if c.attr not in dropped)
    stages.sort(key=lambda s: [c.attr for c in new_children].index(s.attr))
    inference = tuple(new_graphs[1]) if m.inference is not None else None
    return dataclasses.replace(m, children=new_children, flow=tuple(new_graphs[0]), inference=inference), tuple(stages)


def group_stages(
    program: Program, inline: frozenset[str] = frozenset()
) -> tuple[Program, dict[str, tuple[Stage, ...]]]:
    """PROGRAM with repeated blocks as Sequential stages, and the stages of each class that has some.
    INLINE: library layers (addresses) the emitter writes as operators; they are never grouped."""
    modules = []
    stages: dict[str, tuple[Stage, ...]] = {}
    for m in program.modules:
        grouped, made = group_module(program, m, inline)
        modules.append(grouped)
        if made:
            stages[m.name] = made
    return Program(tuple(modules), program.root), stages
