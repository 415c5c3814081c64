"""Lowering a layer graph: its keys, IMPORTS, INPUTS/OUTPUTS, INPUT_SHAPES and the data-flow checks."""

from __future__ import annotations

from typing import Any

from scmc.addresses import AddressError, check_address, resolve
from scmc.diagnostics import CompileError, Span, did_you_mean
from scmc.ir import INPUT_DTYPES, ChildInst, Instance, Node, node_reads, out_names
from scmc.load import LAYER_GRAPH_KEYS, LDict, LList, Parameters, expand
from scmc.lower.common import GraphContext, LowererBase, Scope, error_at
from scmc.lower.naming import auto_name
from scmc.names import is_name


def _relabel(node: Node, children: list[ChildInst]) -> Node:
    if node.layer is None:
        return node
    for child in children:
        if str(id(child)) == node.layer:
            return Node(child.attr, node.args, node.kwargs, node.out, node.span)
    raise AssertionError("step refers to an unknown child")  # pragma: no cover


def _first_reads(flow: list[Node]) -> list[str]:
    written: set[str] = set()
    reads: list[str] = []
    for node in flow:
        for name in node_reads(node):
            if name not in written and name not in reads:
                reads.append(name)
        written.update(out_names(node.out))
    return reads


class GraphLowering(LowererBase):
    """A layer graph -> an Instance: its keys, IMPORTS, INPUTS/OUTPUTS, INPUT_SHAPES and data flow.

    A part of :class:`~scmc.lower.lowerer.Lowerer`.
    """

    def _lower_graph(
        self,
        raw: LDict,
        scope: Scope,
        params: Parameters,
        template: str,
        class_hint: str,
        is_root: bool,
        use_span: Span | None = None,
    ) -> Instance:
        """One layer graph -> an Instance: rendered, its steps lowered, its data flow checked."""
        self._count_instance(raw)
        graph = self._rendered_graph(raw, params, template, use_span)
        span = graph.span
        errors_before = len(self.diags)
        ctx = GraphContext(scope, params, self._imports(graph))
        flow = self._flow(graph, "FLOW", ctx)
        inference = (
            self._flow(graph, "INFERENCE_FLOW", ctx)
            if "INFERENCE_FLOW" in graph and graph["INFERENCE_FLOW"] is not None
            else None
        )
        if len(self.diags) > errors_before:
            # a broken step makes the data-flow checks below report follow-on errors
            raise CompileError(list(self.diags))
        children = ctx.children
        auto_name(children)
        # map provisional layer references to final attribute names
        flow = [_relabel(n, children) for n in flow]
        inference = [_relabel(n, children) for n in inference] if inference is not None else None
        inputs = self._names(graph, "INPUTS")
        outputs = self._names(graph, "OUTPUTS")
        if inputs is None:
            inputs = _first_reads(flow)
        written = self._check_reads(inputs, flow, inference)
        if outputs is None:
            outputs = written
            if not outputs:
                self.diags.error(
                    "E0737",
                    f"layer graph `{template}` returns nothing: every step writes one of its inputs",
                    use_span or span,
                    "name the result of the last step, or declare OUTPUTS",
                )
        self._check_outputs(graph, inputs, outputs, flow, inference)
        return Instance(
            template,
            class_hint,
            {},
            children,
            list(inputs),
            list(outputs),
            self._structured(graph, is_root),
            flow,
            inference,
            use_span or span,
            self._shapes(graph, inputs) if is_root else None,
        )

    def _count_instance(self, raw: LDict) -> None:
        self.instances += 1
        if self.instances > self.options.max_instances:
            raise error_at(
                "E0707",
                f"more than {self.options.max_instances} layer instances",
                raw.span,
                "a Jinja loop or a recursive template is generating too many layers",
            )

    def _rendered_graph(self, raw: LDict, params: Parameters, template: str, use_span: Span | None) -> LDict:
        """The graph's Jinja rendered with PARAMS, its keys checked; it must have a FLOW."""
        graph = expand(raw, params)
        if not isinstance(graph, LDict):
            raise error_at("E0708", "a layer graph must render to a mapping", raw.span)
        for key in graph:
            if key not in LAYER_GRAPH_KEYS:
                self.diags.error(
                    "E0709",
                    f"unknown key `{key}` in a layer graph",
                    graph.key_span(key),
                    did_you_mean(str(key), LAYER_GRAPH_KEYS) or "user layers are defined at the top level of a file",
                )
        if "FLOW" not in graph:
            self.diags.error(
                "E0710", f"layer graph `{template}` has no FLOW", use_span or graph.span, "add FLOW: [steps...]"
            )
            raise CompileError(list(self.diags))
        return graph

    def _check_reads(self, inputs: list[str], flow: list[Node], inference: list[Node] | None) -> list[str]:
        """E0711 for a name read before it is written; the names FLOW writes (besides its inputs), in order."""
        written_any: list[str] = []
        for label, nodes in (("FLOW", flow), ("INFERENCE_FLOW", inference)):
            if nodes is None:
                continue
            defined = set(inputs)
            for node in nodes:
                for name in node_reads(node):
                    if name not in defined:
                        self.diags.error(
                            "E0711",
                            f"`{name}` is read before it is written",
                            node.span,
                            did_you_mean(name, defined)
                            or f"inputs are {', '.join(inputs) or 'none'}; declare it in INPUTS or write it in an earlier step",
                        )
                for name in out_names(node.out):
                    defined.add(name)
                    if label == "FLOW" and name not in written_any and name not in inputs:
                        written_any.append(name)
        return written_any

    def _check_outputs(
        self, graph: LDict, inputs: list[str], outputs: list[str], flow: list[Node], inference: list[Node] | None
    ) -> None:
        """E0712 for an output that FLOW (or INFERENCE_FLOW) never writes."""
        for label, nodes in (("FLOW", flow), ("INFERENCE_FLOW", inference)):
            if nodes is None:
                continue
            written = set(inputs) | {n for node in nodes for n in out_names(node.out)}
            for name in outputs:
                if name not in written:
                    where = graph.key_span("OUTPUTS") if "OUTPUTS" in graph else graph.span
                    self.diags.error(
                        "E0712", f"output `{name}` is never written by {label}", where, did_you_mean(name, written)
                    )

    def _structured(self, graph: LDict, is_root: bool) -> bool:
        structured = graph.get("STRUCTURED_OUTPUT", False)
        if not isinstance(structured, bool):
            self.diags.error("E0713", "STRUCTURED_OUTPUT must be true or false", graph.value_span("STRUCTURED_OUTPUT"))
            structured = False
        if is_root and self.options.structured is not None:
            structured = self.options.structured
        return structured

    def _names(self, graph: LDict, key: str) -> list[str] | None:
        if key not in graph or graph[key] is None:
            return None
        value = graph[key]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            self.diags.error("E0714", f"{key} must be a name or a list of names", graph.value_span(key))
            return []
        out: list[str] = []
        for i, item in enumerate(items):
            where = items.item_span(i) if isinstance(items, LList) else graph.value_span(key)
            if not is_name(item):
                self.diags.error("E0715", f"{key} entry `{item}` is not a valid Python identifier", where)
            elif item in out:
                self.diags.error("E0716", f"`{item}` appears twice in {key}", where)
            else:
                out.append(item)
        return out

    def _shapes(self, graph: LDict, inputs: list[str]) -> dict[str, Any] | None:
        raw = graph.get("INPUT_SHAPES")
        shapes: dict[str, Any] = {}
        if raw is not None:
            if not isinstance(raw, dict):
                self.diags.error(
                    "E0717", "INPUT_SHAPES must map input names to shapes", graph.value_span("INPUT_SHAPES")
                )
                raw = {}
            for name, shape in raw.items():
                where = raw.key_span(name) if isinstance(raw, LDict) else graph.value_span("INPUT_SHAPES")
                shapes[name] = self._shape(name, shape, where, inputs)
        for name, shape in (self.options.input_shapes or {}).items():
            shapes[name] = self._shape(name, shape, graph.span, inputs)
        return shapes or None

    def _shape(self, name: Any, shape: Any, where: Span, inputs: list[str]) -> Any:
        if name not in inputs:
            self.diags.error(
                "E0718",
                f"INPUT_SHAPES names `{name}`, which is not an input",
                where,
                did_you_mean(str(name), inputs) or f"inputs: {', '.join(inputs)}",
            )
        dtype = "float32"
        if isinstance(shape, dict):
            dtype = shape.get("dtype", "float32")
            shape = shape.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
        ):
            self.diags.error(
                "E0719", f"shape of `{name}` must be a list of positive integers (without the batch dimension)", where
            )
            return {"shape": [], "dtype": "float32"}
        if dtype not in INPUT_DTYPES:
            self.diags.error(
                "E0719", f"dtype `{dtype}` of `{name}` is not supported", where, f"use one of {', '.join(INPUT_DTYPES)}"
            )
        return {"shape": list(shape), "dtype": dtype}

    def _imports(self, graph: LDict) -> dict[str, str]:
        raw = graph.get("IMPORTS")
        out: dict[str, str] = {}
        if raw is None:
            return out
        span = graph.value_span("IMPORTS")
        entries: list[tuple[str, str | None, Span]] = []
        if isinstance(raw, dict):
            for module, names in raw.items():
                where = raw.key_span(module) if isinstance(raw, LDict) else span
                if names is None or names == []:
                    entries.append((str(module), None, where))
                    continue
                for name in names if isinstance(names, list) else [names]:
                    entries.append((str(module), str(name), where))
        elif isinstance(raw, list):
            for i, module in enumerate(raw):
                entries.append((str(module), None, raw.item_span(i) if isinstance(raw, LList) else span))
        else:
            self.diags.error("E0720", "IMPORTS must be a mapping {module: [names]} or a list of modules", span)
            return out
        for module, name, where in entries:
            address = f"{module}.{name}" if name else module
            try:
                address = check_address(address, self.options.allow)
                resolve(address, self.options.allow, namespace=True)
            except AddressError as exc:
                self.diags.error(exc.code, exc.message, where, exc.hint)
                continue
            local = name if name else module.split(".")[0]
            out[local] = address if name else module.split(".")[0]
        return out
