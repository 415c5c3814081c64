"""Lowering LAYER values: `_obj_` patterns, their `_bind_`/`_call_` arguments, folded `eval:` values."""

from __future__ import annotations

import inspect
from typing import Any

import scmc.expr as X
from scmc.addresses import AddressError, check_address, resolve
from scmc.diagnostics import Span, did_you_mean
from scmc.ir import ChildInst, Ctor, Ref
from scmc.load import LDict, plain
from scmc.lower.common import PATTERN_KEYS, USER_LAYER_KEYS, GraphContext, LowererBase, _meta_device, error_at
from scmc.names import is_name


def _as_value(value: Any, expr: X.Expr, span: Span) -> Any:
    if X.is_plain_literal(value):
        return value
    if isinstance(value, float):  # inf / nan
        return value
    # an allow-listed object reached by name, e.g. torch.float32
    if len(expr.addresses) == 1 and expr.source == expr.addresses[0]:
        return Ref(expr.addresses[0])
    raise error_at(
        "E0752",
        f"eval: `{expr.source}` gives a {type(value).__name__}, not a literal",
        span,
        "layer arguments must fold to numbers, strings, booleans, None or lists of them",
    )


class LayerLowering(LowererBase):
    """LAYER values: `_obj_` patterns and their constructor arguments.

    A part of :class:`~scmc.lower.lowerer.Lowerer`.
    """

    def _layer(self, raw: Any, span: Span, ctx: GraphContext, name: str | None) -> ChildInst:
        if isinstance(raw, LDict) and any(k in raw for k in USER_LAYER_KEYS):  # every loaded mapping is one
            inst = self._user_child(raw, ctx.scope, ctx.params, span)
            return ChildInst(name or "", "user", instance=inst, span=span, name_given=name is not None)
        if isinstance(raw, list) and raw and raw[0] == "_obj_":
            return self._pattern(raw, span, name, ctx)
        raise error_at(
            "E0740",
            "LAYER must be an `_obj_` pattern or a user layer {TYPE: ...}",
            span,
            "e.g. [_obj_, {_addr_: torch.nn.ReLU}, _call_]",
        )

    def _pattern(self, raw: list, span: Span, name: str | None, ctx: GraphContext) -> ChildInst:
        address, obj, call, bind_args, bind_kwargs, call_args, call_kwargs = self._pattern_parts(raw, span, ctx)
        import torch

        is_class = inspect.isclass(obj)
        if is_class and call is None:
            raise error_at(
                "E0741",
                f"`{address}` is a class but the pattern has no `_call_`",
                span,
                f"add `_call_` to construct it: [_obj_, {{_addr_: {address}}}, _call_]",
            )
        args = tuple(bind_args) + tuple(call_args)
        kwargs = {**bind_kwargs, **call_kwargs}
        if call is None:
            if not callable(obj):
                raise error_at("E0742", f"`{address}` is not callable", span)
            self._check_signature(obj, address, args, kwargs, span, partial=True)
            return ChildInst(
                name or "",
                "function",
                Ctor(address, args, tuple(kwargs.items())),
                span=span,
                name_given=name is not None,
            )
        if not is_class:
            raise error_at(
                "E0743",
                f"`{address}` is a function; calling it at build time is not supported",
                span,
                "drop `_call_` to call it in forward, or name a layer class",
            )
        if not issubclass(obj, torch.nn.Module):
            raise error_at(
                "E0744",
                f"`{address}` is not a torch.nn.Module",
                span,
                "layers must be modules; use a function without `_call_` for plain callables",
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

    def _pattern_parts(self, raw: list, span: Span, ctx: GraphContext | None = None):
        """An `_obj_` pattern's address (resolved), object, `_call_` and `_bind_`/`_call_` arguments.

        ``ctx`` is the graph the pattern is written in (its IMPORTS and folder); without one (a
        backward template's factory) there are no IMPORTS and `_file_` looks in the working directory.
        """
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
                    raise error_at("E0746", "a pattern has one `_addr_`", span)
                if not isinstance(item["_addr_"], str):
                    raise error_at("E0746", "`_addr_` must be a dotted name", span)
                address = item["_addr_"]
                if isinstance(item, LDict):
                    addr_span = item.value_span("_addr_")
                file = item.get("_file_")
                continue
            if not isinstance(item, dict) or len(item) != 1:
                raise error_at("E0746", f"pattern step `{plain(item)}` is not one of {', '.join(PATTERN_KEYS)}", span)
            ((key, value),) = item.items()
            if key == "_attr_":
                if not is_name(value) or str(value).startswith("_"):
                    raise error_at("E0401", f"`_attr_: {value}` must be a public attribute name", span)
                attrs.append(value)
            elif key == "_bind_":
                a, k = self._call_values(value, span, ctx)
                bind_args += a
                bind_kwargs.update(k)
            elif key == "_call_":
                a, k = self._call_values(value, span, ctx)
                call = value if value is not None else {}
                call_args += a
                call_kwargs.update(k)
            else:
                raise error_at("E0746", f"unknown pattern key `{key}`", span, did_you_mean(str(key), PATTERN_KEYS))
        if address is None:
            raise error_at("E0747", "the pattern has no `_addr_`", span)
        if file is not None:
            address = self._file_module(file, addr_span, ctx.directory if ctx else None) + "." + address
        full = ".".join([address, *attrs])
        try:
            full = check_address(full, self.options.allow)
            obj = resolve(full, self.options.allow)
        except AddressError as exc:
            raise error_at(exc.code, exc.message, addr_span, exc.hint) from None
        return full, obj, call, bind_args, bind_kwargs, call_args, call_kwargs

    def _call_values(self, value: Any, span: Span, ctx: GraphContext | None) -> tuple[list[Any], dict[str, Any]]:
        if value is None:
            return [], {}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not is_name(k):
                    raise error_at("E0749", f"argument name `{k}` is not a valid Python identifier", span)
                out[k] = self._value(v, span, ctx)
            return [], out
        if isinstance(value, list):
            return [self._value(v, span, ctx) for v in value], {}
        return [self._value(value, span, ctx)], {}

    def _value(self, raw: Any, span: Span, ctx: GraphContext | None = None) -> Any:
        """A constructor argument: a literal, a folded `eval:`, or a nested pattern."""
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("eval:"):
                expr = self._expr(text[5:], span, ctx.imports if ctx else {}, flow=False)
                try:
                    with _meta_device():  # `torch.ones(10**5, 10**5)` folds without allocating
                        value = X.fold(expr, self.options.allow)
                except X.ExprError as exc:
                    raise error_at(exc.code, f"eval: {exc.message}", span, exc.hint) from None
                except X.NotConstant as exc:
                    raise error_at("E0750", f"eval: `{exc}` is not a constant", span) from None
                return _as_value(value, expr, span)
            return raw
        if isinstance(raw, list):
            if raw and raw[0] == "_obj_":
                address, obj, call, bind_args, bind_kwargs, call_args, call_kwargs = self._pattern_parts(raw, span, ctx)
                if call is None and not bind_args and not bind_kwargs:
                    return Ref(address)
                if call is None:

                    return Ctor("functools.partial", (Ref(address), *bind_args), tuple(bind_kwargs.items()))
                from torch.nn.modules.lazy import LazyModuleMixin

                if inspect.isclass(obj) and issubclass(obj, LazyModuleMixin):
                    raise error_at(
                        "E0751",
                        f"lazy layer `{address}` inside an argument cannot be materialized",
                        span,
                        "give it its sizes (use the non-lazy class)",
                    )
                return Ctor(address, tuple(bind_args) + tuple(call_args), tuple({**bind_kwargs, **call_kwargs}.items()))
            return [self._value(v, span, ctx) for v in raw]
        if isinstance(raw, dict):
            return {k: self._value(v, span, ctx) for k, v in raw.items()}
        return raw
