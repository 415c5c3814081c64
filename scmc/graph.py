"""`scmc graph`: the layer graph of a template or a built package, drawn by Graphviz.

The model is taken as `scmc inspect` takes it (a template compiled in memory, or a built
package imported from its ``src/``), built on the meta device and traced with ``torch.fx``:
the generated user layers are traced into, every library layer (``torch.nn``, ``timm.layers``,
``scmc_runtime.layers``) stays one node. One meta-device run of the traced graph gives every
value's shape, which labels the edges.

What is drawn:

- every user layer is a cluster (``stem: Stem``), nested as the layers are;
- a run of two or more consecutive sibling user layers of one class (``block4`` .. ``block9``,
  all ``Block``) is one node, ``Block x6``, unless ``expand``;
- below ``depth`` levels of clusters, a user layer is one node;
- edges carry the shape of the tensor they carry (batch 1, as ``scmc inspect``).

``.dot`` output is Graphviz's source text and needs no Graphviz program; ``.svg``, ``.png`` and
``.pdf`` are rendered by the ``dot`` program, which the project's set-up installs
(``apt-get install -y graphviz``) and whose absence is a one-line error naming that command.
"""

from __future__ import annotations

import operator
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

TEXT_FORMATS = (".dot", ".gv")
RENDERED_FORMATS = (".svg", ".png", ".pdf")
INSTALL_DOT = "apt-get install -y graphviz"
RENDER_TIMEOUT_S = 120.0

_TRANSPARENT = {operator.getitem}  # a dict or tuple lookup: drawn as the edge it is, not as a node


class GraphError(Exception):
    """A user mistake or a missing tool: one line ``error[CODE]: message``, exit 1."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def render(self) -> str:
        return f"error[{self.code}]: {self}"


@dataclass
class Unit:
    """One drawn node: a library layer or function call, a collapsed run of blocks, a user layer
    below the depth limit, a model input or a model output."""

    id: str
    label: str
    cluster: str  # qualified name of the user layer it is drawn in ("" for the model itself)
    kind: str  # "op" | "repeat" | "layer" | "input" | "output"


@dataclass
class LayerGraph:
    name: str
    source: str
    units: dict[str, Unit] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (from, to, shape)
    clusters: dict[str, str] = field(default_factory=dict)  # qualified name -> label, outermost first

    def cluster_parent(self, path: str) -> str:
        """The nearest enclosing drawn cluster of PATH ("" for the top level)."""
        while "." in path:
            path = path.rsplit(".", 1)[0]
            if path in self.clusters:
                return path
        return ""


# --------------------------------------------------------------------------- tracing


def _trace(model: Any, package: str, inputs: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """The fx graph of MODEL (user layers traced into, library layers as leaves) and each node's shape."""
    import torch
    import torch.fx

    from scmc.inspection import _shape_of

    def user_layer(module: Any) -> bool:
        return type(module).__module__.startswith(package + ".")

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: Any, qualified_name: str) -> bool:
            return not user_layer(module) and not _is_stage(module, user_layer)

    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # a forward fx cannot follow (data-dependent control flow)
        raise GraphError("E1403", f"cannot trace the model into a graph: {type(exc).__name__}: {exc}") from None
    module = torch.fx.GraphModule(model, graph)
    shapes: dict[str, str] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: Any) -> Any:
            value = super().run_node(node)
            shapes[node.name] = _shape_of(value)
            return value

    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise GraphError("E1404", f"no input shape for {', '.join(missing)}: pass -s NAME=C,H,W")
    try:
        with torch.no_grad():
            Recorder(module).run(*(inputs[n] for n in names))
    except GraphError:
        raise
    except Exception as exc:
        raise GraphError("E1403", f"running the traced graph failed: {type(exc).__name__}: {exc}") from None
    return graph, shapes


def _is_stage(module: Any, user_layer: Any) -> bool:
    """A generated ``nn.Sequential`` of user layers (scmc/passes/stages.py): traced into, not a leaf."""
    import torch

    return isinstance(module, torch.nn.Sequential) and any(user_layer(c) for c in module.children())


def _repeats(model: Any, user_layer: Any) -> dict[str, tuple[str, list[str]]]:
    """Member path -> (run id, members) for runs of 2+ consecutive sibling user layers of one class."""
    out: dict[str, tuple[str, list[str]]] = {}
    for parent, module in model.named_modules():
        if not user_layer(module) and not _is_stage(module, user_layer) and parent:
            continue
        run: list[tuple[str, Any]] = []
        for name, child in [*module.named_children(), ("", None)]:  # a sentinel ends the last run
            if run and (child is None or type(child) is not type(run[-1][1]) or not user_layer(child)):
                if len(run) >= 2:
                    members = [f"{parent}.{n}" if parent else n for n, _ in run]
                    for member in members:
                        out[member] = (members[0] + "..", members)
                run = []
            if child is not None and user_layer(child):
                run.append((name, child))
    return out


def layer_graph(
    model: Any,
    package: str,
    inputs: dict[str, Any],
    *,
    expand: bool = False,
    depth: int | None = None,
    source: str = "",
) -> LayerGraph:
    """The drawable graph of MODEL (built on the meta device) at INPUTS (meta tensors by name)."""

    from scmc_runtime.optim import step_name

    def user_layer(module: Any) -> bool:
        return type(module).__module__.startswith(package + ".")

    graph, shapes = _trace(model, package, inputs)
    modules = dict(model.named_modules())
    repeats = {} if expand else _repeats(model, user_layer)
    out = LayerGraph(name=type(model).__name__, source=source)

    def attr(path: str) -> str:
        """The template's name of the layer at PATH (`block7` for `backbone.blocks2.3`, a stage's member)."""
        return step_name(model, path).rsplit(".", 1)[-1]

    def params(paths: Sequence[str]) -> str:
        count = sum(p.numel() for path in paths for p in modules[path].parameters())
        return f"{count / 1e6:.2f}M params" if count >= 10**5 else f"{count:,} params"

    def scopes(node: Any) -> list[str]:
        """The user layers NODE runs in, outermost first (the model itself not included)."""
        stack = node.meta.get("nn_module_stack") or {}
        chain = [p for p in stack if p and p in modules and user_layer(modules[p])]
        if node.op == "call_module" and chain and chain[-1] == node.target:
            chain.pop()
        return chain

    def unit_of(node: Any) -> Unit:
        chain = scopes(node)
        parent = ""
        for level, path in enumerate(chain, start=1):
            if path in repeats:
                run_id, members = repeats[path]
                cls = type(modules[path]).__name__
                label = f"{attr(members[0])} .. {attr(members[-1])}\n{cls} x{len(members)}\n{params(members)}"
                return out.units.setdefault(run_id, Unit(run_id, label, parent, "repeat"))
            if depth is not None and level > depth:
                label = f"{attr(path)}\n{type(modules[path]).__name__}\n{params([path])}"
                return out.units.setdefault(path, Unit(path, label, parent, "layer"))
            parent = path
            out.clusters.setdefault(path, f"{attr(path)}: {type(modules[path]).__name__}")
        if node.op == "placeholder":
            label = f"{node.target}\n{shapes.get(node.name, '')}"
            return out.units.setdefault(node.name, Unit(node.name, label, "", "input"))
        if node.op == "call_module":
            label = f"{attr(node.target)}\n{type(modules[node.target]).__name__}"
        elif node.op == "call_function":
            label = getattr(node.target, "__name__", str(node.target))
        else:
            label = str(node.target)
        return out.units.setdefault(node.name, Unit(node.name, label, parent, "op"))

    def source_of(node: Any) -> Any:
        while node.op == "call_function" and node.target in _TRANSPARENT and node.all_input_nodes:
            node = node.all_input_nodes[0]
        return node

    def connect(src: Any, dst: Unit) -> None:
        origin = unit_of(source_of(src))
        edge = (origin.id, dst.id, shapes.get(src.name, ""))
        if origin.id != dst.id and edge not in out.edges:
            out.edges.append(edge)

    for node in graph.nodes:
        if node.op == "output":
            result = node.args[0]
            if isinstance(result, dict):
                items = list(result.items())
            elif isinstance(result, (list, tuple)):
                items = list(enumerate(result))
            else:
                items = [("output", result)]
            for key, value in items:
                unit = out.units.setdefault(f"output:{key}", Unit(f"output:{key}", str(key), "", "output"))
                for src in _nodes_in(value):
                    connect(src, unit)
            continue
        if node.op == "call_function" and node.target in _TRANSPARENT:
            continue
        unit = unit_of(node)
        for src in node.all_input_nodes:
            connect(src, unit)
    return out


def _nodes_in(value: Any) -> list[Any]:
    import torch.fx

    found: list[Any] = []
    torch.fx.node.map_arg(value, found.append)
    return found


# --------------------------------------------------------------------------- drawing

_STYLE = {
    "op": {"shape": "box", "style": "rounded,filled", "fillcolor": "#eef3fb"},
    "repeat": {"shape": "box3d", "style": "filled", "fillcolor": "#fdf1d6"},
    "layer": {"shape": "box", "style": "filled", "fillcolor": "#e6f4ea"},
    "input": {"shape": "oval", "style": "filled", "fillcolor": "#ffffff"},
    "output": {"shape": "oval", "style": "filled", "fillcolor": "#ffffff"},
}


def to_dot(layer_graph_: LayerGraph) -> Any:
    """A ``graphviz.Digraph`` of the graph: clusters nested as the user layers are."""
    try:
        import graphviz
    except ImportError:
        raise GraphError("E1401", "scmc graph needs the graphviz Python package: pip install graphviz") from None

    g = layer_graph_
    title = f"{g.name} from {g.source}" if g.source else g.name
    dot = graphviz.Digraph(
        g.name,
        graph_attr={"label": title, "labelloc": "t", "fontname": "Helvetica", "fontsize": "14", "rankdir": "TB"},
        node_attr={"fontname": "Helvetica", "fontsize": "10"},
        edge_attr={"fontname": "Helvetica", "fontsize": "9", "color": "#555555"},
    )
    ids = {uid: f"n{i}" for i, uid in enumerate(g.units)}
    children: dict[str, list[str]] = {}
    for path in g.clusters:
        children.setdefault(g.cluster_parent(path), []).append(path)
    members: dict[str, list[Unit]] = {}
    for unit in g.units.values():
        members.setdefault(unit.cluster, []).append(unit)

    def fill(target: Any, cluster: str) -> None:
        for unit in members.get(cluster, []):
            target.node(ids[unit.id], unit.label, **_STYLE[unit.kind])
        for child in children.get(cluster, []):
            with target.subgraph(name=f"cluster_{child}") as sub:
                sub.attr(label=g.clusters[child], style="rounded", color="#7a8fb3", fontname="Helvetica")
                fill(sub, child)

    fill(dot, "")
    for src, dst, shape in g.edges:
        dot.edge(ids[src], ids[dst], label=shape)
    return dot


def check_output(output: Path) -> str | None:
    """The `dot` program OUTPUT needs (None for DOT text); refuses an unknown format or a missing `dot`."""
    suffix = output.suffix.lower()
    if suffix in TEXT_FORMATS:
        return None
    if suffix not in RENDERED_FORMATS:
        raise GraphError(
            "E1402",
            f"-o {output}: unknown format `{output.suffix or '(none)'}`; write a "
            f"{', '.join(RENDERED_FORMATS + TEXT_FORMATS)} file",
        )
    program = shutil.which("dot")
    if program is None:
        raise GraphError(
            "E1400",
            f"rendering {output.name} needs Graphviz's `dot` program, which is not on PATH: install it with "
            f"`{INSTALL_DOT}` (macOS: `brew install graphviz`), or write -o {output.with_suffix('.dot').name} instead",
        )
    return program


def write(dot: Any, output: Path) -> None:
    """Write OUTPUT: the DOT text for .dot/.gv, else what the `dot` program renders."""
    program = check_output(output)
    if program is None:
        _write_atomic(output, dot.source.encode("utf-8"))
        return
    suffix = output.suffix.lower()
    try:
        data = subprocess.run(
            [program, f"-T{suffix[1:]}"],
            input=dot.source.encode("utf-8"),
            capture_output=True,
            check=True,
            timeout=RENDER_TIMEOUT_S,
        ).stdout
    except subprocess.TimeoutExpired:
        raise GraphError("E1405", f"`dot` took longer than {RENDER_TIMEOUT_S:.0f} s to draw {output.name}") from None
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        why = detail.decode("utf-8", "replace").strip().splitlines()[-1:] or [str(exc)]
        raise GraphError("E1405", f"`dot` could not draw {output.name}: {why[0]}") from None
    _write_atomic(output, data)


def _write_atomic(path: Path, data: bytes) -> None:
    path = path.absolute()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise GraphError("E1406", f"writing {path} failed: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def draw(
    target: Path,
    output: Path,
    *,
    params: Sequence[str] = (),
    shapes: dict[str, Any] | None = None,
    allow_modules: tuple[str, ...] = (),
    expand: bool = False,
    depth: int | None = None,
    force: bool = False,
) -> LayerGraph:
    """`scmc graph`: load TARGET as `scmc inspect` does, trace it and write OUTPUT."""
    import torch

    from scmc.build import guard_file
    from scmc.inspection import _dummy_inputs, load

    if depth is not None and depth < 0:
        raise GraphError("E1407", f"--depth must be 0 or more, not {depth}")
    check_output(output)  # before anything is compiled
    guard_file(output, force, [target])
    with load(target, list(params), dict(shapes or {}), allow_modules) as loaded:
        with torch.device("meta"):
            model = loaded.model_module.Model().eval()
        inputs = _dummy_inputs(loaded.manifest, 1, "meta")
        drawn = layer_graph(model, loaded.name, inputs, expand=expand, depth=depth, source=loaded.source)
    guard_file(output, force, [target])  # again: it may have appeared meanwhile
    write(to_dot(drawn), output)
    return drawn


__all__ = ["GraphError", "LayerGraph", "Unit", "check_output", "draw", "layer_graph", "to_dot", "write"]
