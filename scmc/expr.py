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
import functools
import inspect
import math
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from scmc.addresses import TENSOR_ATTRIBUTES, TENSOR_METHODS, AddressError, AllowList, check_address, resolve

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

# Limits of what an `eval:` expression may build at build time (docs/security.md, Capabilities).
# Each is a module constant; raise it in a wrapper script (`scmc.expr.MAX_NUMEL = ...`) if a
# template you trust needs more.
MAX_LENGTH = 10_000  # items of a folded str/list/tuple/dict, counted through nesting
MAX_BITS = 65_536  # integers folded at build time
MAX_EXPR_CHARS = 2_000
MAX_DEPTH = 100  # nesting of an expression's syntax tree (operators, calls, containers)
MAX_NUMEL = 2**28  # elements of a tensor a factory call (`torch.ones(...)`) may create, on any device


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
        if "too many nested" in exc.msg:  # the parser's own limit (200 brackets)
            raise _too_deep() from None
        raise ExprError("E0501", f"`{text.strip()}` is not a Python expression: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise _too_deep() from None
    _check_depth(tree)
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
    method_calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}

    def tensor_attribute(node: ast.Attribute, shown: str, on: str = "") -> None:
        """`.attr` read from a value (a flow tensor, a call's result): an allowed attribute, or a
        method of the allow-list called right here."""
        attr = node.attr
        if attr in TENSOR_ATTRIBUTES or (attr in TENSOR_METHODS and id(node) in method_calls):
            return
        what = "method" if id(node) in method_calls else "attribute"
        raise ExprError(
            "E0503",
            f"attribute access `{shown}`{on} is outside the `eval:` grammar: `{attr}` is not one of the tensor "
            f"{what}s a template may use",
            f"tensors give {', '.join(sorted(TENSOR_ATTRIBUTES))} and pure methods such as view, reshape, size, "
            "permute, mean, softmax (docs/security.md, Capabilities); or index the value (`x[...]`) or use a layer",
        )

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

        def visit_Call(self, node: ast.Call) -> ast.AST:
            # a named function (an address, a pure builtin) or a tensor method; not `f()()`, `y[0]()`
            # or a flow value called as a function (checked when the flow's names are known: evaluate)
            node = self.generic_visit(node)  # type: ignore[assignment]  # grammar errors inside come first
            if not isinstance(node.func, (ast.Name, ast.Attribute)):
                raise ExprError(
                    "E0506",
                    f"`{ast.unparse(node.func)}` is called, but only functions named by an address or a builtin, "
                    "and tensor methods, may be called in `eval:`",
                    "call an allow-listed function by name",
                )
            return node

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
            if dotted is None:  # an attribute of a computed value: `x.view(2, -1).size(0)`
                tensor_attribute(node, ast.unparse(node))
                return self.generic_visit(node)
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
                # `tokens.shape[1]`, `x.view(2, -1)`: each attribute one a tensor may give
                inner: ast.expr = node
                chain: list[ast.Attribute] = []
                while isinstance(inner, ast.Attribute):
                    chain.append(inner)
                    inner = inner.value
                for attribute in reversed(chain):
                    try:
                        tensor_attribute(attribute, dotted, f" on flow value `{head}`")
                    except ExprError as exc:
                        if wildcard:
                            exc.hint += f"; if `{head}` is a module, add it to IMPORTS"
                        raise
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
                resolve(address, ctx.allow)  # judged by what it is, where it is written
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
    """Evaluate a checked expression by walking its tree (no ``eval``). Every operator and call
    goes through :func:`call_checked`, so sizes are estimated before anything is built."""
    tree = ast.parse(expr.source, mode="eval").body
    flow = set(expr.names)

    def go(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            dotted = _dotted(node)
            if dotted is None:  # an attribute of a computed value
                assert isinstance(node, ast.Attribute)
                return tensor_attribute(go(node.value), node.attr)
            if dotted in env:
                return env[dotted]
            head, _, rest = dotted.partition(".")
            if rest and head in env and head in flow:
                value = env[head]
                for attr in rest.split("."):
                    value = tensor_attribute(value, attr)
                return value
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
            return call_checked(_BINOPS[type(node.op)], [go(node.left), go(node.right)], {})
        if isinstance(node, ast.UnaryOp):
            return call_checked(_UNARY[type(node.op)], [go(node.operand)], {})
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                value = True
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
            for op, comp in zip(node.ops, node.comparators, strict=True):
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
            return guard_value(tuple(go(e) for e in node.elts))
        if isinstance(node, ast.List):
            return guard_value([go(e) for e in node.elts])
        if isinstance(node, ast.Dict):
            return guard_value({go(k): go(v) for k, v in zip(node.keys, node.values, strict=True)})  # type: ignore[arg-type]
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in flow:
                raise ExprError(
                    "E0506",
                    f"`{node.func.id}` is a flow value; calling it is outside the `eval:` grammar",
                    "call an allow-listed function by name",
                )
            fn = go(node.func)
            if not callable(fn):
                raise ExprError("E0506", f"`{ast.unparse(node.func)}` is not callable")
            args = [go(a) for a in node.args]
            kwargs = {k.arg: go(k.value) for k in node.keywords if k.arg}
            return call_checked(fn, args, kwargs)
        raise ExprError("E0502", f"`{ast.unparse(node)}` is outside the `eval:` grammar")  # pragma: no cover

    return go(tree)


# --------------------------------------------------------------------------- bounds


def _too_deep() -> ExprError:
    return ExprError(
        "E0508",
        f"expression nests more than {MAX_DEPTH} levels deep",
        "split it over several steps, or compute the value with Jinja",
    )


def _check_depth(tree: ast.AST) -> None:
    """The syntax tree is walked without recursion: deeper than MAX_DEPTH is refused before any
    recursive pass (the rewrite, ``ast.unparse``, evaluation) could overflow the stack."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _too_big(what: str = f"a value longer than {MAX_LENGTH}") -> ExprError:
    return ExprError("E0505", f"expression builds {what}", "build-time values are bounded (docs/security.md)")


def nested_size(value: Any, cap: int = MAX_LENGTH) -> int:
    """Items of a value counted through nesting (a string counts its characters, a nested
    container itself and its items), stopping once past ``cap``: `[[0] * 10000] * 3000` is
    30 million, though its outer list has 3000."""
    total = 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        stack = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        stack = list(value) if len(value) <= cap else []
        total = len(value) - len(stack)
    else:
        return 1
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, str):
            total += max(len(item), 1)
        elif isinstance(item, (list, tuple, set, frozenset, dict)):
            total += 1
            if len(item) > cap:
                total += len(item)
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)
        else:
            total += 1
    return total


def guard_value(value: Any) -> Any:
    """A value built at build time: bounded in items, integer bits and (off the meta device) numel."""
    if isinstance(value, (str, list, tuple, dict, set, frozenset)):
        if nested_size(value) > MAX_LENGTH:
            raise _too_big()
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_BITS:
        raise _too_big(f"an integer of more than {MAX_BITS} bits")
    else:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.Tensor) and value.device.type != "meta":
            if value.numel() > MAX_NUMEL:
                raise _too_big(f"a tensor of {value.numel()} elements (more than {MAX_NUMEL})")
    return value


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    index = getattr(value, "__index__", None)
    if index is not None and not isinstance(value, float):
        try:
            return int(index())
        except Exception:
            return None
    return None


def _numel_of_size(size: Any) -> int | None:
    """Elements of a size given as `(2, 3)`, `[2, 3]`, `torch.Size` or one integer."""
    if isinstance(size, (list, tuple)):
        total = 1
        for d in size:
            n = _int(d)
            if n is None:
                return None
            total *= max(n, 0)
        return total
    n = _int(size)
    return max(n, 0) if n is not None else None


def _size_args(args: list[Any]) -> Any:
    return args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)


def _method_numel(name: str, tensor: Any, rest: list[Any], kwargs: dict[str, Any]) -> int | None:
    if name in ("new_ones", "new_zeros", "new_empty"):
        return _numel_of_size(kwargs["size"] if "size" in kwargs else _size_args(rest))
    if name == "new_full":
        return _numel_of_size(kwargs.get("size", rest[0] if rest else None))
    if name in ("repeat", "tile"):
        factor = _numel_of_size(_size_args(rest) if rest else kwargs.get("dims", kwargs.get("repeats")))
        return None if factor is None else factor * tensor.numel()
    if name == "repeat_interleave" and rest and _int(rest[0]) is not None:
        return tensor.numel() * max(_int(rest[0]) or 0, 0)
    return None


def _factory_numel(fn: Any, args: list[Any], kwargs: dict[str, Any]) -> int | None:
    """Elements a tensor-creating call will make, estimated from its arguments before it runs."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    name = getattr(fn, "__name__", "")
    receiver = getattr(fn, "__self__", None)
    if isinstance(receiver, torch.Tensor):  # `x.new_ones(...)`, `x.repeat(...)`
        return _method_numel(name, receiver, args, kwargs)
    if getattr(torch.Tensor, name, None) is fn:  # `torch.Tensor.new_ones(x, ...)`
        return _method_numel(name, args[0], args[1:], kwargs) if args and isinstance(args[0], torch.Tensor) else None
    if getattr(torch, name, None) is not fn:
        return None
    if name in ("tile", "repeat_interleave") and args and isinstance(args[0], torch.Tensor):
        return _method_numel(name, args[0], args[1:], kwargs)
    if name in ("ones", "zeros", "empty", "rand", "randn"):
        return _numel_of_size(kwargs["size"] if "size" in kwargs else _size_args(args))
    if name == "full":
        return _numel_of_size(kwargs.get("size", args[0] if args else None))
    if name == "randint":
        size = kwargs.get("size", next((a for a in args if isinstance(a, (list, tuple))), None))
        return _numel_of_size(size)
    if name == "eye":
        n = _int(kwargs.get("n", args[0] if args else None))
        m = _int(kwargs.get("m", args[1] if len(args) > 1 else n))
        return None if n is None or m is None else max(n, 0) * max(m, 0)
    if name in ("arange", "range"):
        numbers = [kwargs.get(k) for k in ("start", "end", "step")]
        given = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        start: Any
        end: Any
        step: Any
        if len(given) == 1:
            start, end, step = 0, given[0], 1
        elif given:
            start, end, step = (given + [1])[:3]
        else:
            start, end, step = numbers[0] or 0, numbers[1], numbers[2] or 1
        if end is None or not step:
            return None
        try:
            return max(int(math.ceil((end - start) / step)), 0)
        except (OverflowError, ValueError, TypeError):
            return MAX_NUMEL + 1
    if name in ("linspace", "logspace"):
        return _int(kwargs.get("steps", args[2] if len(args) > 2 else None))
    if name == "randperm" or name.endswith("_window"):
        return _int(kwargs.get("n", kwargs.get("window_length", args[0] if args else None)))
    if name in ("tril_indices", "triu_indices"):
        row, col = (_int(kwargs.get(k, args[i] if len(args) > i else None)) for i, k in enumerate(("row", "col")))
        return None if row is None or col is None else 2 * max(row, 0) * max(col, 0)
    if name in ("tensor", "as_tensor"):
        return nested_size(args[0] if args else kwargs.get("data"), MAX_NUMEL + 1)
    return None


def _check_operands(fn: Any, args: list[Any]) -> None:
    """Operators and math functions whose result could dwarf their operands are estimated first."""
    if fn in (operator.pow, math.pow) and len(args) == 2:
        left, right = args
        if isinstance(right, (int, float)) and not isinstance(right, bool) and abs(right) > 4096:
            raise ExprError("E0505", "exponent too large in expression")
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and left.bit_length() * right > MAX_BITS:
            raise _too_big(f"an integer of more than {MAX_BITS} bits")
    elif fn is operator.lshift and len(args) == 2:
        left, right = args
        if isinstance(right, int) and right > 4096:
            raise ExprError("E0505", "shift too large in expression")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right > MAX_BITS:
            raise _too_big(f"an integer of more than {MAX_BITS} bits")
    elif fn is operator.mul and len(args) == 2:
        left, right = args
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and not isinstance(times, bool):
                if nested_size(seq) * times > MAX_LENGTH:
                    raise _too_big()
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_BITS:
            raise _too_big(f"an integer of more than {MAX_BITS} bits")
    elif fn in (math.factorial, math.comb, math.perm) and args:
        n = _int(args[0])
        k = _int(args[1]) if len(args) > 1 and args[1] is not None else n
        if n is not None and k is not None and 0 <= k <= n:
            # bits of n! / (n-k)! (an upper bound of comb too), from log-gamma
            bits = (math.lgamma(n + 1) - math.lgamma(n - k + 1)) / math.log(2)
            if bits > MAX_BITS:
                raise _too_big(f"an integer of more than {MAX_BITS} bits")
    elif fn in (math.prod, math.lcm) and args:
        items = args if fn is math.lcm else args[0]
        if isinstance(items, (list, tuple)) and all(isinstance(i, int) for i in items):
            if sum(abs(i).bit_length() for i in items) > MAX_BITS:
                raise _too_big(f"an integer of more than {MAX_BITS} bits")
    if fn in (list, tuple, sum, min, max, sorted) and args:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(args[0], torch.Tensor) and args[0].dim() and len(args[0]) > MAX_LENGTH:
            raise _too_big()
    if fn is range and len(range(*args)) > MAX_LENGTH:
        raise ExprError("E0505", f"range longer than {MAX_LENGTH}")


def _on_meta(fn: Any, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """While the build runs the graph on the meta device, an explicit `device=` stays there too."""
    torch = sys.modules.get("torch")
    if torch is None or torch.get_default_device().type != "meta":
        return args, kwargs
    if "device" in kwargs:
        kwargs = {**kwargs, "device": "meta"}
    elif inspect.isclass(fn) and args:  # `torch.nn.Linear(4, 4, True, "cpu")`
        try:
            # isclass() narrows fn to type[object], whose unbound __hash__ mypy finds unhashable
            bound = _signature(fn).bind_partial(*args, **kwargs)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return args, kwargs
        if "device" in bound.arguments:
            bound.arguments["device"] = "meta"
            return list(bound.args), dict(bound.kwargs)
    return args, kwargs


@functools.lru_cache(maxsize=512)
def _signature(fn: Any) -> inspect.Signature:
    return inspect.signature(fn)


def call_checked(fn: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Call ``fn`` for a template at build time: operands and tensor sizes estimated first, an
    explicit device kept on the meta device while shape inference runs, the result bounded."""
    while isinstance(fn, functools.partial):
        args, kwargs = [*fn.args, *args], {**fn.keywords, **kwargs}
        fn = fn.func
    _check_operands(fn, args)
    numel = _factory_numel(fn, args, kwargs)
    if numel is not None and numel > MAX_NUMEL:
        raise _too_big(f"a tensor of {numel} elements (more than {MAX_NUMEL})")
    args, kwargs = _on_meta(fn, args, kwargs)
    return guard_value(fn(*args, **kwargs))


def tensor_attribute(value: Any, attr: str) -> Any:
    """`value.attr` in `eval:`: only tensors have attributes there, and only the allowed ones."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        raise ExprError(
            "E0503",
            f"`.{attr}` is read from a value of type `{type(value).__name__}`, not from a tensor",
            "only tensors have attributes",
        )
    if attr not in TENSOR_ATTRIBUTES and attr not in TENSOR_METHODS:  # pragma: no cover - refused by parse
        raise ExprError("E0503", f"`.{attr}` is not one of the tensor attributes and methods a template may use")
    return getattr(value, attr)


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


def sum_operands(expr: Expr) -> tuple[str, str] | None:
    """The two flow names of an expression that is exactly ``a + b`` (two different names), else None."""
    if expr.addresses or len(expr.names) != 2:
        return None
    body = ast.parse(expr.source, mode="eval").body
    if (
        isinstance(body, ast.BinOp)
        and isinstance(body.op, ast.Add)
        and isinstance(body.left, ast.Name)
        and isinstance(body.right, ast.Name)
    ):
        return body.left.id, body.right.id
    return None
