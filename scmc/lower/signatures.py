"""Signature checks: constructor arguments bound against the signature, and a construction on the meta device."""

from __future__ import annotations

import inspect
import re
from typing import Any

import scmc.expr as X
from scmc.addresses import AddressError
from scmc.diagnostics import Span, did_you_mean
from scmc.lower.common import LowererBase, error_at


class SignatureChecks(LowererBase):
    """Constructor and call signatures, checked at build time (the meta device).

    A part of :class:`~scmc.lower.lowerer.Lowerer`.
    """

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
            raise error_at(exc.code, exc.message, span, exc.hint) from None
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
            raise error_at(
                "E0753", f"constructing `{address}` failed: {type(exc).__name__}: {detail}", span, hint
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
                raise error_at(
                    "E0745",
                    f"`{address}` has no parameter `{unknown[0]}`",
                    span,
                    did_you_mean(unknown[0], params) or f"parameters: {', '.join(params)}",
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
            raise error_at(
                "E0745",
                f"arguments do not fit `{address}({shown})`: {exc}",
                span,
                hint or f"parameters: {', '.join(params)}",
            ) from None
