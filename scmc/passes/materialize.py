"""Materialize lazy layers: run the instance tree once on the meta device.

Lazy layers (``torch.nn.LazyConv2d``, the runtime's ``ToChannelLast``...) learn their sizes
from the first input. We build the whole model on the meta device (no memory, no data),
run forward on meta tensors of the declared input shapes, in eval and in training mode,
and replace each lazy constructor with the concrete one it became. The same run records
the types of every instance's inputs and outputs, for annotations.
"""

from __future__ import annotations

import warnings
from typing import Any

from scmc.addresses import AddressError, AllowList
from scmc.diagnostics import CompileError, Diagnostic
from scmc.expr import ExprError
from scmc.ir import ChildInst, Ctor, Instance
from scmc.passes.inplace import add_in_place

BATCH = 2


def _walk(inst: Instance):
    yield inst
    for child in inst.children:
        if child.instance is not None:
            yield from _walk(child.instance)


def lazy_children(root: Instance) -> list[ChildInst]:
    return [c for inst in _walk(root) for c in inst.children if c.lazy]


def _output_shapes(root: Instance, result: Any) -> dict[str, tuple[int, ...]]:
    """The shape (without the batch) of each tensor output of the root, by output name."""
    import torch

    if root.structured and isinstance(result, dict):
        values = [result.get(n) for n in root.outputs]
    elif len(root.outputs) == 1:
        values = [result]
    else:
        values = list(result) if isinstance(result, (tuple, list)) else []
    return {
        n: tuple(int(d) for d in v.shape[1:])
        for n, v in zip(root.outputs, values, strict=False)
        if isinstance(v, torch.Tensor)
    }


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def materialize(root: Instance, allow: AllowList) -> None:
    import torch
    from scmc_runtime.layers import concrete_constructor
    from torch.utils import flop_counter

    from scmc.interp import GraphModule, StepFailed, build_instance

    lazies = lazy_children(root)
    shapes = root.input_shapes
    if not shapes:
        if lazies:
            first = lazies[0]
            assert first.ctor is not None  # a lazy layer is built by a constructor
            raise CompileError(
                [
                    Diagnostic(
                        "E0800",
                        f"lazy layer `{first.ctor.address}` needs input shapes to be materialized ({len(lazies)} lazy layer{'s' if len(lazies) > 1 else ''} in this model)",
                        first.span,
                        f"add INPUT_SHAPES: {{{', '.join(f'{n}: [...]' for n in root.inputs)}}} to the template or pass --shape {root.inputs[0] if root.inputs else 'name'}=C,H,W",
                    )
                ]
            )
        return
    missing = [n for n in root.inputs if n not in shapes]
    if missing:
        raise CompileError(
            [
                Diagnostic(
                    "E0801",
                    f"no input shape for {', '.join(f'`{m}`' for m in missing)}",
                    root.span,
                    "every input needs a shape in INPUT_SHAPES or -s",
                )
            ]
        )
    record: dict[int, tuple[ChildInst, Any, type]] = {}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            live = build_instance(root, allow, record)
    except (ExprError, AddressError) as exc:
        raise CompileError([Diagnostic(exc.code, exc.message, root.span, exc.hint)]) from None
    except Exception as exc:
        raise CompileError(
            [Diagnostic("E0802", f"constructing the model failed: {type(exc).__name__}: {exc}", root.span)]
        ) from None
    inputs = [
        torch.empty((BATCH, *shapes[n]["shape"]), dtype=_dtype(shapes[n]["dtype"]), device="meta") for n in root.inputs
    ]
    for training in (False, True):
        live.train(training)
        try:
            # on the meta device: a tensor made in forward (`eval: x + torch.ones(...)`) takes no memory
            counter = flop_counter.FlopCounterMode(display=False)
            with torch.no_grad(), torch.device("meta"), warnings.catch_warnings(), counter:
                warnings.simplefilter("ignore")
                result = live(*inputs)
            if not training:
                root.output_shapes = _output_shapes(root, result)
                root.macs = counter.get_total_flops() // 2 // BATCH  # for the model card
        except StepFailed as exc:
            if isinstance(exc.error, (ExprError, AddressError)):  # a bound of call_checked, at the step
                raise CompileError(
                    [Diagnostic(exc.error.code, exc.error.message, exc.node.span, exc.error.hint)]
                ) from None
            mode = "training" if training else "inference"
            given = ", ".join(f"{n}={shapes[n]['shape']}" for n in root.inputs)
            raise CompileError(
                [
                    Diagnostic(
                        "E0803",
                        f"shape inference failed in this step ({mode} mode, input shapes {given}): {exc.error.__class__.__name__}: {exc.error}",
                        exc.node.span,
                        "check the layer sizes against the input shapes",
                    )
                ]
            ) from None
    for child, module, cls in record.values():
        if not child.lazy:
            continue
        assert child.ctor is not None  # a lazy layer is built by a constructor
        try:
            spec = concrete_constructor(module, cls)
        except RuntimeError:
            raise CompileError(
                [
                    Diagnostic(
                        "E0804",
                        f"lazy layer `{child.ctor.address}` is never called, so its sizes are unknown",
                        child.span,
                        "call it in FLOW or replace it with the non-lazy layer",
                    )
                ]
            ) from None
        if spec is None:  # pragma: no cover - lazy flag came from the class
            continue
        address, kwargs = spec
        child.ctor = Ctor(address, (), tuple(kwargs.items()))
        child.lazy = False
    for module in live.modules():
        if isinstance(module, GraphModule):
            module.instance.types = dict(module.observed)
            module.instance.matched_sums = {where for where, same in module.sums.items() if same}
    add_in_place(root)  # the shapes it needs are known only here
