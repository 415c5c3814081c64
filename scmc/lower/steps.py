"""Lowering FLOW steps: the four step forms, their inputs and outputs, user-layer call checks."""

from __future__ import annotations

from typing import Any

import scmc.expr as X
from scmc.diagnostics import CompileError, Span, did_you_mean
from scmc.ir import Arg, ChildInst, Const, ExprArg, Index, Instance, ListArg, Node, Out, OutDict, OutName, OutTuple, Var
from scmc.load import LDict, LList, Parameters
from scmc.lower.common import MAX_CONSTANT_DEPTH, MODULE_ATTRS, STEP_KEYS, Scope, _diag, _meta_device
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
        raise CompileError(
            [
                _diag(
                    "E0738",
                    f"user layer `{inst.template}` takes {takes}, but {problem}",
                    span,
                    "declare the user layer's INPUTS, or pass one value per input",
                )
            ]
        )


def _depth(value: Any) -> int:
    """Nesting of a plain value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _defined_name(step: Any) -> str | None:
    """The layer name a (possibly broken) step meant to define, if it says so plainly."""
    if isinstance(step, list) and len(step) in (3, 4) and is_name(step[2]):
        return step[2]
    if isinstance(step, dict) and is_name(step.get("NAME")):
        return step["NAME"]
    return None


class StepLowering:
    """FLOW steps -> Nodes: the step forms, their inputs (flow names, `eval:`, `constant:`) and outputs.

    A part of :class:`~scmc.lower.lowerer.Lowerer`.
    """

    def _flow(
        self,
        graph: LDict,
        key: str,
        scope: Scope,
        params: Parameters,
        imports: dict[str, str],
        children: list[ChildInst],
        layers: dict[str, ChildInst],
    ) -> list[Node]:
        steps = graph[key]
        if not isinstance(steps, list):
            self.diags.error("E0721", f"{key} must be a list of steps", graph.value_span(key))
            return []
        nodes: list[Node] = []
        for index, step in enumerate(steps):
            span = steps.item_span(index) if isinstance(steps, LList) else graph.value_span(key)
            try:
                node = self._step(step, span, scope, params, imports, children, layers)
            except CompileError as exc:
                self.diags.extend(exc.diagnostics)
                if any(d.code == "E0707" for d in exc.diagnostics):  # too many layers: stop here
                    raise CompileError(list(self.diags)) from None
                meant = _defined_name(step)
                if meant is not None and meant not in layers:
                    layers[meant] = None  # type: ignore[assignment]  # broken: later uses report nothing more
                continue
            if node is not None:
                nodes.append(node)
        return nodes

    def _step(
        self,
        step: Any,
        span: Span,
        scope: Scope,
        params: Parameters,
        imports: dict[str, str],
        children: list[ChildInst],
        layers: dict[str, ChildInst],
    ) -> Node | None:
        inputs: Any = None
        outputs: Any = None
        name: Any = None
        layer: Any = None
        has_io = True
        if isinstance(step, list):
            n = len(step)
            if n == 2:
                inputs, outputs = step
            elif n == 3:
                inputs, outputs, third = step
                if isinstance(third, str):
                    name = third
                else:
                    layer = third
            elif n == 4:
                inputs, outputs, name, layer = step
            else:
                raise CompileError(
                    [
                        _diag(
                            "E0722",
                            f"a FLOW step has 2 to 4 elements; this one has {n}",
                            span,
                            "[in, out], [in, out, name], [in, out, LAYER] or [in, out, name, LAYER]",
                        )
                    ]
                )
        elif isinstance(step, dict):
            for k in step:
                if k not in STEP_KEYS:
                    self.diags.error(
                        "E0723",
                        f"unknown key `{k}` in a FLOW step",
                        step.key_span(k) if isinstance(step, LDict) else span,
                        did_you_mean(str(k), STEP_KEYS) or "a step mapping has INPUTS, OUTPUTS, NAME and LAYER",
                    )
            if ("INPUTS" in step) != ("OUTPUTS" in step):
                missing = "OUTPUTS" if "INPUTS" in step else "INPUTS"
                raise CompileError(
                    [
                        _diag(
                            "E0724",
                            f"this step has {'INPUTS' if missing == 'OUTPUTS' else 'OUTPUTS'} but no {missing}; "
                            "INPUTS and OUTPUTS come together or not at all",
                            span,
                            f"add {missing}, or drop both to only define the layer",
                        )
                    ]
                )
            has_io = "INPUTS" in step
            inputs, outputs = step.get("INPUTS"), step.get("OUTPUTS")
            name, layer = step.get("NAME"), step.get("LAYER")
            if not has_io and layer is None:
                raise CompileError([_diag("E0725", "a step without INPUTS/OUTPUTS must define a LAYER", span)])
        else:
            raise CompileError(
                [_diag("E0726", f"a FLOW step must be a list or a mapping, not {type(step).__name__}", span)]
            )

        child: ChildInst | None = None
        if name is not None and not is_name(name):
            raise CompileError(
                [
                    _diag(
                        "E0727",
                        f"layer name `{name}` is not a valid Python identifier",
                        span,
                        "names become attributes of the generated class: use letters, digits and _",
                    )
                ]
            )
        if name is not None and name.startswith("__"):
            raise CompileError(
                [
                    _diag(
                        "E0728",
                        f"layer name `{name}` is reserved: names starting with `__` are special in a Python class",
                        span,
                        f"rename it, e.g. `{name.strip('_') or 'layer'}`",
                    )
                ]
            )
        if name is not None and name in MODULE_ATTRS:
            raise CompileError(
                [
                    _diag(
                        "E0728",
                        f"layer name `{name}` would shadow torch.nn.Module.{name}",
                        span,
                        f"rename it, e.g. `{name}_layer`",
                    )
                ]
            )
        if layer is None:
            if name is not None:
                if name in layers and layers[name] is None:
                    raise CompileError([])  # its definition failed and was reported
                if name not in layers:
                    raise CompileError(
                        [
                            _diag(
                                "E0729",
                                f"layer `{name}` is not defined by an earlier step",
                                span,
                                did_you_mean(name, layers) or "define it first with [in, out, name, LAYER]",
                            )
                        ]
                    )
                child = layers[name]
        else:
            if name is not None and layers.get(name) is not None:
                raise CompileError(
                    [
                        _diag(
                            "E0730",
                            f"layer name `{name}` is defined twice",
                            span,
                            f"reuse it with [in, out, {name}] or give the new layer another name",
                        )
                    ]
                )
            self.layers += 1
            if self.layers > self.options.max_instances:
                raise CompileError(
                    [
                        _diag(
                            "E0707",
                            f"more than {self.options.max_instances} layers",
                            span,
                            "a Jinja loop or a recursive template is generating too many layers",
                        )
                    ]
                )
            child = self._layer(layer, span, scope, params, name)
            children.append(child)
            if name is not None:
                layers[name] = child
        if not has_io:
            return None
        args, kwargs = self._inputs(
            inputs, span, imports, layer_is_function=child is not None and child.kind == "function"
        )
        out = self._outputs(outputs, span)
        if child is None:
            if kwargs or len(args) != 1:
                raise CompileError(
                    [
                        _diag(
                            "E0731",
                            "an assignment step [in, out] takes exactly one input",
                            span,
                            "to bind a Python list, nest it: [[[a, b]], out]; to call a layer, add it as a third element",
                        )
                    ]
                )
        elif child.kind == "user" and child.instance is not None:
            _check_user_call(child.instance, args, kwargs, span)
        return Node(str(id(child)) if child is not None else None, tuple(args), tuple(kwargs), out, span)

    def _inputs(
        self, raw: Any, span: Span, imports: dict[str, str], layer_is_function: bool
    ) -> tuple[list[Arg], list[tuple[str, Arg]]]:
        if isinstance(raw, dict):
            kwargs = []
            for k, v in raw.items():
                if not is_name(k):
                    raise CompileError([_diag("E0732", f"keyword `{k}` is not a valid Python identifier", span)])
                kwargs.append((k, self._arg(v, span, imports, top=True)))
            return [], kwargs
        if isinstance(raw, list):
            return [self._arg(v, span, imports, top=True) for v in raw], []
        return [self._arg(raw, span, imports, top=True)], []

    def _arg(self, raw: Any, span: Span, imports: dict[str, str], top: bool = False) -> Arg:
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
                    raise CompileError([_diag(exc.code, f"eval: {exc.message}", span, exc.hint)]) from None
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
                        raise CompileError(
                            [
                                _diag(
                                    "E0736",
                                    f"`{text}`: the value after `constant:` is not valid YAML",
                                    span,
                                    "e.g. `constant: 0.5` or `constant: [1, 2]`",
                                )
                            ]
                        ) from None
                    value = None
                    depth = MAX_CONSTANT_DEPTH + 1
                else:
                    depth = _depth(value)
                if depth > MAX_CONSTANT_DEPTH:
                    raise CompileError(
                        [
                            _diag(
                                "E0736",
                                f"the value after `constant:` nests more than {MAX_CONSTANT_DEPTH} levels deep",
                                span,
                                "flatten it, or build it in a layer",
                            )
                        ]
                    )
                return Const(value)
            parts = text.split(".")
            if not is_name(parts[0]):
                raise CompileError(
                    [
                        _diag(
                            "E0733",
                            f"`{raw}` is not a flow name",
                            span,
                            "names are Python identifiers; use `eval: ...` for expressions or `constant: ...` for literals",
                        )
                    ]
                )
            arg: Arg = Var(parts[0])
            for part in parts[1:]:
                if part.isdigit() or (part.startswith("-") and part[1:].isdigit()):
                    arg = Index(arg, int(part))
                elif is_name(part):
                    arg = Index(arg, part)
                else:
                    raise CompileError([_diag("E0733", f"`{raw}`: `{part}` is not an index or key", span)])
            return arg
        if raw is None or isinstance(raw, (bool, int, float)):
            return Const(raw)
        if isinstance(raw, dict):
            raise CompileError(
                [_diag("E0734", "a mapping is only allowed as the whole input (keyword arguments)", span)]
            )
        raise CompileError([_diag("E0734", f"unsupported input `{raw}`", span)])

    def _outputs(self, raw: Any, span: Span) -> Out:
        if isinstance(raw, str):
            if not is_name(raw):
                raise CompileError([_diag("E0735", f"output name `{raw}` is not a valid Python identifier", span)])
            return OutName(raw)
        if isinstance(raw, list):
            if not raw:
                raise CompileError([_diag("E0735", "an output list must name at least one value", span)])
            return OutTuple(tuple(self._outputs(v, span) for v in raw))
        if isinstance(raw, dict):
            pairs = []
            for k, v in raw.items():
                if not is_name(k):
                    raise CompileError([_diag("E0735", f"output name `{k}` is not a valid Python identifier", span)])
                if not isinstance(v, (str, int)) or isinstance(v, bool):
                    raise CompileError(
                        [_diag("E0735", f"output `{k}` must name a key (string or integer) of the result", span)]
                    )
                pairs.append((k, v))
            return OutDict(tuple(pairs))
        raise CompileError([_diag("E0735", f"unsupported output `{raw}`", span)])

    def _expr(self, text: str, span: Span, imports: dict[str, str], flow: bool) -> X.Expr:
        ctx = X.Context(self.options.allow, imports, X.ANY_NAME if flow else None)
        try:
            return X.parse(text, ctx)
        except X.ExprError as exc:
            raise CompileError([_diag(exc.code, f"eval: {exc.message}", span, exc.hint)]) from None
