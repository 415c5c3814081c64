"""Lowering: rendered layer-graph templates -> an :class:`~scmc.ir.Instance` tree.

This is also where the layer-graph language is validated (design.md calls this the
``schema`` stage; the step grammar is positional, so it is checked here by hand with a
diagnostic per mistake rather than through pydantic). Each use of a user layer is rendered
with its own parameters (the parent's, merged with the step's ``PARAM``; the user layer's
own ``PARAMETERS`` are defaults) and lowered to one ``Instance``.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import scmc.expr as X
from scmc.addresses import AddressError, AllowList, check_address, resolve
from scmc.diagnostics import CompileError, Diagnostics, Span, did_you_mean
from scmc.ir import (
    INPUT_DTYPES,
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
    OutDict,
    OutName,
    OutTuple,
    Ref,
    Var,
    node_reads,
    out_names,
)
from scmc.load import (
    JINJA_KEYS,
    LAYER_GRAPH_KEYS,
    LDict,
    LList,
    Parameters,
    Source,
    expand,
    plain,
    read_template,
)
from scmc.names import is_name, to_snake

STEP_KEYS = ("INPUTS", "OUTPUTS", "NAME", "LAYER")
PACKAGE_KEY = "PACKAGE"  # scmc: default loss/metric/backward/data presets of a model template
USER_LAYER_KEYS = ("TYPE", "CFG", "PARAM")
PATTERN_KEYS = ("_addr_", "_file_", "_attr_", "_bind_", "_call_")
MAX_CONSTANT_DEPTH = 64  # nesting of a `constant:` value (later stages walk it recursively)

# Attribute names a layer may not take: they would shadow torch.nn.Module's own.
MODULE_ATTRS = frozenset(n for n in dir(__import__("torch").nn.Module) if not n.startswith("__")) | {"training"}


def to_pascal(name: str) -> str:
    parts = re.split(r"[^0-9A-Za-z]+", name)
    out = "".join(p[:1].upper() + p[1:] for p in parts if p)
    if not out or not out[0].isalpha():
        out = "Layer" + out
    return out


@dataclass
class Scope:
    """Where a layer graph was written: its file and the user layers it can see."""

    source: Source
    layers: dict[str, tuple[LDict, "Scope | None"]]  # key -> (definition, scope it was defined in)
    chain: tuple[str, ...] = ()  # user layers being built, for cycle detection


@dataclass
class Options:
    allow: AllowList = field(default_factory=AllowList)
    input_shapes: dict[str, Any] | None = None  # -s overrides
    structured: bool | None = None  # --no-structured-output
    max_instances: int = 10_000  # user-layer instances, and layers, per build part
    cfg_dirs: tuple[Path, ...] = ()  # --allow-cfg-dir: folders CFG may read besides the template's own


class Lowerer:
    def __init__(self, options: Options, diags: Diagnostics):
        self.options = options
        self.diags = diags
        self.instances = 0
        self.layers = 0
        self.templates: dict[Path, Source] = {}  # CFG-included templates, by resolved path
        self.cfg_roots: tuple[Path, ...] = ()  # where CFG may read: the root template's folder + --allow-cfg-dir
        self.function_cache: dict[str, Any] = {}
        self.files: dict[str, Path] = {}  # `_file_` modules: stem -> path
        self.current_source: Source | None = None
        self.imports: dict[str, str] = {}  # IMPORTS of the graph being lowered (for `eval:` in layer arguments)

    # ------------------------------------------------------------------ entry points

    def lower_root(self, source: Source, params: Parameters, classname: str, sublayer: str | None = None) -> Instance:
        self.cfg_roots = cfg_roots(source, self.options.cfg_dirs)
        scope = Scope(source, {k: (v, None) for k, v in user_layer_defs(source.data, self.diags, source).items()})
        for key in scope.layers:
            scope.layers[key] = (scope.layers[key][0], scope)
        if sublayer:
            parts = sublayer.split(".")
            definition, def_scope = self._find_layer(parts, scope, source.data.span)
            # the sublayer is the root of this build: INPUT_SHAPES, --shape and --no-structured-output apply to it
            return self._lower_user(
                definition, def_scope, params, classname, ".".join(parts), source.data.span, is_root=True
            )
        root = LDict(
            {k: v for k, v in source.data.items() if k in LAYER_GRAPH_KEYS or k in JINJA_KEYS}, span=source.data.span
        )
        root.key_spans = dict(source.data.key_spans)
        root.value_spans = dict(source.data.value_spans)
        return self._lower_graph(root, scope, params, template=source.display, class_hint=classname, is_root=True)

    # ------------------------------------------------------------------ user layers

    def _find_layer(self, parts: list[str], scope: Scope, span: Span) -> tuple[LDict, Scope]:
        first, rest = parts[0], parts[1:]
        if first not in scope.layers:
            raise CompileError([self._unknown_type(first, scope, span)])
        definition, def_scope = scope.layers[first]
        def_scope = def_scope or scope
        if not rest:
            return definition, def_scope
        inner = Scope(def_scope.source, dict(def_scope.layers), def_scope.chain)
        for key, value in user_layer_defs(definition, self.diags, def_scope.source).items():
            inner.layers[key] = (value, inner)
        return self._find_layer(rest, inner, span)

    def _unknown_type(self, name: str, scope: Scope, span: Span):
        from scmc.diagnostics import Diagnostic

        hint = did_you_mean(name, scope.layers) or (
            f"user layers of this file: {', '.join(sorted(scope.layers))}"
            if scope.layers
            else "this file defines no user layers"
        )
        return Diagnostic("E0700", f"unknown user layer TYPE `{name}`", span, hint)

    def _lower_user(
        self,
        definition: LDict,
        scope: Scope,
        params: Parameters,
        class_hint: str,
        key: str,
        span: Span,
        passed: dict[str, Any] | None = None,
        is_root: bool = False,
    ) -> Instance:
        if key in scope.chain:
            cycle = " -> ".join((*scope.chain[scope.chain.index(key) :], key))
            raise CompileError(
                [
                    __import__("scmc.diagnostics", fromlist=["Diagnostic"]).Diagnostic(
                        "E0701", f"user layer TYPE cycle: {cycle}", span, "a user layer cannot contain itself"
                    )
                ]
            )
        own = Parameters.from_raw(
            definition.get("PARAMETERS"),
            definition.key_span("PARAMETERS") if "PARAMETERS" in definition else definition.span,
            self.diags,
        )
        merged = own.merge(params)
        inner = Scope(scope.source, dict(scope.layers), (*scope.chain, key))
        for name, value in user_layer_defs(definition, self.diags, scope.source).items():
            inner.layers[name] = (value, inner)
        graph = LDict(
            {k: v for k, v in definition.items() if k in LAYER_GRAPH_KEYS or k in JINJA_KEYS}, span=definition.span
        )
        graph.key_spans = dict(definition.key_spans)
        graph.value_spans = dict(definition.value_spans)
        inst = self._lower_graph(
            graph, inner, merged, template=key, class_hint=class_hint, is_root=is_root, use_span=span
        )
        inst.params = dict(passed or {})
        return inst

    def _user_child(self, spec: LDict, scope: Scope, params: Parameters, span: Span) -> Instance:
        for k in spec:
            if k not in USER_LAYER_KEYS:
                self.diags.error(
                    "E0702",
                    f"unknown key `{k}` in a user layer",
                    spec.key_span(k),
                    did_you_mean(str(k), USER_LAYER_KEYS) or "a user layer has TYPE, CFG and PARAM",
                )
        type_name = spec.get("TYPE")
        cfg = spec.get("CFG")
        param_raw = spec.get("PARAM")
        passed = Parameters.from_raw(param_raw, spec.key_span("PARAM") if "PARAM" in spec else span, self.diags)
        merged = params.merge(passed)
        passed_default = dict(plain(param_raw).get("DEFAULT") or {}) if isinstance(param_raw, dict) else {}
        if type_name is not None and not isinstance(type_name, str):
            raise CompileError([_diag("E0703", "TYPE must be a string naming a user layer", spec.value_span("TYPE"))])
        if cfg is not None:
            if not isinstance(cfg, str):
                raise CompileError([_diag("E0704", "CFG must be a path to a template file", spec.value_span("CFG"))])
            path = self._resolve_cfg(cfg, scope.source, spec.value_span("CFG"))
            other = self._read(path)
            other_scope = Scope(other, {}, scope.chain)
            for name, value in user_layer_defs(other.data, self.diags, other).items():
                other_scope.layers[name] = (value, other_scope)
            own = Parameters.from_raw(other.data.get("PARAMETERS"), other.data.span, self.diags)
            hint = to_pascal(Path(cfg).stem)
            if type_name:
                parts = type_name.split(".")
                definition, def_scope = self._find_layer(parts, other_scope, spec.value_span("TYPE"))
                def_scope = Scope(def_scope.source, def_scope.layers, scope.chain)
                return self._lower_user(
                    definition,
                    def_scope,
                    own.merge(merged),
                    hint + to_pascal(parts[-1]),
                    f"{other.display}:{type_name}",
                    span,
                    passed_default,
                )
            key = f"{other.display}"
            if key in scope.chain:
                raise CompileError(
                    [_diag("E0701", f"CFG cycle: {' -> '.join((*scope.chain, key))}", spec.value_span("CFG"))]
                )
            root = LDict(
                {k: v for k, v in other.data.items() if k in LAYER_GRAPH_KEYS or k in JINJA_KEYS}, span=other.data.span
            )
            root.key_spans = dict(other.data.key_spans)
            root.value_spans = dict(other.data.value_spans)
            other_scope.chain = (*scope.chain, key)
            inst = self._lower_graph(
                root, other_scope, own.merge(merged), template=key, class_hint=hint, is_root=False, use_span=span
            )
            inst.params = passed_default
            return inst
        if not type_name:
            raise CompileError(
                [
                    _diag(
                        "E0705", "a user layer needs TYPE (or CFG)", span, "write {TYPE: Name, PARAM: {DEFAULT: {...}}}"
                    )
                ]
            )
        parts = type_name.split(".")
        if not all(parts):
            raise CompileError([_diag("E0703", f"TYPE `{type_name}` is not a name", spec.value_span("TYPE"))])
        definition, def_scope = self._find_layer(parts, scope, spec.value_span("TYPE"))
        def_scope = Scope(def_scope.source, def_scope.layers, scope.chain)  # the caller's chain, to catch cycles
        return self._lower_user(
            definition, def_scope, merged, to_pascal(parts[-1]), type_name, spec.value_span("TYPE"), passed_default
        )

    def _resolve_cfg(self, cfg: str, source: Source, span: Span) -> Path:
        """The file a CFG names: next to the including template, else from the working directory,
        where that (after following symbolic links) lies inside the root template's folder or an
        --allow-cfg-dir folder. A candidate outside them is refused before anything reads it, so
        that a template cannot make the build read, and a diagnostic show, some other file."""
        from scmc import cache

        roots = self.cfg_roots or cfg_roots(source, self.options.cfg_dirs)
        inside = []  # the candidates inside the allowed folders (only those are looked at)
        for path in (source.directory / cfg, Path(cfg)):
            try:
                resolved = path.resolve()
                if not any(resolved.is_relative_to(root) for root in roots):
                    continue  # not even probed: whether it exists is none of the template's business
                inside.append(path)
                kind = "file" if resolved.is_file() else "other" if resolved.exists() else None
            except (OSError, ValueError) as exc:  # a NUL character, a name too long for the system
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise CompileError(
                    [_diag("E0792", f"CFG is not a usable file path ({why})", span, "CFG names a template file")]
                ) from None
            if kind == "file":
                return resolved
            if kind == "other":
                raise CompileError(
                    [
                        _diag(
                            "E0791",
                            f"CFG `{cfg}` is not a regular file",
                            span,
                            "CFG names a template file (a .yaml file next to this template)",
                        )
                    ]
                )
            cache.note_absent(path)  # a file created here later changes which one is read
        if not inside:
            raise CompileError(
                [
                    _diag(
                        "E0790",
                        f"CFG `{cfg}` is outside {folder_words(roots[0])}; it was not read",
                        span,
                        "CFG reads templates from the folder of the template given on the command line and its "
                        "subfolders; move the file there, or pass --allow-cfg-dir DIR to allow another folder",
                    )
                ]
            )
        where = f"looked next to {source.display} and in the working directory"
        if inside == [source.directory / cfg] and source.directory.resolve() != Path.cwd().resolve():
            where = (
                f"looked next to {source.display}, not in the working directory (outside "
                f"{folder_words(roots[0])}; --allow-cfg-dir . lets CFG look there)"
            )
        raise CompileError([_diag("E0706", f"CFG file `{cfg}` not found", span, where)])

    def _read(self, path: Path) -> Source:
        key = path.resolve()
        if key not in self.templates:
            self.templates[key] = read_template(path)
        return self.templates[key]

    # ------------------------------------------------------------------ graphs

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
        previous, self.current_source = self.current_source, scope.source
        try:
            return self._lower_graph_in(raw, scope, params, template, class_hint, is_root, use_span)
        finally:
            self.current_source = previous

    def _lower_graph_in(
        self,
        raw: LDict,
        scope: Scope,
        params: Parameters,
        template: str,
        class_hint: str,
        is_root: bool,
        use_span: Span | None = None,
    ) -> Instance:
        self.instances += 1
        if self.instances > self.options.max_instances:
            raise CompileError(
                [
                    _diag(
                        "E0707",
                        f"more than {self.options.max_instances} layer instances",
                        raw.span,
                        "a Jinja loop or a recursive template is generating too many layers",
                    )
                ]
            )
        graph = expand(raw, params)
        if not isinstance(graph, LDict):
            raise CompileError([_diag("E0708", "a layer graph must render to a mapping", raw.span)])
        span = graph.span
        for key in graph:
            if key not in LAYER_GRAPH_KEYS:
                self.diags.error(
                    "E0709",
                    f"unknown key `{key}` in a layer graph",
                    graph.key_span(key),
                    did_you_mean(str(key), LAYER_GRAPH_KEYS) or "user layers are defined at the top level of a file",
                )
        if "FLOW" not in graph:
            self.diags.error("E0710", f"layer graph `{template}` has no FLOW", use_span or span, "add FLOW: [steps...]")
            raise CompileError(list(self.diags))
        errors_before = len(self.diags)
        imports = self._imports(graph)
        children: list[ChildInst] = []
        layer_kinds: dict[str, ChildInst] = {}
        outer_imports, self.imports = self.imports, imports
        try:
            flow = self._flow(graph, "FLOW", scope, params, imports, children, layer_kinds)
            inference = (
                self._flow(graph, "INFERENCE_FLOW", scope, params, imports, children, layer_kinds)
                if "INFERENCE_FLOW" in graph and graph["INFERENCE_FLOW"] is not None
                else None
            )
        finally:
            self.imports = outer_imports
        if len(self.diags) > errors_before:
            # a broken step makes the data-flow checks below report follow-on errors
            raise CompileError(list(self.diags))
        self._auto_name(children)
        # map provisional layer references to final attribute names
        flow = [_relabel(n, children) for n in flow]
        inference = [_relabel(n, children) for n in inference] if inference is not None else None

        inputs = self._names(graph, "INPUTS")
        outputs = self._names(graph, "OUTPUTS")
        written_any: list[str] = []
        if inputs is None:
            inputs = _first_reads(flow)
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
        if outputs is None:
            outputs = written_any
            if not outputs:
                self.diags.error(
                    "E0737",
                    f"layer graph `{template}` returns nothing: every step writes one of its inputs",
                    use_span or span,
                    "name the result of the last step, or declare OUTPUTS",
                )
        for label, nodes in (("FLOW", flow), ("INFERENCE_FLOW", inference)):
            if nodes is None:
                continue
            written = set(inputs) | {n for node in nodes for n in out_names(node.out)}
            for name in outputs:
                if name not in written:
                    where = graph.key_span("OUTPUTS") if "OUTPUTS" in graph else span
                    self.diags.error(
                        "E0712", f"output `{name}` is never written by {label}", where, did_you_mean(name, written)
                    )
        structured = graph.get("STRUCTURED_OUTPUT", False)
        if not isinstance(structured, bool):
            self.diags.error("E0713", "STRUCTURED_OUTPUT must be true or false", graph.value_span("STRUCTURED_OUTPUT"))
            structured = False
        if is_root and self.options.structured is not None:
            structured = self.options.structured
        shapes = self._shapes(graph, inputs) if is_root else None
        return Instance(
            template,
            class_hint,
            {},
            children,
            list(inputs),
            list(outputs),
            structured,
            flow,
            inference,
            use_span or span,
            shapes,
        )

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

    # ------------------------------------------------------------------ steps

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

    # ------------------------------------------------------------------ layers

    def _layer(self, raw: Any, span: Span, scope: Scope, params: Parameters, name: str | None) -> ChildInst:
        if isinstance(raw, dict) and any(k in raw for k in USER_LAYER_KEYS):
            inst = self._user_child(raw, scope, params, span)
            return ChildInst(name or "", "user", instance=inst, span=span, name_given=name is not None)
        if isinstance(raw, list) and raw and raw[0] == "_obj_":
            return self._pattern(raw, span, name)
        raise CompileError(
            [
                _diag(
                    "E0740",
                    "LAYER must be an `_obj_` pattern or a user layer {TYPE: ...}",
                    span,
                    "e.g. [_obj_, {_addr_: torch.nn.ReLU}, _call_]",
                )
            ]
        )

    def _pattern(self, raw: list, span: Span, name: str | None) -> ChildInst:
        address, obj, call, bind_args, bind_kwargs, call_args, call_kwargs = self._pattern_parts(raw, span)
        import torch

        is_class = inspect.isclass(obj)
        if is_class and call is None:
            raise CompileError(
                [
                    _diag(
                        "E0741",
                        f"`{address}` is a class but the pattern has no `_call_`",
                        span,
                        f"add `_call_` to construct it: [_obj_, {{_addr_: {address}}}, _call_]",
                    )
                ]
            )
        args = tuple(bind_args) + tuple(call_args)
        kwargs = {**bind_kwargs, **call_kwargs}
        if call is None:
            if not callable(obj):
                raise CompileError([_diag("E0742", f"`{address}` is not callable", span)])
            self._check_signature(obj, address, args, kwargs, span, partial=True)
            return ChildInst(
                name or "",
                "function",
                Ctor(address, args, tuple(kwargs.items())),
                span=span,
                name_given=name is not None,
            )
        if not is_class:
            raise CompileError(
                [
                    _diag(
                        "E0743",
                        f"`{address}` is a function; calling it at build time is not supported",
                        span,
                        "drop `_call_` to call it in forward, or name a layer class",
                    )
                ]
            )
        if not issubclass(obj, torch.nn.Module):
            raise CompileError(
                [
                    _diag(
                        "E0744",
                        f"`{address}` is not a torch.nn.Module",
                        span,
                        "layers must be modules; use a function without `_call_` for plain callables",
                    )
                ]
            )
        self._check_signature(obj, address, args, kwargs, span, partial=False)
        from torch.nn.modules.lazy import LazyModuleMixin

        lazy = issubclass(obj, LazyModuleMixin)
        if not lazy:
            self._check_constructs(obj, address, args, kwargs, span)
        return ChildInst(
            name or "",
            "module",
            Ctor(address, args, tuple(kwargs.items())),
            span=span,
            lazy=lazy,
            name_given=name is not None,
        )

    def _check_constructs(self, obj: Any, address: str, args: tuple, kwargs: dict, span: Span) -> None:
        """Build the layer once on the meta device: bad argument values are the user's error, at this step."""
        import warnings

        import torch

        from scmc.interp import build_value

        allow = self.options.allow
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                X.call_checked(
                    obj, [build_value(a, allow) for a in args], {k: build_value(v, allow) for k, v in kwargs.items()}
                )
        except (X.ExprError, AddressError) as exc:
            raise CompileError([_diag(exc.code, exc.message, span, exc.hint)]) from None
        except Exception as exc:
            detail = (str(exc).strip().splitlines() or [""])[0]
            hint = "check the values given in `_call_` and `_bind_`"
            try:
                annotations = {n: p.annotation for n, p in inspect.signature(obj).parameters.items()}
            except (TypeError, ValueError):
                annotations = {}
            for key, value in kwargs.items():
                if isinstance(value, float) and annotations.get(key) in (int, "int"):
                    hint = f"`{key}` must be an integer, not {value!r}"
                    if value.is_integer():
                        hint += " (in `eval:`, `//` divides to an integer)"
                    break
            raise CompileError(
                [_diag("E0753", f"constructing `{address}` failed: {type(exc).__name__}: {detail}", span, hint)]
            ) from None

    def _check_signature(self, obj: Any, address: str, args: tuple, kwargs: dict, span: Span, partial: bool) -> None:
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return
        var = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        params = [n for n, p in sig.parameters.items() if n != "self" and p.kind not in var]
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            unknown = [
                k for k in kwargs if k not in params or sig.parameters[k].kind == inspect.Parameter.POSITIONAL_ONLY
            ]
            if unknown:
                raise CompileError(
                    [
                        _diag(
                            "E0745",
                            f"`{address}` has no parameter `{unknown[0]}`",
                            span,
                            did_you_mean(unknown[0], params) or f"parameters: {', '.join(params)}",
                        )
                    ]
                )
        try:
            (sig.bind_partial if partial else sig.bind)(*args, **kwargs)
        except TypeError as exc:
            bad = re.search(r"'(\w+)'", str(exc))
            if bad and "missing" in str(exc):
                hint = f"give `{bad.group(1)}` in `_call_` (or `_bind_`)"
            else:
                hint = did_you_mean(bad.group(1), params) if bad else ""
            shown = ", ".join(
                n if p.default is inspect.Parameter.empty else f"{n}={p.default!r}"
                for n, p in sig.parameters.items()
                if n in params
            )
            raise CompileError(
                [
                    _diag(
                        "E0745",
                        f"arguments do not fit `{address}({shown})`: {exc}",
                        span,
                        hint or f"parameters: {', '.join(params)}",
                    )
                ]
            ) from None

    def _pattern_parts(self, raw: list, span: Span):
        address: str | None = None
        call: Any = None
        bind_args: list[Any] = []
        bind_kwargs: dict[str, Any] = {}
        call_args: list[Any] = []
        call_kwargs: dict[str, Any] = {}
        attrs: list[str] = []
        file: str | None = None
        addr_span = span  # where `_addr_` is written, for address errors
        for item in raw[1:]:
            if item == "_call_":
                call = {}
                continue
            if isinstance(item, dict) and "_addr_" in item and set(item) <= {"_addr_", "_file_"}:
                if address is not None:
                    raise CompileError([_diag("E0746", "a pattern has one `_addr_`", span)])
                if not isinstance(item["_addr_"], str):
                    raise CompileError([_diag("E0746", "`_addr_` must be a dotted name", span)])
                address = item["_addr_"]
                if isinstance(item, LDict):
                    addr_span = item.value_span("_addr_")
                file = item.get("_file_")
                continue
            if not isinstance(item, dict) or len(item) != 1:
                raise CompileError(
                    [_diag("E0746", f"pattern step `{plain(item)}` is not one of {', '.join(PATTERN_KEYS)}", span)]
                )
            ((key, value),) = item.items()
            if key == "_attr_":
                if not is_name(value) or str(value).startswith("_"):
                    raise CompileError([_diag("E0401", f"`_attr_: {value}` must be a public attribute name", span)])
                attrs.append(value)
            elif key == "_bind_":
                a, k = self._call_values(value, span)
                bind_args += a
                bind_kwargs.update(k)
            elif key == "_call_":
                a, k = self._call_values(value, span)
                call = value if value is not None else {}
                call_args += a
                call_kwargs.update(k)
            else:
                raise CompileError(
                    [_diag("E0746", f"unknown pattern key `{key}`", span, did_you_mean(str(key), PATTERN_KEYS))]
                )
        if address is None:
            raise CompileError([_diag("E0747", "the pattern has no `_addr_`", span)])
        if file is not None:
            address = self._file_module(file, addr_span) + "." + address
        full = ".".join([address, *attrs])
        try:
            full = check_address(full, self.options.allow)
            obj = resolve(full, self.options.allow)
        except AddressError as exc:
            raise CompileError([_diag(exc.code, exc.message, addr_span, exc.hint)]) from None
        return full, obj, call, bind_args, bind_kwargs, call_args, call_kwargs

    def _file_module(self, file: Any, span: Span) -> str:
        """`_file_: blocks.py` next to the template: trusted only with --allow-module blocks.

        The file is loaded (which runs it) as ``scmc_files.blocks`` and later copied into the
        package as ``<package>/blocks.py``; generated code imports it relatively.
        """
        import importlib.util
        import sys
        import types

        directory = (self.current_source.directory if self.current_source else Path.cwd()).resolve()
        if not isinstance(file, str) or not file.endswith(".py"):
            raise CompileError(
                [_diag("E0748", f"`_file_` must name a .py file next to the template, not `{file}`", span)]
            )
        path = (directory / file).resolve()
        try:
            path.relative_to(directory)
        except ValueError:
            raise CompileError(
                [
                    _diag(
                        "E0755",
                        f"`_file_: {file}` points outside the template's directory",
                        span,
                        "layer files must sit in the template's directory (no `..`, absolute paths or symlinks out)",
                    )
                ]
            ) from None
        if not path.is_file():
            raise CompileError(
                [_diag("E0756", f"`_file_: {file}` does not exist", span, f"looked in {display_dir(directory)}")]
            )
        stem = path.stem
        reserved = {"model", "loss", "metric", "backward", "train", "predict", "manifest", "scmc_files"}
        if not is_name(stem) or stem in reserved or stem in self.options.allow.roots:
            raise CompileError(
                [
                    _diag(
                        "E0757",
                        f"`{path.name}` cannot become a module of the package",
                        span,
                        f"rename it; {', '.join(sorted(reserved))} and allow-listed roots are taken",
                    )
                ]
            )
        if stem not in self.options.allow.extra:
            raise CompileError(
                [
                    _diag(
                        "E0748",
                        f"`_file_: {file}` runs the Python code in {path.name} at build time",
                        span,
                        f"if you trust it, pass --allow-module {stem}",
                    )
                ]
            )
        known = self.files.get(stem)
        if known is not None and known != path:
            raise CompileError([_diag("E0758", f"two layer files are named {path.name}", span, "rename one of them")])
        module_name = f"scmc_files.{stem}"
        if known is None:
            package = sys.modules.setdefault("scmc_files", types.ModuleType("scmc_files"))
            package.__path__ = []  # type: ignore[attr-defined]
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as exc:
                del sys.modules[module_name]
                raise CompileError(
                    [_diag("E0759", f"loading {path.name} failed: {type(exc).__name__}: {exc}", span)]
                ) from None
            setattr(package, stem, module)
            self.files[stem] = path
            if module_name not in self.options.allow.extra:
                self.options.allow.extra = (*self.options.allow.extra, module_name)
        return module_name

    def _call_values(self, value: Any, span: Span) -> tuple[list[Any], dict[str, Any]]:
        if value is None:
            return [], {}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not is_name(k):
                    raise CompileError([_diag("E0749", f"argument name `{k}` is not a valid Python identifier", span)])
                out[k] = self._value(v, span)
            return [], out
        if isinstance(value, list):
            return [self._value(v, span) for v in value], {}
        return [self._value(value, span)], {}

    def _value(self, raw: Any, span: Span) -> Any:
        """A constructor argument: a literal, a folded `eval:`, or a nested pattern."""
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("eval:"):
                expr = self._expr(text[5:], span, self.imports, flow=False)
                try:
                    with _meta_device():  # `torch.ones(10**5, 10**5)` folds without allocating
                        value = X.fold(expr, self.options.allow)
                except X.ExprError as exc:
                    raise CompileError([_diag(exc.code, f"eval: {exc.message}", span, exc.hint)]) from None
                except X.NotConstant as exc:
                    raise CompileError([_diag("E0750", f"eval: `{exc}` is not a constant", span)]) from None
                return _as_value(value, expr, span)
            return raw
        if isinstance(raw, list):
            if raw and raw[0] == "_obj_":
                address, obj, call, bind_args, bind_kwargs, call_args, call_kwargs = self._pattern_parts(raw, span)
                if call is None and not bind_args and not bind_kwargs:
                    return Ref(address)
                if call is None:
                    import functools

                    return Ctor("functools.partial", (Ref(address), *bind_args), tuple(bind_kwargs.items()))
                import torch
                from torch.nn.modules.lazy import LazyModuleMixin

                if inspect.isclass(obj) and issubclass(obj, LazyModuleMixin):
                    raise CompileError(
                        [
                            _diag(
                                "E0751",
                                f"lazy layer `{address}` inside an argument cannot be materialized",
                                span,
                                "give it its sizes (use the non-lazy class)",
                            )
                        ]
                    )
                return Ctor(address, tuple(bind_args) + tuple(call_args), tuple({**bind_kwargs, **call_kwargs}.items()))
            return [self._value(v, span) for v in raw]
        if isinstance(raw, dict):
            return {k: self._value(v, span) for k, v in raw.items()}
        return raw

    # ------------------------------------------------------------------ naming

    def _auto_name(self, children: list[ChildInst]) -> None:
        taken = {c.attr for c in children if c.name_given}
        counts: dict[str, int] = {}
        for child in children:
            if child.name_given:
                continue
            if child.kind == "user":
                base = to_snake(child.instance.class_hint if child.instance else "layer")
            else:
                last = child.ctor.address.split(".")[-1]
                if last.startswith("Lazy") and len(last) > 4:
                    last = last[4:]
                base = to_snake(last)
            if base in MODULE_ATTRS or keyword.iskeyword(base) or base in dir(builtins):
                base = base + "_layer"
            n = counts.get(base, 0)
            while True:
                candidate = base if n == 0 else f"{base}_{n}"
                n += 1
                if candidate not in taken:
                    break
            counts[base] = n
            taken.add(candidate)
            child.attr = candidate


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


def _as_value(value: Any, expr: X.Expr, span: Span) -> Any:
    if X.is_plain_literal(value):
        return value
    if isinstance(value, float):  # inf / nan
        return value
    # an allow-listed object reached by name, e.g. torch.float32
    if len(expr.addresses) == 1 and expr.source == expr.addresses[0]:
        return Ref(expr.addresses[0])
    raise CompileError(
        [
            _diag(
                "E0752",
                f"eval: `{expr.source}` gives a {type(value).__name__}, not a literal",
                span,
                "layer arguments must fold to numbers, strings, booleans, None or lists of them",
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


def _meta_device():
    import torch

    return torch.device("meta")


def display_dir(path: Path) -> str:
    from scmc.load import display_path

    return display_path(path)


def folder_words(root: Path) -> str:
    """`the template's folder cfg/models`, for the messages that refuse a path outside it."""
    shown = display_dir(root)
    return "the template's folder " + ("(the working directory)" if shown == "." else shown)


def cfg_roots(source: Source, allowed: tuple[Path, ...] = ()) -> tuple[Path, ...]:
    """The folders a build part may read templates from (CFG, PACKAGE): the folder of its template
    and the --allow-cfg-dir folders, symbolic links resolved."""
    return (source.directory.resolve(), *(Path(d).resolve() for d in allowed))


def _diag(code: str, message: str, span: Span | None, hint: str = ""):
    from scmc.diagnostics import Diagnostic

    return Diagnostic(code, message, span, hint)


def _relabel(node: Node, children: list[ChildInst]) -> Node:
    if node.layer is None:
        return node
    for child in children:
        if str(id(child)) == node.layer:
            return Node(child.attr, node.args, node.kwargs, node.out, node.span)
    raise AssertionError("step refers to an unknown child")  # pragma: no cover


def _defined_name(step: Any) -> str | None:
    """The layer name a (possibly broken) step meant to define, if it says so plainly."""
    if isinstance(step, list) and len(step) in (3, 4) and is_name(step[2]):
        return step[2]
    if isinstance(step, dict) and is_name(step.get("NAME")):
        return step["NAME"]
    return None


def _first_reads(flow: list[Node]) -> list[str]:
    written: set[str] = set()
    reads: list[str] = []
    for node in flow:
        for name in node_reads(node):
            if name not in written and name not in reads:
                reads.append(name)
        written.update(out_names(node.out))
    return reads


def user_layer_defs(data: LDict, diags: Diagnostics, source: Source) -> dict[str, LDict]:
    """The user layers a mapping defines: every key that is not a layer-graph key."""
    out: dict[str, LDict] = {}
    for key, value in data.items():
        if key in LAYER_GRAPH_KEYS or key in JINJA_KEYS or key == PACKAGE_KEY:
            continue
        if not isinstance(key, str) or not is_name(key):
            diags.error("E0760", f"user layer name `{key}` is not a valid Python identifier", data.key_span(key))
            continue
        if not isinstance(value, dict):
            hint = did_you_mean(key, LAYER_GRAPH_KEYS)
            diags.error(
                "E0761",
                f"top-level key `{key}` is neither a template key nor a user layer (a mapping)",
                data.key_span(key),
                hint or "user layers are mappings with a FLOW",
            )
            continue
        if key.isupper() and key not in ("BACKWARDS",) and did_you_mean(key, LAYER_GRAPH_KEYS) and "FLOW" not in value:
            diags.error(
                "E0762", f"unknown template key `{key}`", data.key_span(key), did_you_mean(key, LAYER_GRAPH_KEYS)
            )
            continue
        out[key] = value
    return out
