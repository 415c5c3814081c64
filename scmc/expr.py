"""The ``eval:`` grammar: parse, check, fold and render expressions without ``eval``.

An expression is parsed with :mod:`ast` and accepted only if every node is in the grammar
of the spec (section 4): literals, names of flow values or IMPORTS, arithmetic, comparison
and boolean operators, conditional expressions, subscripts and slices, tuples, lists,
dicts, and calls of allow-listed callables (plus a few pure builtins). Dotted names are
addresses and go through the allow-list. Nothing is ever passed to ``eval``/``exec``: the
folding and the build-time interpreter walk the tree themselves.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

from scmc.addresses import AddressError, AllowList, check_address, resolve

PURE_BUILTINS: dict[str, Callable[..., Any]] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "abs": abs,
    "min": min,
    "max": max,
    "round": round,
    "len": len,
    "sum": sum,
    "tuple": tuple,
    "list": list,
    "range": range,
}

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.MatMult: operator.matmul,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
    ast.Not: operator.not_,
    ast.Invert: operator.invert,
}
_CMP: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}

MAX_LENGTH = 10_000
MAX_BITS = 65_536  # integers folded at build time
MAX_EXPR_CHARS = 2_000


class ExprError(Exception):
    def __init__(self, code: str, message: str, hint: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Expr:
    """A checked expression. ``source`` is canonical (ast.unparse) with addresses spelled out."""

    source: str
    names: tuple[str, ...]  # flow names it reads, in order of first use
    addresses: tuple[str, ...]  # allow-listed dotted names it uses


class AnyName(frozenset):
    """Flow names not known yet: every name may be one (the lowering checks reads later)."""

    def __contains__(self, item: object) -> bool:
        return True


ANY_NAME = AnyName()


@dataclass
class Context:
    allow: AllowList
    imports: dict[str, str] = field(default_factory=dict)  # local name -> address
    flow_names: frozenset[str] | None = None  # None: a constant context (layer arguments); ANY_NAME: any


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def parse(text: str, ctx: Context) -> Expr:
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError("E0500", f"expression is longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExprError("E0501", f"`{text.strip()}` is not a Python expression: {exc.msg}") from None
    for node in ast.walk(tree):  # before anything else: `__import__(...)` is refused as such
        # `_` and `_x` are ordinary flow names; dunder names and private attributes are not
        private = (
            node.id
            if isinstance(node, ast.Name) and node.id.startswith("__")
            else node.attr if isinstance(node, ast.Attribute) and node.attr.startswith("_") else ""
        )
        if private:
            raise ExprError(
                "E0502",
                f"`{private}` is outside the `eval:` grammar: dunder names and private attributes are refused",
                "use literals, flow names, operators and calls of allow-listed functions",
            )
    names: list[str] = []
    addresses: list[str] = []

    class Rewrite(ast.NodeTransformer):
        def generic_visit(self, node: ast.AST) -> ast.AST:
            allowed = (
                ast.Expression,
                ast.Constant,
                ast.BinOp,
                ast.UnaryOp,
                ast.BoolOp,
                ast.Compare,
                ast.IfExp,
                ast.Subscript,
                ast.Slice,
                ast.Tuple,
                ast.List,
                ast.Dict,
                ast.Call,
                ast.keyword,
                ast.Load,
                ast.operator,
                ast.unaryop,
                ast.boolop,
                ast.cmpop,
                ast.Name,
                ast.Attribute,
                ast.Starred,
            )
            if not isinstance(node, allowed) or isinstance(node, ast.Starred):
                raise ExprError(
                    "E0502",
                    f"`{ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__}` is outside the `eval:` grammar",
                    "use literals, flow names, operators, subscripts and calls of allow-listed functions",
                )
            return super().generic_visit(node)

        def visit_Dict(self, node: ast.Dict) -> ast.AST:
            if any(k is None for k in node.keys):
                raise ExprError("E0502", f"`{ast.unparse(node)}`: `**` unpacking is outside the `eval:` grammar")
            return self.generic_visit(node)

        def visit_Constant(self, node: ast.Constant) -> ast.AST:
            if isinstance(node.value, (bytes, type(Ellipsis))) or (
                isinstance(node.value, str) and len(node.value) > MAX_LENGTH
            ):
                raise ExprError("E0502", f"constant `{ast.unparse(node)}` is outside the `eval:` grammar")
            return node

        def visit_Name(self, node: ast.Name) -> ast.AST:
            return self._name(node, node.id)

        def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
            dotted = _dotted(node)
            if dotted is None:
                raise ExprError(
                    "E0503",
                    f"attribute access `{ast.unparse(node)}` is outside the `eval:` grammar",
                    "only dotted names of imported modules may use `.`",
                )
            return self._name(node, dotted)

        def _name(self, node: ast.expr, dotted: str) -> ast.AST:
            head, _, rest = dotted.partition(".")
            # Where every name may be a flow value (the flow's names are not known while it is
            # being lowered), IMPORTS and the pure builtins win; a known set of flow names wins
            # over them.
            wildcard = isinstance(ctx.flow_names, AnyName)
            shadowed = wildcard and (
                head in ctx.imports or (not rest and (head in PURE_BUILTINS or head in ("True", "False", "None")))
            )
            if wildcard and rest and not shadowed and head in ctx.allow.all_roots():
                raise ExprError(
                    "E0504",
                    f"`{dotted}` uses module `{head}`, which is not in IMPORTS",
                    f"add `IMPORTS: [{head}]` to the template",
                )
            if ctx.flow_names is not None and head in ctx.flow_names and not shadowed:
                if rest:
                    raise ExprError(
                        "E0503",
                        f"attribute access `{dotted}` on flow value `{head}` is outside the `eval:` grammar",
                        f"index it instead (`{head}[...]`) or use a layer"
                        + (f"; if `{head}` is a module, add it to IMPORTS" if wildcard else ""),
                    )
                if head not in names:
                    names.append(head)
                return node
            if head in ctx.imports:
                address = ctx.imports[head] + ("." + rest if rest else "")
            elif not rest and head in PURE_BUILTINS:
                return node
            elif head in ("True", "False", "None"):
                return node
            else:
                known = sorted((ctx.flow_names or set()) | set(ctx.imports))
                from scmc.diagnostics import did_you_mean

                hint = did_you_mean(head, known)
                if ctx.flow_names is not None:
                    raise ExprError(
                        "E0504",
                        f"`{dotted}` is not one of the flow values or IMPORTS",
                        hint or "add the module to IMPORTS",
                    )
                raise ExprError(
                    "E0504",
                    f"`{dotted}` is not a constant: layer arguments are folded at build time",
                    hint
                    or f"insert a parameter with Jinja (`{{{{ {head} }}}}` inside a `_jinja_yaml_` block), "
                    "or import a module in IMPORTS",
                )
            try:
                address = check_address(address, ctx.allow)
            except AddressError as exc:
                raise ExprError(exc.code, exc.message, exc.hint) from None
            if address not in addresses:
                addresses.append(address)
            new: ast.expr = ast.Name(id=address.split(".")[0], ctx=ast.Load())
            for part in address.split(".")[1:]:
                new = ast.Attribute(value=new, attr=part, ctx=ast.Load())
            return ast.copy_location(new, node)

    tree = Rewrite().visit(tree)
    ast.fix_missing_locations(tree)
    return Expr(ast.unparse(tree.body), tuple(names), tuple(addresses))


class NotConstant(Exception):
    pass


def evaluate(expr: Expr, env: dict[str, Any], allow: AllowList) -> Any:
    """Evaluate a checked expression by walking its tree (no ``eval``)."""
    tree = ast.parse(expr.source, mode="eval").body

    def guard_size(value: Any) -> Any:
        if isinstance(value, (str, list, tuple)) and len(value) > MAX_LENGTH:
            raise ExprError("E0505", f"expression builds a value longer than {MAX_LENGTH}")
        return value

    def go(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            dotted = _dotted(node)
            assert dotted is not None
            if dotted in env:
                return env[dotted]
            if dotted in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[dotted]
            if dotted in PURE_BUILTINS:
                return PURE_BUILTINS[dotted]
            if "." not in dotted and dotted not in expr.addresses:
                raise NotConstant(dotted)
            try:
                return resolve(dotted, allow)
            except AddressError as exc:
                raise ExprError(exc.code, exc.message, exc.hint) from None
        if isinstance(node, ast.BinOp):
            left, right = go(node.left), go(node.right)
            if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > 4096:
                raise ExprError("E0505", "exponent too large in expression")
            if (
                isinstance(node.op, ast.Pow)
                and isinstance(left, int)
                and isinstance(right, int)
                and abs(left) > 1
                and left.bit_length() * right > MAX_BITS
            ):
                raise ExprError("E0505", f"expression builds an integer of more than {MAX_BITS} bits")
            if isinstance(node.op, (ast.LShift,)) and isinstance(right, int) and right > 4096:
                raise ExprError("E0505", "shift too large in expression")
            if (
                isinstance(node.op, ast.LShift)
                and isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right > MAX_BITS
            ):
                raise ExprError("E0505", f"expression builds an integer of more than {MAX_BITS} bits")
            if (
                isinstance(node.op, ast.Mult)
                and isinstance(left, (str, list, tuple))
                and isinstance(right, int)
                and len(left) * right > MAX_LENGTH
            ):
                raise ExprError("E0505", f"expression builds a value longer than {MAX_LENGTH}")
            if (
                isinstance(node.op, ast.Mult)
                and isinstance(right, (str, list, tuple))
                and isinstance(left, int)
                and len(right) * left > MAX_LENGTH
            ):
                raise ExprError("E0505", f"expression builds a value longer than {MAX_LENGTH}")
            return guard_size(_BINOPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](go(node.operand))
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                value: Any = True
                for v in node.values:
                    value = go(v)
                    if not value:
                        return value
                return value
            value = False
            for v in node.values:
                value = go(v)
                if value:
                    return value
            return value
        if isinstance(node, ast.Compare):
            left = go(node.left)
            for op, comp in zip(node.ops, node.comparators):
                right = go(comp)
                if not _CMP[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return go(node.body) if go(node.test) else go(node.orelse)
        if isinstance(node, ast.Subscript):
            return go(node.value)[go(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(*(go(p) if p is not None else None for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Tuple):
            return tuple(go(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [go(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {go(k): go(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
        if isinstance(node, ast.Call):
            fn = go(node.func)
            if not callable(fn):
                raise ExprError("E0506", f"`{ast.unparse(node.func)}` is not callable")
            args = [go(a) for a in node.args]
            kwargs = {k.arg: go(k.value) for k in node.keywords if k.arg}
            if fn is range and len(range(*args)) > MAX_LENGTH:
                raise ExprError("E0505", f"range longer than {MAX_LENGTH}")
            return guard_size(fn(*args, **kwargs))
        raise ExprError("E0502", f"`{ast.unparse(node)}` is outside the `eval:` grammar")  # pragma: no cover

    return go(tree)


def fold(expr: Expr, allow: AllowList) -> Any:
    """Fold a constant expression; raises NotConstant when it reads flow values."""
    if expr.names:
        raise NotConstant(expr.names[0])
    try:
        return evaluate(expr, {}, allow)
    except (ExprError, NotConstant):
        raise
    except Exception as exc:
        raise ExprError("E0507", f"`{expr.source}` failed at build time: {type(exc).__name__}: {exc}") from None


def check_constant_parts(expr: Expr, allow: AllowList) -> None:
    """Fold every part of an expression that reads no flow value, so `x * 10**10**10` is refused
    at build time (the size guards of :func:`evaluate`) instead of hanging in generated code.
    Other failures of a constant part are left to run time (or to shape inference)."""
    flow = set(expr.names)
    tree = ast.parse(expr.source, mode="eval").body

    def constant(node: ast.AST) -> bool:
        return not any(isinstance(n, ast.Name) and n.id in flow for n in ast.walk(node))

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.expr) and constant(node):
            if isinstance(node, (ast.Constant, ast.Name, ast.Attribute)):
                return
            try:
                evaluate(Expr(ast.unparse(node), (), expr.addresses), {}, allow)
            except ExprError:
                raise
            except Exception:
                pass
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)


def rename(expr: Expr, mapping: dict[str, str]) -> str:
    """The expression's source with flow names renamed (for emitted code)."""
    if not mapping or not expr.names:
        return expr.source
    tree = ast.parse(expr.source, mode="eval")
    flow = set(expr.names)

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            if node.id in flow and node.id in mapping:
                return ast.copy_location(ast.Name(id=mapping[node.id], ctx=node.ctx), node)
            return node

    return ast.unparse(Rename().visit(tree).body)


def is_plain_literal(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(is_plain_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and is_plain_literal(v) for k, v in value.items())
    return False
