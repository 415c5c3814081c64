"""Layers referenced by model templates, plus the lazy-to-concrete constructor protocol.

Every module here is TorchScript- and ``torch.export``-compatible once it is concrete.
Lazy modules (``ToChannelLast``, ``LazyLayerNorm``, ...) turn into a concrete class after
their first forward pass; :func:`concrete_constructor` tells a code generator which
constructor call reproduces the materialized module.
"""

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

__all__ = [
    "Add",
    "ChannelLastShuffle",
    "ClassToken",
    "Concat",
    "Concatenate",
    "FoldExt",
    "GridFold",
    "LazyLayerNorm",
    "LazyRMSNorm",
    "Multiply",
    "Permute",
    "PositionEmbedding",
    "ReduceSum",
    "ScaleIdentity",
    "Split",
    "ToChannelFirst",
    "ToChannelLast",
    "UnfoldExt",
    "concrete_constructor",
    "reinmax",
    "sparse_categorical_accuracy",
    "sparse_top_k_categorical_accuracy",
]

_IntOrTuple = Union[int, Tuple[int, ...]]


# --------------------------------------------------------------------------- element-wise merges


class Add(torch.nn.Module):
    """Element-wise sum of a list of (broadcastable) tensors."""

    def forward(self, inputs: List[Tensor]) -> Tensor:
        result = inputs[0]
        for other in inputs[1:]:
            result = result + other
        return result


class Multiply(torch.nn.Module):
    """Element-wise product of a list of (broadcastable) tensors."""

    def forward(self, inputs: List[Tensor]) -> Tensor:
        result = inputs[0]
        for other in inputs[1:]:
            result = result * other
        return result


class Concatenate(torch.nn.Module):
    """Concatenate a list of tensors along ``dim`` (the last axis by default)."""

    __constants__ = ["dim"]

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, inputs: List[Tensor]) -> Tensor:
        return torch.cat(inputs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


Concat = Concatenate


class Split(torch.nn.Module):
    """Split a tensor into chunks of a given size, or into sections of given sizes, along ``dim``."""

    __constants__ = ["dim"]
    split_size_or_sections: Union[int, List[int]]

    def __init__(self, split_size_or_sections: Union[int, Sequence[int]], dim: int = -1) -> None:
        super().__init__()
        if isinstance(split_size_or_sections, int):
            self.split_size_or_sections = split_size_or_sections
        else:
            self.split_size_or_sections = [int(size) for size in split_size_or_sections]
        self.dim = dim

    def forward(self, input: Tensor) -> List[Tensor]:
        sizes = self.split_size_or_sections
        # Same call twice: TorchScript needs the isinstance refinement to pick the overload.
        if isinstance(sizes, int):
            return list(input.split(sizes, dim=self.dim))
        return list(input.split(sizes, dim=self.dim))

    def extra_repr(self) -> str:
        return f"split_size_or_sections={self.split_size_or_sections}, dim={self.dim}"


# --------------------------------------------------------------------------- simple tensor ops


class ReduceSum(torch.nn.Module):
    """Sum over ``dim`` (an axis or axes); with ``dim=None`` the sum of all elements.

    As in the original layer, ``keepdim`` is ignored when ``dim`` is None (a 0-d tensor is returned).
    """

    __constants__ = ["keepdim"]
    dim: Optional[List[int]]

    def __init__(self, dim: Optional[Union[int, Sequence[int]]] = None, keepdim: bool = False) -> None:
        super().__init__()
        if dim is None:
            self.dim = None
        elif isinstance(dim, int):
            self.dim = [dim]
        else:
            self.dim = [int(axis) for axis in dim]
        self.keepdim = keepdim

    def forward(self, input: Tensor) -> Tensor:
        dim = self.dim
        if dim is None:
            return input.sum()
        return input.sum(dim, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"


class ScaleIdentity(torch.nn.Module):
    """Multiply the input by a scalar ``scale`` (a 0-d parameter, frozen unless ``trainable``)."""

    def __init__(
        self,
        scale: float,
        trainable: bool = False,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale, device=device, dtype=dtype), requires_grad=trainable)

    def forward(self, input: Tensor) -> Tensor:
        return input * self.scale


class ChannelLastShuffle(torch.nn.Module):
    """Channel shuffle over the last axis: split it into ``groups`` groups and interleave them."""

    __constants__ = ["groups"]

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, input: Tensor) -> Tensor:
        channels = input.shape[-1]
        grouped = input.unflatten(-1, [self.groups, channels // self.groups])
        return grouped.transpose(-1, -2).flatten(-2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


# --------------------------------------------------------------------------- permutations


class Permute(torch.nn.Module):
    """Permute the non-batch axes: ``dims`` indexes the input axes, the batch axis 0 stays first.

    ``Permute((2, 3, 1))`` maps ``(N, C, H, W)`` to ``(N, H, W, C)``.
    """

    __constants__ = ["dims"]

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = tuple(int(axis) for axis in dims)

    def forward(self, input: Tensor) -> Tensor:
        return input.permute((0,) + self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


# ``dims`` value of a lazy permutation that has not seen its input yet.
_UNSET_DIMS = (0,)


class ToChannelLast(LazyModuleMixin, Permute):
    """Move the channel axis (1) to the end; becomes a :class:`Permute` once the input rank is known."""

    cls_to_become = Permute  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__(_UNSET_DIMS)

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if self.dims == _UNSET_DIMS:
            self.dims = (*range(2, input.dim()), 1)


class ToChannelFirst(LazyModuleMixin, Permute):
    """Move the last axis to position 1; becomes a :class:`Permute` once the input rank is known."""

    cls_to_become = Permute  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__(_UNSET_DIMS)

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if self.dims == _UNSET_DIMS:
            last = input.dim() - 1
            self.dims = (last, *range(1, last))


# --------------------------------------------------------------------------- fold / unfold


def _per_axis(value: _IntOrTuple, n: int) -> Tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


def _unfold_grid(
    spatial: Sequence[int],
    kernel_size: _IntOrTuple,
    dilation: _IntOrTuple,
    padding: _IntOrTuple,
    stride: _IntOrTuple,
) -> Tuple[int, ...]:
    """Number of sliding-block positions along each spatial axis."""
    n = len(spatial)
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, d, p, s in zip(
            spatial,
            _per_axis(kernel_size, n),
            _per_axis(dilation, n),
            _per_axis(padding, n),
            _per_axis(stride, n),
            strict=False,
        )
    )


def _fold_spatial(
    grid: Sequence[int],
    kernel_size: _IntOrTuple,
    dilation: _IntOrTuple,
    padding: _IntOrTuple,
    stride: _IntOrTuple,
    output_padding: _IntOrTuple,
) -> Tuple[int, ...]:
    """Spatial size whose unfolding gives ``grid`` block positions (transposed-conv arithmetic)."""
    n = len(grid)
    return tuple(
        (blocks - 1) * s - 2 * p + d * (k - 1) + o + 1
        for blocks, k, d, p, s, o in zip(
            grid,
            _per_axis(kernel_size, n),
            _per_axis(dilation, n),
            _per_axis(padding, n),
            _per_axis(stride, n),
            _per_axis(output_padding, n),
            strict=False,
        )
    )


class UnfoldExt(LazyModuleMixin, torch.nn.Unfold):
    """:class:`torch.nn.Unfold` with defaults for every argument; records its spatial sizes.

    After the first forward pass it is a plain :class:`torch.nn.Unfold` (output ``(N, C * prod(k), L)``)
    carrying ``input_size`` (input spatial shape) and ``output_size`` (grid of block positions).
    """

    cls_to_become = torch.nn.Unfold  # type: ignore[assignment]

    def __init__(
        self,
        kernel_size: _IntOrTuple = 1,
        dilation: _IntOrTuple = 1,
        padding: _IntOrTuple = 0,
        stride: _IntOrTuple = 1,
    ) -> None:
        super().__init__(kernel_size, dilation, padding, stride)
        self.input_size: Tuple[int, ...] = ()
        self.output_size: Tuple[int, ...] = ()

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if not self.input_size:
            self.input_size = tuple(input.shape[2:])
            self.output_size = _unfold_grid(self.input_size, self.kernel_size, self.dilation, self.padding, self.stride)


class GridFold(torch.nn.Fold):
    """:class:`torch.nn.Fold` whose input keeps the block grid as spatial axes.

    Input ``(N, C * prod(kernel_size), gh, gw)``, output ``(N, C, *output_size)``.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.fold(input.flatten(2), self.output_size, self.kernel_size, self.dilation, self.padding, self.stride)


class FoldExt(LazyModuleMixin, GridFold):
    """Inverse layout of :class:`UnfoldExt` with the output size inferred from the block grid.

    Takes ``(N, C * prod(kernel_size), gh, gw)`` and becomes a :class:`GridFold` whose ``output_size``
    is the transposed-convolution size of the grid (plus ``output_padding``).
    """

    cls_to_become = GridFold  # type: ignore[assignment]

    def __init__(
        self,
        kernel_size: _IntOrTuple = 1,
        dilation: _IntOrTuple = 1,
        padding: _IntOrTuple = 0,
        stride: _IntOrTuple = 1,
        output_padding: _IntOrTuple = 0,
    ) -> None:
        super().__init__((0, 0), kernel_size, dilation, padding, stride)
        self.output_padding = output_padding
        self.input_size: Tuple[int, ...] = ()

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if self.input_size:
            return
        if input.dim() != 4:
            raise ValueError(
                f"FoldExt expects a (N, C * prod(kernel_size), grid_h, grid_w) input, got shape {tuple(input.shape)}"
            )
        self.input_size = tuple(input.shape[2:])
        self.output_size = _fold_spatial(
            self.input_size, self.kernel_size, self.dilation, self.padding, self.stride, self.output_padding
        )


# --------------------------------------------------------------------------- lazy normalisations


def _uninitialized(device: Optional[Union[torch.device, str]], dtype: Optional[torch.dtype]) -> torch.nn.Parameter:
    """An ``UninitializedParameter`` typed as the ``Parameter`` the base module declares.

    torch's stubs declare no ``device``/``dtype`` keywords for it, though its ``__new__`` takes them.
    """
    param = UninitializedParameter(device=device, dtype=dtype)  # type: ignore[call-arg]
    return cast(torch.nn.Parameter, param)


class LazyLayerNorm(LazyModuleMixin, torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` over the last ``channels`` axes, sized from the first input."""

    cls_to_become = torch.nn.LayerNorm  # type: ignore[assignment]

    def __init__(
        self,
        channels: int = 1,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(0, eps, False, False)
        self.channels = channels
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = _uninitialized(device, dtype)
            if bias:
                self.bias = _uninitialized(device, dtype)

    def reset_parameters(self) -> None:
        if self.normalized_shape != (0,) and not self.has_uninitialized_params():
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if self.normalized_shape != (0,):
            return
        with torch.no_grad():
            self.normalized_shape = tuple(input.shape[-self.channels :])
            if self.elementwise_affine:
                cast(UninitializedParameter, self.weight).materialize(self.normalized_shape)
                if self.bias is not None:
                    cast(UninitializedParameter, self.bias).materialize(self.normalized_shape)
            self.reset_parameters()


class LazyRMSNorm(LazyModuleMixin, torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` over the last ``channels`` axes, sized from the first input."""

    cls_to_become = torch.nn.RMSNorm  # type: ignore[assignment]

    def __init__(
        self,
        channels: int = 1,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(0, eps, False)
        self.channels = channels
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = _uninitialized(device, dtype)

    def reset_parameters(self) -> None:
        if self.normalized_shape != (0,) and not self.has_uninitialized_params():
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        if self.normalized_shape != (0,):
            return
        with torch.no_grad():
            self.normalized_shape = tuple(input.shape[-self.channels :])
            if self.elementwise_affine:
                cast(UninitializedParameter, self.weight).materialize(self.normalized_shape)
            self.reset_parameters()


# --------------------------------------------------------------------------- token sequences (ViT)


class ClassToken(torch.nn.Module):
    """Prepends ``num_tokens`` learned tokens to a ``[B, N, C]`` sequence (a vision transformer's class token).

    Initialized like timm's ``VisionTransformer.cls_token`` (normal, std 1e-6).
    """

    def __init__(self, dim: int, num_tokens: int = 1) -> None:
        super().__init__()
        self.token = torch.nn.Parameter(torch.zeros(1, num_tokens, dim))
        torch.nn.init.normal_(self.token, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class PositionEmbedding(torch.nn.Module):
    """Adds a learned position embedding to a ``[B, prefix + H * W, C]`` token sequence.

    The table covers ``num_prefix_tokens`` (class tokens) and a ``grid_size`` grid of patches,
    initialized like timm's ``pos_embed`` (truncated normal, std 0.02). A sequence of another
    square grid (another image size) gets the patch part resampled bicubically with antialiasing,
    as timm's ``resample_abs_pos_embed`` does; a non-square sequence is an error.
    """

    def __init__(self, dim: int, grid_size: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.weight = torch.nn.Parameter(torch.empty(1, num_prefix_tokens + grid_size * grid_size, dim))
        torch.nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        patches = x.shape[1] - self.num_prefix_tokens
        if patches == self.grid_size * self.grid_size:
            return x + self.weight
        return x + self.resampled(patches)

    def resampled(self, patches: int) -> Tensor:
        side = int(math.sqrt(float(patches)) + 0.5)
        if side * side != patches:
            raise ValueError(f"PositionEmbedding: {patches} patch tokens do not form a square grid")
        prefix = self.weight[:, : self.num_prefix_tokens]
        grid = self.weight[:, self.num_prefix_tokens :].float()
        dim = grid.shape[-1]
        grid = grid.reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, side * side, dim).to(self.weight.dtype)
        return torch.cat([prefix, grid], dim=1)


# --------------------------------------------------------------------------- ReinMax


def _softmax_vjp(grad: Tensor, probs: Tensor) -> Tensor:
    """Vector-Jacobian product with the softmax Jacobian ``diag(p) - p p^T``."""
    weighted = grad * probs
    return weighted - probs * weighted.sum(dim=-1, keepdim=True)


class _ReinMaxFunction(torch.autograd.Function):
    """Categorical sample in the forward pass, second-order ReinMax gradient estimate in the backward pass."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, tau: float) -> Tuple[Tensor, Tensor]:
        probs = logits.softmax(dim=-1)
        index = torch.multinomial(probs, num_samples=1, replacement=True)
        one_hot = torch.zeros_like(probs).scatter_(-1, index, 1.0)
        ctx.tau = tau
        ctx.save_for_backward(logits, probs, one_hot)
        return one_hot, probs

    @staticmethod
    def backward(ctx: Any, grad_hard: Tensor, grad_soft: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        logits, probs, one_hot = ctx.saved_tensors
        midpoint = 0.5 * ((logits / ctx.tau).softmax(dim=-1) + one_hot)
        grad = _softmax_vjp(2.0 * grad_hard, midpoint) + _softmax_vjp(grad_soft - 0.5 * grad_hard, probs)
        return grad - grad.mean(dim=-1, keepdim=True), None


@torch.jit.unused
def reinmax(logits: Tensor, tau: float = 1.0) -> Tuple[Tensor, Tensor]:
    """ReinMax straight-through estimator (Liu et al., 2023, arXiv:2304.08612).

    Returns ``(y_hard, y_soft)``: a one-hot sample drawn from ``softmax(logits)`` along the last
    axis and the softmax itself, both shaped like ``logits``. ``tau`` must be at least 1.
    """
    if tau < 1:
        raise ValueError(f"reinmax needs a temperature tau >= 1, got {tau}")
    shape = logits.shape
    y_hard, y_soft = _ReinMaxFunction.apply(logits.reshape(-1, shape[-1]), float(tau))
    return y_hard.view(shape), y_soft.view(shape)


# --------------------------------------------------------------------------- metrics


def _class_indices(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """Labels as class indices shaped like ``y_pred.shape[:-1]``.

    ``y_true`` may be indices, indices with a trailing singleton axis, or one-hot/probabilities.
    """
    if y_true.dim() == y_pred.dim():
        return y_true.squeeze(-1) if y_true.shape[-1] == 1 else y_true.argmax(dim=-1)
    return y_true


def sparse_categorical_accuracy(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """Fraction (0-d float tensor) of samples whose arg-max prediction equals the label."""
    return (y_pred.argmax(dim=-1) == _class_indices(y_true, y_pred)).float().mean()


def sparse_top_k_categorical_accuracy(y_true: Tensor, y_pred: Tensor, k: int = 5) -> Tensor:
    """Fraction (0-d float tensor) of samples whose label is among the ``k`` highest predictions."""
    labels = _class_indices(y_true, y_pred).reshape(y_pred.shape[:-1]).unsqueeze(-1)
    top_k = y_pred.topk(k, dim=-1).indices
    return (top_k == labels).any(dim=-1).float().mean()


# --------------------------------------------------------------------------- concrete constructors

_Spec = Tuple[str, dict]


def _compact(value: Any) -> Any:
    """Collapse a tuple of equal ints to one int; leave everything else (strings, mixed tuples) as is."""
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        values = tuple(int(v) for v in value)
        return values[0] if len(set(values)) == 1 else values
    return value


def _torch_address(cls: type) -> str:
    return f"torch.nn.{cls.__name__}"


def _own_address(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _with_non_defaults(kwargs: dict, optional: dict, defaults: dict) -> dict:
    """Add to ``kwargs`` the compacted ``optional`` values that differ from ``defaults``."""
    for name, value in optional.items():
        value = _compact(value)
        if value != _compact(defaults[name]):
            kwargs[name] = value
    return kwargs


def _linear(module: Any) -> _Spec:
    return _torch_address(torch.nn.Linear), {
        "in_features": int(module.in_features),
        "out_features": int(module.out_features),
        "bias": module.bias is not None,
    }


def _conv(target: type) -> Callable[[Any], _Spec]:
    transposed = issubclass(target, torch.nn.modules.conv._ConvTransposeNd)

    def spec(module: Any) -> _Spec:
        kwargs = {
            "in_channels": int(module.in_channels),
            "out_channels": int(module.out_channels),
            "kernel_size": _compact(module.kernel_size),
        }
        optional = {
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }
        defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True, "padding_mode": "zeros"}
        if transposed:
            optional["output_padding"] = module.output_padding
            defaults["output_padding"] = 0
        return _torch_address(target), _with_non_defaults(kwargs, optional, defaults)

    return spec


def _batch_norm(target: type) -> Callable[[Any], _Spec]:
    def spec(module: Any) -> _Spec:
        return _torch_address(target), {
            "num_features": int(module.num_features),
            "eps": float(module.eps),
            "momentum": None if module.momentum is None else float(module.momentum),
            "affine": bool(module.affine),
            "track_running_stats": bool(module.track_running_stats),
        }

    return spec


def _layer_norm(module: Any) -> _Spec:
    return _torch_address(torch.nn.LayerNorm), {
        "normalized_shape": tuple(int(v) for v in module.normalized_shape),
        "eps": float(module.eps),
        "elementwise_affine": bool(module.elementwise_affine),
        "bias": module.bias is not None or not module.elementwise_affine,
    }


def _rms_norm(module: Any) -> _Spec:
    return _torch_address(torch.nn.RMSNorm), {
        "normalized_shape": tuple(int(v) for v in module.normalized_shape),
        "eps": None if module.eps is None else float(module.eps),
        "elementwise_affine": bool(module.elementwise_affine),
    }


def _permute(module: Any) -> _Spec:
    return _own_address(Permute), {"dims": tuple(int(v) for v in module.dims)}


def _unfold(module: Any) -> _Spec:
    kwargs = {"kernel_size": _compact(module.kernel_size)}
    optional = {"dilation": module.dilation, "padding": module.padding, "stride": module.stride}
    return _torch_address(torch.nn.Unfold), _with_non_defaults(
        kwargs, optional, {"dilation": 1, "padding": 0, "stride": 1}
    )


def _fold(module: Any) -> _Spec:
    kwargs = {"output_size": _compact(module.output_size), "kernel_size": _compact(module.kernel_size)}
    optional = {"dilation": module.dilation, "padding": module.padding, "stride": module.stride}
    return _own_address(GridFold), _with_non_defaults(kwargs, optional, {"dilation": 1, "padding": 0, "stride": 1})


_CONCRETE: Dict[type, Callable[[Any], _Spec]] = {
    ToChannelLast: _permute,
    ToChannelFirst: _permute,
    UnfoldExt: _unfold,
    FoldExt: _fold,
    LazyLayerNorm: _layer_norm,
    LazyRMSNorm: _rms_norm,
    torch.nn.LazyLinear: _linear,
    torch.nn.LazyConv1d: _conv(torch.nn.Conv1d),
    torch.nn.LazyConv2d: _conv(torch.nn.Conv2d),
    torch.nn.LazyConv3d: _conv(torch.nn.Conv3d),
    torch.nn.LazyConvTranspose1d: _conv(torch.nn.ConvTranspose1d),
    torch.nn.LazyConvTranspose2d: _conv(torch.nn.ConvTranspose2d),
    torch.nn.LazyConvTranspose3d: _conv(torch.nn.ConvTranspose3d),
    torch.nn.LazyBatchNorm1d: _batch_norm(torch.nn.BatchNorm1d),
    torch.nn.LazyBatchNorm2d: _batch_norm(torch.nn.BatchNorm2d),
    torch.nn.LazyBatchNorm3d: _batch_norm(torch.nn.BatchNorm3d),
    torch.nn.LazyInstanceNorm1d: _batch_norm(torch.nn.InstanceNorm1d),
    torch.nn.LazyInstanceNorm2d: _batch_norm(torch.nn.InstanceNorm2d),
    torch.nn.LazyInstanceNorm3d: _batch_norm(torch.nn.InstanceNorm3d),
}


def concrete_constructor(module: torch.nn.Module, original_cls: type) -> Optional[Tuple[str, dict]]:
    """Constructor call that rebuilds ``module``, a materialized instance of the lazy ``original_cls``.

    Returns ``(address, kwargs)`` -- e.g. ``("torch.nn.Linear", {"in_features": 8, ...})`` -- where
    ``address`` is the importable dotted path of the concrete class and ``kwargs`` are plain Python
    values. Returns None when ``original_cls`` is not a lazy module class.

    Raises:
        RuntimeError: ``module`` has not run a forward pass yet.
        TypeError: ``original_cls`` is a lazy class without a known concrete form.
    """
    if not (isinstance(original_cls, type) and issubclass(original_cls, LazyModuleMixin)):
        return None
    spec = _CONCRETE.get(original_cls)
    if spec is None:
        raise TypeError(f"no concrete constructor is known for the lazy module class {original_cls.__qualname__}")
    if isinstance(module, LazyModuleMixin):
        raise RuntimeError(
            f"{type(module).__name__} is not materialized yet: run one forward pass before asking for its constructor"
        )
    return spec(module)
