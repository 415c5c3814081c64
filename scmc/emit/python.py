"""IR -> Python source for one generated module file (model.py, loss.py, metric.py).

The output reads like hand-written PyTorch: one class per distinct layer, leaves first;
every layer an explicit attribute with concrete arguments; a straight-line, typed
``forward``. Names come from the template; ``_`` becomes ``x``. Literals are emitted with
``repr``; every name is a validated identifier. The text is formatted with black and must
parse before it is returned.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import math
import re
from typing import Any, Iterable

from scmc.addresses import module_of
from scmc.diagnostics import printable
from scmc.emit.jinja import environment
from scmc.expr import rename as rename_expr
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
    Out,
    OutDict,
    OutName,
    OutTuple,
    Param,
    ParamExpr,
    Program,
    Ref,
    Var,
    out_names,
)
from scmc.names import JOINED, UNDERSCORED, Namespace
from scmc.passes.stages import SEQUENTIAL, Stage, group_stages

RESERVED = (
    {"self", "torch", "typing", "Dict", "List", "Tuple", "Any", "Optional", "super"}
    | set(dir(builtins))
    | set(keyword.kwlist)
)


LINE_LENGTH = 100


# Stateless library layers that hand-written code spells as an operator or a tensor method: a step
# through one of them is emitted inline (`inp + residual`, `x.permute(0, 2, 3, 1)`) and the layer
# gets no attribute. They hold no parameters or buffers, so the state_dict keys stay the same.
OPERATORS = {"scmc_runtime.layers.Add": " + ", "scmc_runtime.layers.Multiply": " * "}
PERMUTE = "scmc_runtime.layers.Permute"
CONCATENATE = ("scmc_runtime.layers.Concatenate", "scmc_runtime.layers.Concat")


def _concat_dim(ctor: Ctor) -> int | None:
    dim = ctor.kwarg("dim", ctor.args[0] if len(ctor.args) == 1 else -1)
    return dim if len(ctor.args) + len(ctor.kwargs) <= 1 and type(dim) is int else None


def _permute_dims(ctor: Ctor) -> tuple[int, ...] | None:
    dims = ctor.kwarg("dims", ctor.args[0] if len(ctor.args) == 1 else None)
    if len(ctor.args) + len(ctor.kwargs) != 1 or not isinstance(dims, (tuple, list)):
        return None
    return tuple(dims) if all(type(d) is int for d in dims) else None


def _inline_step(child: Child, node: Node) -> bool:
    """Whether NODE, a call of CHILD, is emitted as an operator expression instead of a layer call."""
    if child.kind != "module" or node.kwargs or len(node.args) != 1 or not isinstance(node.out, OutName):
        return False
    if child.ctor.address in OPERATORS:
        arg = node.args[0]
        return not child.ctor.args and not child.ctor.kwargs and isinstance(arg, ListArg) and bool(arg.items)
    if child.ctor.address == PERMUTE:
        return _permute_dims(child.ctor) is not None and not isinstance(node.args[0], ListArg)
    if child.ctor.address in CONCATENATE:
        return _concat_dim(child.ctor) is not None
    return False


def inline_children(mdef: ModuleDef) -> set[str]:
    """Attributes of MDEF whose every call is emitted inline: no `self.attr = ...` for them."""
    calls: dict[str, list[Node]] = {}
    for graph in (mdef.flow, mdef.inference or ()):
        for node in graph:
            if node.layer is not None:
                calls.setdefault(node.layer, []).append(node)
    return {c.attr for c in mdef.children if c.attr in calls and all(_inline_step(c, node) for node in calls[c.attr])}


def _operand(text: str, receiver: bool = False) -> str:
    """TEXT as an operand of `+`/`*` (or, RECEIVER, of a method call), parenthesized only if needed."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:  # pragma: no cover - every emitted argument parses
        return f"({text})"
    atoms: tuple[type, ...] = (ast.Name, ast.Attribute, ast.Subscript, ast.Call, ast.List)
    if isinstance(tree, atoms) or (not receiver and isinstance(tree, ast.Constant)):
        return text
    return f"({text})"


class EmitError(Exception):
    """Something the emitter cannot express: a bug in scmc (internal compiler error)."""


FILE_PACKAGE = "scmc_files."  # `_file_` modules, copied into the generated package


def code_name(address: str) -> str:
    """How generated code spells an address: `_file_` modules are siblings of the module."""
    return address[len(FILE_PACKAGE) :] if address.startswith(FILE_PACKAGE) else address


def literal(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, tuple):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Ref):
        return code_name(value.address)
    if isinstance(value, Param):
        return value.name
    if isinstance(value, ParamExpr):
        return value.source
    if isinstance(value, Ctor):
        parts = [literal(a) for a in value.args] + [f"{k}={literal(v)}" for k, v in value.kwargs]
        return f"{code_name(value.address)}({', '.join(parts)})"
    raise EmitError(f"cannot emit a {type(value).__name__} literal: {value!r}")


def addresses_in(value: Any) -> Iterable[str]:
    if isinstance(value, Ref):
        yield value.address
    elif isinstance(value, Ctor):
        if not value.user:
            yield value.address
        for a in value.args:
            yield from addresses_in(a)
        for _, v in value.kwargs:
            yield from addresses_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from addresses_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from addresses_in(v)


def annotation(observed: str | None) -> str:
    if not observed or observed == "torch.Tensor":
        return "torch.Tensor"
    return observed  # builtin generics (`dict[str, torch.Tensor]`), as TorchScript reads them


def attribute_value(ctor: Ctor) -> str:
    """The constructor call of an attribute; a Sequential of N identical layers as timm writes it,
    `torch.nn.Sequential(*[Block(fout=48) for _ in range(N)])`."""
    if ctor.address == SEQUENTIAL and not ctor.kwargs and len(ctor.args) > 1 and len(set(ctor.args)) == 1:
        return f"{code_name(SEQUENTIAL)}(*[{literal(ctor.args[0])} for _ in range({len(ctor.args)})])"
    return literal(ctor)


class ModuleEmitter:
    def __init__(
        self,
        mdef: ModuleDef,
        program: Program,
        reserved: set[str] | frozenset[str] = frozenset(),
        stages: tuple[Stage, ...] = (),
    ):
        self.m = mdef
        self.program = program
        self.stages = stages
        self.reserved = set(RESERVED) | set(reserved)  # + the modules the file imports
        self.children = {c.attr: c for c in mdef.children}
        self.inline = inline_children(mdef)
        self.names: dict[str, str] = {}
        # the forward's names: the file's globals, the attributes and arguments, every template name
        self.namespace = Namespace(self.reserved, numbering=JOINED)
        self.namespace.reserve(c.attr for c in mdef.children)
        self.namespace.reserve(p for p, _ in mdef.params)
        self.namespace.reserve(mdef.inputs)
        for graph in (mdef.flow, mdef.inference or ()):
            for node in graph:
                self.namespace.reserve(out_names(node.out))
        for name in self._all_flow_names():
            self.names[name] = self._fresh(name)

    def _all_flow_names(self) -> list[str]:
        names: list[str] = list(self.m.inputs)
        for graph in (self.m.flow, self.m.inference or ()):
            for node in graph:
                for name in out_names(node.out):
                    if name not in names:
                        names.append(name)
        return names

    def _fresh(self, name: str) -> str:
        """The Python name of template name NAME: itself, unless it is `_` (`x`), a dunder (`init_`)
        or shadows a global or an argument (`torch_`); a renamed one is numbered `x_2`, `x_3`."""
        if name == "_":
            base = "x"
            if base in self.m.inputs or any(base in out_names(n.out) for n in self.m.flow):
                base = "x_"
        elif name.startswith("__"):  # dunder and name-mangled names stay out of generated code
            base = name  # the namespace spells it as its stem and a `_`
        elif name in self.reserved or name in {p for p, _ in self.m.params}:
            base = name + "_"
        else:
            return name
        return self.namespace.fresh(base)

    # ---------------------------------------------------------------- forward

    def arg(self, arg: Arg) -> str:
        if isinstance(arg, Var):
            return self.names[arg.name]
        if isinstance(arg, Index):
            base = self.arg(arg.base)
            return f"({base})[{arg.key!r}]" if isinstance(arg.base, ExprArg) else f"{base}[{arg.key!r}]"
        if isinstance(arg, ListArg):
            return "[" + ", ".join(self.arg(a) for a in arg.items) + "]"
        if isinstance(arg, Const):
            return literal(arg.value)
        assert isinstance(arg, ExprArg)
        # a call argument or list item needs no parentheses (ast.unparse parenthesizes a tuple itself)
        return rename_expr(arg.expr, self.names)

    def target(self, out: Out) -> str:
        if isinstance(out, OutName):
            return self.names[out.name]
        if isinstance(out, OutTuple):
            return ", ".join(self.target(o) for o in out.items)
        raise EmitError("mapping outputs are bound by the caller")

    def node(self, node: Node) -> list[str]:
        args = [self.arg(a) for a in node.args]
        kwargs = [f"{k}={self.arg(v)}" for k, v in node.kwargs]
        if node.augment:  # `x += y` (scmc.passes.inplace)
            return [f"{self.target(node.out)} {node.augment}= {args[1]}"]
        if node.layer is None:
            call = args[0]
        elif node.layer in self.inline:
            call = self.inline_call(self.children[node.layer], node.args[0])
        else:
            child = self.children[node.layer]
            if child.kind == "function":
                bound = [literal(a) for a in child.ctor.args]
                bound_kw = [f"{k}={literal(v)}" for k, v in child.ctor.kwargs]
                call = f"{code_name(child.ctor.address)}({', '.join(bound + args + bound_kw + kwargs)})"
            else:
                call = f"self.{child.attr}({', '.join(args + kwargs)})"
        if isinstance(node.out, OutDict):
            temp = self.namespace.fresh(f"{node.layer or 'value'}_out")
            lines = [f"{temp} = {call}"]
            for name, key in node.out.pairs:
                lines.append(f"{self.names[name]} = {temp}[{key!r}]")
            return lines
        return [f"{self.target(node.out)} = {call}"]

    def inline_call(self, child: Child, arg: Arg) -> str:
        if child.ctor.address == PERMUTE:
            dims = ", ".join(str(d) for d in (0, *(_permute_dims(child.ctor) or ())))
            return f"{_operand(self.arg(arg), receiver=True)}.permute({dims})"
        if child.ctor.address in CONCATENATE:
            return f"torch.cat({self.arg(arg)}, dim={_concat_dim(child.ctor)})"
        assert isinstance(arg, ListArg)
        return OPERATORS[child.ctor.address].join(_operand(self.arg(item)) for item in arg.items)

    def graph(self, nodes: Iterable[Node]) -> list[str]:
        lines: list[str] = []
        for node in nodes:
            lines.extend(f"# {comment_text(text)}" if text else "#" for text in node.comment.splitlines())
            lines.extend(self.node(node))
        return lines

    def returns(self) -> tuple[str, str]:
        types = dict(self.m.types)
        outs = [self.names[o] for o in self.m.outputs]
        out_types = [annotation(types.get(o)) for o in self.m.outputs]
        if self.m.structured:
            value_types = set(out_types)
            value = out_types[0] if len(value_types) == 1 else "Any"
            body = "{" + ", ".join(f"{o!r}: {n}" for o, n in zip(self.m.outputs, outs, strict=True)) + "}"
            return f"dict[str, {value}]", body
        if len(outs) == 1:
            return out_types[0], outs[0]
        return f"tuple[{', '.join(out_types)}]", ", ".join(outs)

    # ---------------------------------------------------------------- class

    def emit(self) -> dict[str, Any]:
        """What templates/module.py.j2 lays out for this class: its parts as source text."""
        m = self.m
        doc = m.doc or (f"Compiled from the template `{m.template}`." if m.template else "")
        step_names = ""
        if self.stages:
            names = ", ".join(f"{s.attr!r}: ({', '.join(repr(n) for n in s.steps)})" for s in self.stages)
            step_names = f"{{{names}}}"
        attributes = [
            f"self.{child.attr} = {attribute_value(child.ctor)}"
            for child in m.children
            if child.kind != "function" and child.attr not in self.inline
        ]
        types = dict(m.types)
        ret_type, ret_value = self.returns()
        body: list[str] = []
        if m.inference is not None:
            body.append("if self.training:")
            body.extend("    " + ln for ln in (self.graph(m.flow) or ["pass"]))
            body.append("else:")
            body.extend("    " + ln for ln in (self.graph(m.inference) or ["pass"]))
        else:
            body.extend(self.graph(m.flow))
        body.append(f"return {ret_value}")
        return {
            "name": m.name,
            "doc": _indented_docstring(doc, "    ") if doc else "",
            "step_names": step_names,
            "init": bool(attributes or m.params),  # no `__init__` that only calls super
            "params": "".join(f", {n}: {t}" for n, t in m.params),
            "attributes": attributes,
            "signature": "".join(f", {self.names[i]}: {annotation(types.get(i))}" for i in m.inputs),
            "returns": ret_type,
            "body": body,
        }


def safe_parameter_names(program: Program, taken: set[str]) -> Program:
    """Rename constructor arguments that would shadow a global the class body reads (`torch`,
    `super`, an imported module, a generated class) or that Python treats specially (dunders)."""
    import dataclasses

    renames: dict[str, dict[str, str]] = {}
    file_scope = Namespace(RESERVED, numbering=UNDERSCORED)  # + the imported modules and generated classes
    file_scope.reserve(taken)
    for m in program.modules:
        arguments = file_scope.child()
        arguments.reserve(p for p, _ in m.params)
        mapping: dict[str, str] = {}
        for p, _ in m.params:
            if p in RESERVED or p in taken or p.startswith("__"):
                mapping[p] = arguments.fresh((p.strip("_") or "value") + "_")  # torch_, torch__
        renames[m.name] = mapping
    if not any(renames.values()):
        return program

    def value(v: Any, mapping: dict[str, str]) -> Any:
        if isinstance(v, Param):
            return Param(mapping.get(v.name, v.name))
        if isinstance(v, ParamExpr):
            if not any(n in mapping for n in v.names):
                return v
            tree = ast.parse(v.source, mode="eval")
            for node in ast.walk(tree):
                if isinstance(node, ast.Name) and node.id in mapping:
                    node.id = mapping[node.id]
            return ParamExpr(ast.unparse(tree), tuple(mapping.get(n, n) for n in v.names))
        if isinstance(v, Ctor):
            keys = renames.get(v.address, {}) if v.user else {}
            return dataclasses.replace(
                v,
                args=tuple(value(a, mapping) for a in v.args),
                kwargs=tuple((keys.get(k, k), value(a, mapping)) for k, a in v.kwargs),
            )
        if isinstance(v, list):
            return [value(a, mapping) for a in v]
        if isinstance(v, tuple):
            return tuple(value(a, mapping) for a in v)
        if isinstance(v, dict):
            return {k: value(a, mapping) for k, a in v.items()}
        return v

    modules = []
    for m in program.modules:
        mapping = renames[m.name]
        children = tuple(dataclasses.replace(c, ctor=value(c.ctor, mapping)) for c in m.children)
        params = tuple((mapping.get(p, p), t) for p, t in m.params)
        modules.append(dataclasses.replace(m, params=params, children=children))
    return Program(tuple(modules), program.root)


def _docstring(text: str) -> str:
    """A docstring literal for any text: backslashes and quotes escaped, control characters spelled out."""
    safe = "".join(_escape_char(c) if c != "\n" else c for c in text.replace("\\", "\\\\").replace('"', '\\"'))
    return f'"""{safe}"""'


def _indented_docstring(text: str, indent: str) -> str:
    """A class docstring at INDENT: one line, or a summary, the rest and the closing quotes indented."""
    if "\n" not in text:
        return indent + _docstring(text)
    literal = _docstring(text + "\n")
    return "\n".join(indent + line if line else "" for line in literal.split("\n")[:-1]) + "\n" + indent + '"""'


def _escape_char(char: str) -> str:
    return printable(char)


def comment_text(text: str) -> str:
    """Text that stays inside one `#` comment line: newlines and other control characters spelled out."""
    return printable(text)


def comment_block(header: list[str]) -> str:
    return "\n".join(f"# {comment_text(line)}" if line else "#" for line in header)


def imports_of(program: Program) -> list[str]:
    modules: list[str] = []

    def add(address: str) -> None:
        module, _ = module_of(address, None)
        if module not in modules:
            modules.append(module)

    for m in program.modules:
        inline = inline_children(m)
        for child in m.children:
            if child.attr in inline:
                continue
            if child.kind == "user":
                for _, v in child.ctor.kwargs:
                    for a in addresses_in(v):
                        add(a)
                continue
            for a in addresses_in(child.ctor):
                add(a)
        for graph in (m.flow, m.inference or ()):
            for node in graph:
                for arg in (*node.args, *(v for _, v in node.kwargs)):
                    for a in _expr_addresses(arg):
                        add(a)
    return modules


def _expr_addresses(arg: Arg) -> Iterable[str]:
    if isinstance(arg, ExprArg):
        yield from arg.expr.addresses
    elif isinstance(arg, ListArg):
        for a in arg.items:
            yield from _expr_addresses(a)
    elif isinstance(arg, Index):
        yield from _expr_addresses(arg.base)
    elif isinstance(arg, Const):
        yield from addresses_in(arg.value)


def minimal_imports(modules: list[str]) -> list[str]:
    """`import` lines needed, each module as the code spells it (`import timm.layers` for
    `timm.layers.LayerNorm` beside `import timm.layers.grn` for `timm.layers.grn.GlobalResponseNorm`);
    `torch.nn...` comes with `import torch`; torch first, then sorted."""
    keep: list[str] = []
    for module in sorted(set(modules)):
        if not module.startswith(FILE_PACKAGE) and (module == "torch" or module.startswith("torch.nn")):
            module = "torch"
        if module not in keep:
            keep.append(module)
    return sorted(keep, key=lambda name: (name != "torch", name))


def emit_module_file(program: Program, header: list[str], docstring: str) -> str:
    """The complete, black-formatted source of one generated file."""
    program, stages = group_stages(program, frozenset((*OPERATORS, PERMUTE, *CONCATENATE)))
    modules = minimal_imports(["torch", *imports_of(program)])
    # names generated code reads as globals: a local or argument of the same name would shadow them
    taken = {code_name(m).split(".")[0] for m in modules} | {m.name for m in program.modules}
    program = safe_parameter_names(program, taken)
    classes = [ModuleEmitter(mdef, program, taken, stages.get(mdef.name, ())).emit() for mdef in program.modules]
    code = "\n".join(
        line
        for cls in classes
        for line in (cls["params"], *cls["attributes"], cls["signature"], cls["returns"], *cls["body"])
    )
    typing_names = [n for n in ("Any",) if re.search(rf"\b{n}\[|\b{n}\b(?!\()", code)]
    import_lines = [
        f"from . import {module[len(FILE_PACKAGE):]}" if module.startswith(FILE_PACKAGE) else f"import {module}"
        for module in modules
    ]
    source = (
        environment()
        .get_template("module.py.j2")
        .render(
            header=comment_block(header),
            docstring=_docstring(docstring),
            typing_names=typing_names,
            import_lines=import_lines,
            root=program.root,
            classes=classes,
        )
    )
    try:
        return format_python(source)
    except Exception as exc:  # black refuses only code that does not parse
        raise EmitError(f"generated code does not format: {exc}\n{source}") from exc


def format_python(source: str) -> str:
    """Black at LINE_LENGTH, checked to compile; remembered in the build cache while one is in use
    (formatting is a third of a build's own work, and most files of a rebuild are unchanged)."""
    from scmc import cache

    def black_format(text: str) -> str:
        import black

        formatted = black.format_str(text, mode=black.Mode(line_length=LINE_LENGTH))
        # compile, not only parse: the compiler also refuses `__debug__ = ...`, a repeated argument, ...
        compile(formatted, "<generated>", "exec", dont_inherit=True)
        return formatted

    return cache.formatted(source, LINE_LENGTH, black_format)
