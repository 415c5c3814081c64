"""The inputs an export traces and verifies at: names, shapes (bounded), dtypes, example tensors."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scmc.export.common import _err
from scmc.export.package import MAX_INPUT_DIMS, MAX_INPUT_ELEMENTS, PackageInfo

TRACE_BATCH = 2  # batch 1 would let torch.export specialize the batch dimension to 1
SPATIAL_MULTIPLE = 32  # the second spatial size is 1.25x, rounded to this (typical total stride)


@dataclass
class Inputs:
    names: list[str]
    shapes: dict[str, list[int]]  # without batch
    dtypes: dict[str, Any]

    def make(self, batch: int, seed: int, spatial: dict[str, list[int]] | None = None) -> list[Any]:
        import torch

        generator = torch.Generator().manual_seed(seed)
        tensors = []
        for name in self.names:
            shape = (spatial or {}).get(name, self.shapes[name])
            dtype = self.dtypes[name]
            if dtype.is_floating_point:
                t = torch.randn([batch, *shape], generator=generator).to(dtype)
            else:
                t = torch.randint(0, 10, [batch, *shape], generator=generator).to(dtype)
            tensors.append(t)
        return tensors

    def second_spatial(self) -> dict[str, list[int]]:
        """1.25x every dimension after the first (channels), rounded to a multiple of 32."""
        out = {}
        for name, shape in self.shapes.items():
            new = list(shape[:1])
            for d in shape[1:]:
                target = max(SPATIAL_MULTIPLE, int(round(d * 1.25 / SPATIAL_MULTIPLE)) * SPATIAL_MULTIPLE)
                new.append(target if target != d else d + SPATIAL_MULTIPLE)
            out[name] = new
        return out


def model_inputs(
    model: Any,
    info: PackageInfo,
    overrides: dict[str, list[int]],
    trained_size: Any = None,
    limit: int = MAX_INPUT_ELEMENTS,
    checkpoint: Path | None = None,
) -> tuple[Inputs, str]:
    """The inputs to trace and verify at, and a note on where their shapes came from.

    Shapes: ``-s`` first; else, for an image input (C, H, W), the image size the checkpoint was
    trained at (its ``config.image_size``), since that is the resolution the weights expect;
    else the manifest's ``input_shapes``.
    """
    import torch

    declared = info.input_shapes
    unknown = [k for k in overrides if k not in declared]
    if unknown:
        raise _err(
            "E1110",
            f"-s {unknown[0]}=...: the model has no input `{unknown[0]}` (inputs: {', '.join(declared)})",
            info.manifest_path,
        )
    note = ""
    params = [p for p in inspect.signature(model.forward).parameters if p in declared]
    names = params if sorted(params) == sorted(declared) else list(declared)
    shapes, dtypes = {}, {}
    for name in names:
        shape = list(overrides.get(name, declared[name]["shape"]))
        if len(shape) != len(declared[name]["shape"]):
            raise _err(
                "E1110",
                f"-s {name}={','.join(map(str, shape))}: the model takes {len(declared[name]['shape'])} "
                f"dimensions without the batch ({','.join(map(str, declared[name]['shape']))})",
                info.manifest_path,
            )
        if (
            name not in overrides
            and isinstance(trained_size, int)
            and trained_size > 0
            and len(shape) == 3
            and name == names[0]
            and shape[1:] != [trained_size, trained_size]
        ):
            note = (
                f"`{name}` traced at {shape[0]}x{trained_size}x{trained_size}, the training image size "
                f"(checkpoint config), not the manifest's {'x'.join(map(str, shape))}; -s {name}=C,H,W overrides"
            )
            shape = [shape[0], trained_size, trained_size]
        if name in overrides:
            source, where = f"-s {name}=...", None
        elif shape != list(declared[name]["shape"]):
            source, where = "`config.image_size` of the checkpoint", checkpoint
        else:
            source, where = f"`input_shapes.{name}.shape`", info.manifest_path
        _check_input_size(name, shape, limit, source, where)
        shapes[name] = shape
        dtype = getattr(torch, str(declared[name].get("dtype", "float32")), None)
        dtypes[name] = dtype if isinstance(dtype, torch.dtype) else torch.float32
    return Inputs(names, shapes, dtypes), note


def _check_input_size(name: str, shape: list[Any], limit: int, source: str, where: Path | None) -> None:
    """E1114 unless SHAPE is a few positive ints whose product (one sample) is at most LIMIT."""
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape) or not shape:
        raise _err("E1110", f"{source}: the shape of `{name}` must be positive integers, not {shape!r}", where)
    if len(shape) > MAX_INPUT_DIMS:
        raise _err("E1114", f"{source}: `{name}` has {len(shape)} dimensions, more than {MAX_INPUT_DIMS}", where)
    elements = math.prod(shape)
    if elements > limit:
        raise _err(
            "E1114",
            f"{source}: input `{name}` of shape {'x'.join(map(str, shape))} is {elements:,} values per sample, "
            f"over the limit of {limit:,} (verification runs it at batch 7 and at 1.25x the spatial size)",
            where,
            "pass a smaller -s NAME=C,H,W, or raise the limit with --max-input-elements N",
        )
