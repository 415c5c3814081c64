"""Comparing outputs: flattening a model's outputs, per-dtype tolerances, the differences found."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

# (atol, rtol) per output dtype; an element passes when |actual - expected| <= atol + rtol * |expected|.
# float32: the runtimes add in different orders and fuse differently (oneDNN/MLAS convolutions,
# LayerNorm and GELU kernels), so errors grow like sqrt(reduction length) * eps(1.2e-7) * |value|
# per layer. Over a ConvNeXt-sized network that is 1e-6..1e-5 on logits of order 1-10, so
# 1e-4 absolute and 1e-3 relative leave a 10-100x margin for trained weights and deeper models,
# while a wrong operator (a dropped bias, a transposed kernel, the wrong LayerNorm eps, a
# mis-exported GELU approximation) moves outputs by 1e-3 and more and is caught.
# Half-precision types have 2^-11 (float16) and 2^-8 (bfloat16) epsilons, scaled alike.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-8, 1e-6),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
EXACT_KINDS = ("int", "uint", "bool")  # integer and boolean outputs must match exactly


def flatten_outputs(out: Any, names: Sequence[str]) -> dict[str, Any]:
    """Model outputs as ``{name: tensor}``: dict keys (nested with dots), else manifest names by position."""
    import torch

    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str, index: list[int]) -> None:
        if isinstance(value, torch.Tensor):
            if prefix:
                key = prefix
            else:
                position = index[0]
                key = names[position] if position < len(names) else f"output_{position}"
            index[0] += 1
            flat[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k), index)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{prefix}.{i}" if prefix else "", index)
        else:
            raise TypeError(f"model output of type {type(value).__name__} cannot be exported")

    walk(out, "", [0])
    return flat


@dataclass
class OutputDiff:
    name: str
    dtype: str
    shape: list[int]
    max_abs: float
    max_rel: float
    worst: float  # max over elements of |a - e| / (atol + rtol |e|): <= 1 passes
    mismatched: int  # elements outside the tolerance
    atol: float
    rtol: float
    problem: str = ""  # a structural problem: missing output, other shape, NaN placement, ...

    @property
    def passed(self) -> bool:
        return not self.problem and self.mismatched == 0

    def as_dict(self) -> dict[str, Any]:
        out = {
            "dtype": self.dtype,
            "shape": self.shape,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "worst_over_tolerance": self.worst,
            "mismatched_elements": self.mismatched,
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
        }
        if self.problem:
            out["problem"] = self.problem
        return out


def tolerance_for(dtype: str) -> tuple[float, float]:
    if dtype.startswith(EXACT_KINDS):
        return 0.0, 0.0
    return TOLERANCES.get(dtype, TOLERANCES["float32"])


def _dtype_name(array: Any) -> str:
    import numpy as np

    if isinstance(array, np.ndarray):
        return str(array.dtype)
    return str(array.dtype).replace("torch.", "")


def _to_numpy(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def compare_outputs(expected: dict[str, Any], actual: dict[str, Any]) -> list[OutputDiff]:
    """Compare every expected output with the actual one; tolerances by the expected dtype.

    ``max_rel`` is over elements whose expected magnitude exceeds ``atol`` (below that the
    absolute tolerance decides). NaN must appear in the same places in both; +-inf must match
    exactly.
    """
    import numpy as np

    diffs = []
    for name, exp_value in expected.items():
        dtype = _dtype_name(exp_value)
        atol, rtol = tolerance_for(dtype)
        exp = _to_numpy(exp_value)
        shape = list(exp.shape)
        act = _to_numpy(actual[name]) if name in actual else None
        if act is None:
            structural = f"output `{name}` is missing (got {', '.join(actual) or 'nothing'})"
        elif list(act.shape) != shape:
            structural = f"shape {list(act.shape)} instead of {shape}"
        else:
            structural = ""
        if structural:  # nothing to compare: every element counts as mismatched
            diffs.append(OutputDiff(name, dtype, shape, math.inf, math.inf, math.inf, exp.size, atol, rtol, structural))
            continue
        assert act is not None  # a missing output is structural
        e = exp.astype(np.float64)
        a = act.astype(np.float64)
        e_nan, a_nan = np.isnan(e), np.isnan(a)
        problem = ""
        if (e_nan != a_nan).any():
            problem = f"NaN in {int((e_nan != a_nan).sum())} places where the other side has a number"
        both = ~(e_nan | a_nan)
        e, a = e[both], a[both]
        with np.errstate(invalid="ignore", over="ignore"):
            inf = np.isinf(e) | np.isinf(a)
            if (inf & (e != a)).any():
                problem = problem or f"infinite values differ in {int((inf & (e != a)).sum())} places"
            e, a = e[~inf], a[~inf]
            diff = np.abs(a - e)
            bound = atol + rtol * np.abs(e)
            max_abs = float(diff.max()) if diff.size else 0.0
            big = np.abs(e) > max(atol, 1e-30)
            max_rel = float((diff[big] / np.abs(e[big])).max()) if big.any() else 0.0
            if bound.size and (bound == 0).any():  # exact dtypes
                over = diff > 0
                worst = math.inf if over.any() else 0.0
            else:
                worst = float((diff / bound).max()) if diff.size else 0.0
                over = diff > bound
        diffs.append(OutputDiff(name, dtype, shape, max_abs, max_rel, worst, int(over.sum()), atol, rtol, problem))
    for name in actual:
        if name not in expected:
            diffs.append(OutputDiff(name, "?", [], 0.0, 0.0, 0.0, 0, 0.0, 0.0, f"unexpected extra output `{name}`"))
    return diffs
