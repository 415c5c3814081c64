"""Lowering FLOW steps: the four step forms, their inputs and outputs, user-layer call checks."""

from __future__ import annotations

from typing import Any

import scmc.expr as X
from scmc.diagnostics import CompileError, Span, did_you_mean
from scmc.ir import Arg, ChildInst, Const, ExprArg, Index, Instance, ListArg, Node, Var
from scmc.load import LDict, LList
from scmc.lower.common import MAX_CONSTANT_DEPTH, GraphContext, LowererBase, _meta_device, error_at
from scmc.lower.grammar import StepForm, check_layer_name, defined_name, nesting_depth, step_form, step_outputs
from scmc.names import is_name


def _check_user_call(inst: Instance, args: list, kwargs: list, span: Span) -> None:
    """A user layer's forward takes exactly its INPUTS: the step must give each one once."""
    inputs = list(inst.inputs)
    given = inputs[: len(args)] + [k for k, _ in kwargs]
    unknown = [k for k, _ in kwargs if k not in inputs]
    twice = [k for k, _ in kwargs if k in inputs[: len(args)]]
    missing = [n for n in inputs if n not in given]
    problem = ""
    if len(args) > len(inputs):
        problem = f"this step passes {len(args)} positional input{'s' if len(args) != 1 else ''}"
    elif unknown:
        problem = f"it has no input `{unknown[0]}`"
    elif twice:
        problem = f"`{twice[0]}` is given twice"
    elif missing:
        problem = f"this step does not give {', '.join(f'`{m}`' for m in missing)}"
    if problem:
        takes = ", ".join(inputs) or "nothing"
        raise error_at(
            "E0738",
            f"user layer `{inst.template}` takes {takes}, but {problem}",
            span,
            "declare the user layer's INPUTS, or pass one value per input",
        )


class StepLowering(LowererBase):
    """FLOW steps -> Nodes: the step forms, their inputs (flow names, `eval:`, `constant:`) and outputs.

    A part of :class:`~scmc.lower.lowerer.Lowerer`.
    """

    def _flow(self, graph: LDict, key: str, ctx: GraphContext) -> list[Node]:
        steps = graph[key]
        if not isinstance(steps, list):
            self.diags.error("E0721", f"{key} must be a list of steps", graph.value_span(key))
            return []
        nodes: list[Node] = []
        for index, step in enumerate(steps):
            span = steps.item_span(index) if isinstance(steps, LList) else graph.value_span(key)
            try:
                node = self._step(step, span, ctx)
            except CompileError as exc:
                self.diags.extend(exc.diagnostics)
                if any(d.code == "E0707" for d in exc.diagnostics):  # too many layers: stop here
                    raise CompileError(list(self.diags)) from None
                meant = defined_name(step)
                if meant is not None and meant not in ctx.layers:
                    ctx.layers[meant] = None  # broken: later uses report nothing more
                continue
            if node is not None:
                nodes.append(node)
        return nodes

    def _step(self, step: Any, span: Span, ctx: GraphContext) -> Node | None:
        form = step_form(step, span, self.diags)
        if form.name is not None:
            check_layer_name(form.name, span)
        if form.layer is None:
            child = self._reused_layer(form.name, span, ctx) if form.name is not None else None
        else:
            child = self._new_layer(form, span, ctx)
        if not form.has_io:
            return None
        return self._step_node(form, child, span, ctx)

    def _reused_layer(self, name: str, span: Span, ctx: GraphContext) -> ChildInst:
        """``[in, out, name]``: the layer an earlier step defined."""
        if name in ctx.layers and ctx.layers[name] is None:
            raise CompileError([])  # its definition failed and was reported
        child = ctx.layers.get(name)
        if child is None:
            raise error_at(
                "E0729",
                f"layer `{name}` is not defined by an earlier step",
                span,
                did_you_mean(name, ctx.layers) or "define it first with [in, out, name, LAYER]",
            )
        return child

    def _new_layer(self, form: StepForm, span: Span, ctx: GraphContext) -> ChildInst:
        """A step with a LAYER: lowered, counted against --max-instances, and named if the step names it."""
        name = form.name
        if name is not None and ctx.layers.get(name) is not None:
            raise error_at(
                "E0730",
                f"layer name `{name}` is defined twice",
                span,
                f"reuse it with [in, out, {name}] or give the new layer another name",
            )
        self.layers += 1
        if self.layers > self.options.max_instances:
            raise error_at(
                "E0707",
                f"more than {self.options.max_instances} layers",
                span,
                "a Jinja loop or a recursive template is generating too many layers",
            )
        child = self._layer(form.layer, span, ctx, name)
        ctx.children.append(child)
        if name is not None:
            ctx.layers[name] = child
        return child

    def _step_node(self, form: StepForm, child: ChildInst | None, span: Span, ctx: GraphContext) -> Node:
        args, kwargs = self._inputs(form.inputs, span, ctx.imports)
        out = step_outputs(form.outputs, span)
        if child is None:
            if kwargs or len(args) != 1:
                raise error_at(
                    "E0731",
                    "an assignment step [in, out] takes exactly one input",
                    span,
                    "to bind a Python list, nest it: [[[a, b]], out]; to call a layer, add it as a third element",
                )
        elif child.kind == "user" and child.instance is not None:
            _check_user_call(child.instance, args, kwargs, span)
        return Node(str(id(child)) if child is not None else None, tuple(args), tuple(kwargs), out, span)

    def _inputs(self, raw: Any, span: Span, imports: dict[str, str]) -> tuple[list[Arg], list[tuple[str, Arg]]]:
        if isinstance(raw, dict):
            kwargs = []
            for k, v in raw.items():
                if not is_name(k):
                    raise error_at("E0732", f"keyword `{k}` is not a valid Python identifier", span)
                kwargs.append((k, self._arg(v, span, imports)))
            return [], kwargs
        if isinstance(raw, list):
            return [self._arg(v, span, imports) for v in raw], []
        return [self._arg(raw, span, imports)], []

    def _arg(self, raw: Any, span: Span, imports: dict[str, str]) -> Arg:
        if isinstance(raw, list):
            return ListArg(tuple(self._arg(v, span, imports) for v in raw))
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("eval:"):
                expr = self._expr(text[5:], span, imports, flow=True)
                try:
                    with _meta_device():  # a constant part may call an allow-listed factory: no memory
                        X.check_constant_parts(expr, self.options.allow)
                except X.ExprError as exc:
                    raise error_at(exc.code, f"eval: {exc.message}", span, exc.hint) from None
                return ExprArg(expr)
            if text.startswith("constant:"):
                from scmc.load import _parse_value

                try:
                    value = _parse_value(text[9:], text)
                except RecursionError:
                    value = None
                    depth = MAX_CONSTANT_DEPTH + 1
                except CompileError as exc:
                    if not any("nests more than" in d.message for d in exc.diagnostics):  # the YAML nesting limit
                        raise error_at(
                            "E0736",
                            f"`{text}`: the value after `constant:` is not valid YAML",
                            span,
                            "e.g. `constant: 0.5` or `constant: [1, 2]`",
                        ) from None
                    value = None
                    depth = MAX_CONSTANT_DEPTH + 1
                else:
                    depth = nesting_depth(value)
                if depth > MAX_CONSTANT_DEPTH:
                    raise error_at(
                        "E0736",
                        f"the value after `constant:` nests more than {MAX_CONSTANT_DEPTH} levels deep",
                        span,
                        "flatten it, or build it in a layer",
                    )
                return Const(value)
            parts = text.split(".")
            if not is_name(parts[0]):
                raise error_at(
                    "E0733",
                    f"`{raw}` is not a flow name",
                    span,
                    "names are Python identifiers; use `eval: ...` for expressions or `constant: ...` for literals",
                )
            arg: Arg = Var(parts[0])
            for part in parts[1:]:
                if part.isdigit() or (part.startswith("-") and part[1:].isdigit()):
                    arg = Index(arg, int(part))
                elif is_name(part):
                    arg = Index(arg, part)
                else:
                    raise error_at("E0733", f"`{raw}`: `{part}` is not an index or key", span)
            return arg
        if raw is None or isinstance(raw, (bool, int, float)):
            return Const(raw)
        if isinstance(raw, dict):
            raise error_at("E0734", "a mapping is only allowed as the whole input (keyword arguments)", span)
        raise error_at("E0734", f"unsupported input `{raw}`", span)

    def _expr(self, text: str, span: Span, imports: dict[str, str], flow: bool) -> X.Expr:
        ctx = X.Context(self.options.allow, imports, X.ANY_NAME if flow else None)
        try:
            return X.parse(text, ctx)
        except X.ExprError as exc:
            raise error_at(exc.code, f"eval: {exc.message}", span, exc.hint) from None
