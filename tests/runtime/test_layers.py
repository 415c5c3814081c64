"""Behaviour of the scmc_runtime layer library and version check."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F

import scmc_runtime
from scmc_runtime import layers as L

RUNTIME_SRC = str(Path(__file__).resolve().parents[2] / "runtime" / "src")


def _script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in recent torch
        return torch.jit.script(module)


def _resolve(address: str) -> type:
    module_name, _, name = address.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _assert_same(actual: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected)
    else:
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e)


# --------------------------------------------------------------------------- numeric semantics


def test_add_sums_every_input_with_broadcasting() -> None:
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(3)
    torch.testing.assert_close(L.Add()([a, b, c]), a + b + c)


def test_multiply_multiplies_every_input_with_broadcasting() -> None:
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(3)
    torch.testing.assert_close(L.Multiply()([a, b, c]), a * b * c)


def test_concatenate_defaults_to_the_last_axis() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    torch.testing.assert_close(L.Concatenate()([a, b]), torch.cat([a, b], dim=-1))


def test_concat_is_concatenate_and_honours_dim() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 1, 4)
    assert L.Concat is L.Concatenate
    torch.testing.assert_close(L.Concat(dim=1)([a, b]), torch.cat([a, b], dim=1))


def test_split_by_size_defaults_to_the_last_axis_and_returns_a_list() -> None:
    x = torch.randn(2, 3, 6)
    out = L.Split(2)(x)
    assert isinstance(out, list)
    _assert_same(out, x.split(2, dim=-1))


def test_split_by_sections_honours_dim() -> None:
    x = torch.randn(2, 6, 3)
    _assert_same(L.Split([1, 2, 3], dim=1)(x), x.split([1, 2, 3], dim=1))


def test_reduce_sum_without_dim_sums_everything_and_ignores_keepdim() -> None:
    x = torch.randn(2, 3, 4)
    out = L.ReduceSum(keepdim=True)(x)
    assert out.dim() == 0
    torch.testing.assert_close(out, x.sum())


def test_reduce_sum_over_one_axis_or_several_axes() -> None:
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(L.ReduceSum(1)(x), x.sum(1))
    torch.testing.assert_close(L.ReduceSum((1, 2), keepdim=True)(x), x.sum((1, 2), keepdim=True))


def test_scale_identity_multiplies_by_a_frozen_scalar_by_default() -> None:
    x = torch.randn(2, 3)
    layer = L.ScaleIdentity(0.5)
    torch.testing.assert_close(layer(x), x * 0.5)
    assert layer.scale.shape == () and not layer.scale.requires_grad


def test_scale_identity_scale_is_trainable_on_request() -> None:
    assert L.ScaleIdentity(2.0, trainable=True).scale.requires_grad


def test_channel_last_shuffle_matches_torch_channel_shuffle_on_the_last_axis() -> None:
    x = torch.randn(2, 5, 7, 12)
    expected = torch.nn.ChannelShuffle(3)(x.movedim(-1, 1)).movedim(1, -1)
    torch.testing.assert_close(L.ChannelLastShuffle(3)(x), expected)


def test_permute_dims_exclude_the_batch_axis() -> None:
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(L.Permute((2, 3, 1))(x), x.permute(0, 2, 3, 1))


@pytest.mark.parametrize(("rank", "dims"), [(3, (2, 1)), (4, (2, 3, 1)), (5, (2, 3, 4, 1))])
def test_to_channel_last_becomes_permute_with_rank_specific_dims(rank: int, dims: Tuple[int, ...]) -> None:
    x = torch.randn(*range(2, 2 + rank))
    layer = L.ToChannelLast()
    torch.testing.assert_close(layer(x), x.movedim(1, -1))
    assert type(layer) is L.Permute and layer.dims == dims


@pytest.mark.parametrize(("rank", "dims"), [(3, (2, 1)), (4, (3, 1, 2)), (5, (4, 1, 2, 3))])
def test_to_channel_first_becomes_permute_with_rank_specific_dims(rank: int, dims: Tuple[int, ...]) -> None:
    x = torch.randn(*range(2, 2 + rank))
    layer = L.ToChannelFirst()
    torch.testing.assert_close(layer(x), x.movedim(-1, 1))
    assert type(layer) is L.Permute and layer.dims == dims


def test_unfold_ext_becomes_unfold_and_records_spatial_sizes() -> None:
    x = torch.randn(2, 3, 9, 8)
    layer = L.UnfoldExt(3, padding=1, stride=2)
    torch.testing.assert_close(layer(x), F.unfold(x, 3, padding=1, stride=2))
    assert type(layer) is torch.nn.Unfold
    assert layer.input_size == (9, 8) and layer.output_size == (5, 4)


@pytest.mark.parametrize(
    ("kwargs", "spatial"),
    [({"kernel_size": 3, "padding": 1}, (9, 8)), ({"kernel_size": 3, "stride": 2, "output_padding": 1}, (10, 8))],
)
def test_fold_ext_folds_a_block_grid_back_to_the_unfolded_spatial_size(
    kwargs: Dict[str, int], spatial: Tuple[int, int]
) -> None:
    unfold_kwargs = {k: v for k, v in kwargs.items() if k != "output_padding"}
    x = torch.randn(2, 3, *spatial)
    unfold = L.UnfoldExt(**unfold_kwargs)
    blocks = unfold(x)
    layer = L.FoldExt(**kwargs)
    out = layer(blocks.unflatten(-1, unfold.output_size))
    torch.testing.assert_close(out, F.fold(blocks, spatial, **unfold_kwargs))
    assert type(layer) is L.GridFold and layer.output_size == spatial


def test_fold_ext_rejects_inputs_that_are_not_block_grids() -> None:
    with pytest.raises(ValueError, match="grid"):
        L.FoldExt(2)(torch.randn(2, 12, 16))


@pytest.mark.parametrize(("channels", "bias"), [(1, True), (2, False)])
def test_lazy_layer_norm_normalises_the_last_channels_axes(channels: int, bias: bool) -> None:
    x = torch.randn(2, 3, 4, 5)
    layer = L.LazyLayerNorm(channels, eps=1e-6, bias=bias)
    out = layer(x)
    assert type(layer) is torch.nn.LayerNorm and layer.normalized_shape == x.shape[-channels:]
    assert (layer.bias is None) is not bias
    torch.testing.assert_close(out, F.layer_norm(x, x.shape[-channels:], eps=1e-6))


def test_lazy_layer_norm_without_affine_parameters_still_materializes() -> None:
    x = torch.randn(2, 3, 8)
    layer = L.LazyLayerNorm(elementwise_affine=False)
    torch.testing.assert_close(layer(x), F.layer_norm(x, (8,)))
    assert type(layer) is torch.nn.LayerNorm and layer.weight is None


@pytest.mark.parametrize("elementwise_affine", [True, False])
def test_lazy_rms_norm_normalises_the_last_channels_axes(elementwise_affine: bool) -> None:
    x = torch.randn(2, 3, 4, 5)
    layer = L.LazyRMSNorm(2, elementwise_affine=elementwise_affine)
    out = layer(x)
    assert type(layer) is torch.nn.RMSNorm and layer.normalized_shape == (4, 5)
    torch.testing.assert_close(out, F.rms_norm(x, (4, 5)))


def test_reinmax_returns_a_one_hot_sample_and_the_softmax() -> None:
    logits = torch.randn(2, 3, 7)
    y_hard, y_soft = L.reinmax(logits, tau=2.0)
    assert y_hard.shape == logits.shape
    assert torch.all(y_hard.sum(-1) == 1) and torch.all((y_hard == 0) | (y_hard == 1))
    torch.testing.assert_close(y_soft, logits.softmax(-1))


def test_reinmax_rejects_temperatures_below_one() -> None:
    with pytest.raises(ValueError, match="tau"):
        L.reinmax(torch.randn(2, 3), tau=0.5)


def test_reinmax_gradient_through_the_soft_output_is_the_softmax_gradient() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    weights = torch.randn(4, 5)
    (L.reinmax(logits)[1] * weights).sum().backward()
    expected = torch.autograd.grad((logits.softmax(-1) * weights).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)


def test_reinmax_gradient_through_the_hard_output_follows_the_reinmax_estimator() -> None:
    tau = 1.5
    logits = torch.randn(4, 5, requires_grad=True)
    weights = torch.randn(4, 5)
    y_hard, _ = L.reinmax(logits, tau=tau)
    (y_hard * weights).sum().backward()

    def jacobian(p: torch.Tensor) -> torch.Tensor:  # d softmax / d logits, per row
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    with torch.no_grad():
        pi0 = logits.softmax(-1)
        pi1 = ((logits / tau).softmax(-1) + y_hard) / 2
        grad = 2 * (jacobian(pi1) @ weights.unsqueeze(-1)).squeeze(-1)
        grad -= 0.5 * (jacobian(pi0) @ weights.unsqueeze(-1)).squeeze(-1)
        grad -= grad.mean(-1, keepdim=True)
    torch.testing.assert_close(logits.grad, grad)


def _labels_and_predictions() -> Tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randint(0, 10, (32,)), torch.randn(32, 10)


@pytest.mark.parametrize("form", ["indices", "column", "one_hot"])
def test_sparse_categorical_accuracy_is_the_mean_argmax_hit_rate(form: str) -> None:
    labels, preds = _labels_and_predictions()
    y_true = {"indices": labels, "column": labels[:, None], "one_hot": F.one_hot(labels, 10).float()}[form]
    before = y_true.clone()
    acc = L.sparse_categorical_accuracy(y_true, preds)
    assert acc.dim() == 0 and acc.dtype == torch.float32
    torch.testing.assert_close(acc, (preds.argmax(-1) == labels).float().mean())
    assert torch.equal(y_true, before)  # labels are not modified in place


@pytest.mark.parametrize("form", ["indices", "column", "one_hot"])
def test_sparse_top_k_categorical_accuracy_is_the_mean_top_k_hit_rate(form: str) -> None:
    labels, preds = _labels_and_predictions()
    y_true = {"indices": labels, "column": labels[:, None], "one_hot": F.one_hot(labels, 10).float()}[form]
    for k in (1, 3, 5):
        hits = [labels[i].item() in preds[i].topk(k).indices.tolist() for i in range(len(labels))]
        expected = torch.tensor(sum(hits) / len(hits))
        kwargs = {} if k == 5 else {"k": k}
        torch.testing.assert_close(L.sparse_top_k_categorical_accuracy(y_true, preds, **kwargs), expected)


# --------------------------------------------------------------------------- TorchScript and torch.export

_X = torch.randn(2, 3, 4, 6)

CONCRETE_CASES: Dict[str, Callable[[], Tuple[torch.nn.Module, tuple]]] = {
    "add": lambda: (L.Add(), ([_X, _X, _X],)),
    "multiply": lambda: (L.Multiply(), ([_X, _X],)),
    "concatenate": lambda: (L.Concatenate(dim=1), ([_X, _X],)),
    "split_size": lambda: (L.Split(4), (_X,)),
    "split_sections": lambda: (L.Split([1, 2], dim=1), (_X,)),
    "reduce_sum_all": lambda: (L.ReduceSum(), (_X,)),
    "reduce_sum_axes": lambda: (L.ReduceSum((1, 3), keepdim=True), (_X,)),
    "scale_identity": lambda: (L.ScaleIdentity(3.0), (_X,)),
    "channel_last_shuffle": lambda: (L.ChannelLastShuffle(2), (_X,)),
    "permute": lambda: (L.Permute((3, 1, 2)), (_X,)),
    "grid_fold": lambda: (L.GridFold((4, 6), 3, padding=1), (torch.randn(2, 27, 4, 6),)),
}


def _materialized(lazy: torch.nn.Module, *args: Any) -> torch.nn.Module:
    lazy(*args)
    return lazy


MATERIALIZED_CASES: Dict[str, Callable[[], Tuple[torch.nn.Module, tuple]]] = {
    "to_channel_last": lambda: (_materialized(L.ToChannelLast(), _X), (_X,)),
    "to_channel_first": lambda: (_materialized(L.ToChannelFirst(), _X), (_X,)),
    "fold_ext": lambda: (_materialized(L.FoldExt(2, stride=2), torch.randn(1, 12, 2, 3)), (torch.randn(2, 12, 2, 3),)),
    "unfold_ext": lambda: (_materialized(L.UnfoldExt(3), _X), (_X,)),
    "lazy_layer_norm": lambda: (_materialized(L.LazyLayerNorm(2), _X), (_X,)),
    "lazy_rms_norm": lambda: (_materialized(L.LazyRMSNorm(), _X), (_X,)),
}

ALL_CASES = {**CONCRETE_CASES, **MATERIALIZED_CASES}


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_concrete_modules_compile_with_torchscript_to_the_same_result(name: str) -> None:
    module, args = ALL_CASES[name]()
    _assert_same(_script(module)(*args), module(*args))


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_concrete_modules_export_with_torch_export_to_the_same_result(name: str) -> None:
    module, args = ALL_CASES[name]()
    exported = torch.export.export(module, args)
    _assert_same(exported.module()(*args), module(*args))


# --------------------------------------------------------------------------- materialization on meta

# name -> (lazy factory, input shape, expected (address, kwargs))
LAZY_CASES: Dict[str, Tuple[Callable[[], torch.nn.Module], Tuple[int, ...], Tuple[str, dict]]] = {
    "to_channel_last": (L.ToChannelLast, (2, 3, 4, 5), ("scmc_runtime.layers.Permute", {"dims": (2, 3, 1)})),
    "to_channel_first": (L.ToChannelFirst, (2, 4, 5, 3), ("scmc_runtime.layers.Permute", {"dims": (3, 1, 2)})),
    "unfold_ext": (
        lambda: L.UnfoldExt((3, 3), padding=1),
        (2, 3, 8, 8),
        ("torch.nn.Unfold", {"kernel_size": 3, "padding": 1}),
    ),
    "fold_ext": (
        lambda: L.FoldExt(3, stride=2, output_padding=1),
        (2, 27, 4, 3),
        ("scmc_runtime.layers.GridFold", {"output_size": (10, 8), "kernel_size": 3, "stride": 2}),
    ),
    "lazy_layer_norm": (
        lambda: L.LazyLayerNorm(eps=1e-6),
        (2, 5, 48),
        ("torch.nn.LayerNorm", {"normalized_shape": (48,), "eps": 1e-06, "elementwise_affine": True, "bias": True}),
    ),
    "lazy_layer_norm_two_axes_no_bias": (
        lambda: L.LazyLayerNorm(2, bias=False),
        (2, 5, 6),
        ("torch.nn.LayerNorm", {"normalized_shape": (5, 6), "eps": 1e-05, "elementwise_affine": True, "bias": False}),
    ),
    "lazy_layer_norm_no_affine": (
        lambda: L.LazyLayerNorm(elementwise_affine=False),
        (2, 5, 6),
        ("torch.nn.LayerNorm", {"normalized_shape": (6,), "eps": 1e-05, "elementwise_affine": False, "bias": True}),
    ),
    "lazy_rms_norm": (
        lambda: L.LazyRMSNorm(eps=1e-6),
        (2, 5, 48),
        ("torch.nn.RMSNorm", {"normalized_shape": (48,), "eps": 1e-06, "elementwise_affine": True}),
    ),
    "lazy_rms_norm_default_eps": (
        lambda: L.LazyRMSNorm(2, elementwise_affine=False),
        (2, 5, 6),
        ("torch.nn.RMSNorm", {"normalized_shape": (5, 6), "eps": None, "elementwise_affine": False}),
    ),
    "lazy_linear": (
        lambda: torch.nn.LazyLinear(16, bias=False),
        (2, 5, 7),
        ("torch.nn.Linear", {"in_features": 7, "out_features": 16, "bias": False}),
    ),
    "lazy_conv1d": (
        lambda: torch.nn.LazyConv1d(8, 5, stride=2, padding=2, padding_mode="reflect"),
        (2, 3, 20),
        (
            "torch.nn.Conv1d",
            {
                "in_channels": 3,
                "out_channels": 8,
                "kernel_size": 5,
                "stride": 2,
                "padding": 2,
                "padding_mode": "reflect",
            },
        ),
    ),
    "lazy_conv2d": (
        lambda: torch.nn.LazyConv2d(8, (7, 7), padding="same", groups=2, bias=False),
        (2, 4, 16, 16),
        (
            "torch.nn.Conv2d",
            {"in_channels": 4, "out_channels": 8, "kernel_size": 7, "padding": "same", "groups": 2, "bias": False},
        ),
    ),
    "lazy_conv3d": (
        lambda: torch.nn.LazyConv3d(8, (1, 3, 3), dilation=(1, 2, 2)),
        (2, 3, 4, 9, 9),
        ("torch.nn.Conv3d", {"in_channels": 3, "out_channels": 8, "kernel_size": (1, 3, 3), "dilation": (1, 2, 2)}),
    ),
    "lazy_conv_transpose1d": (
        lambda: torch.nn.LazyConvTranspose1d(8, 4, stride=2, padding=1),
        (2, 3, 10),
        (
            "torch.nn.ConvTranspose1d",
            {"in_channels": 3, "out_channels": 8, "kernel_size": 4, "stride": 2, "padding": 1},
        ),
    ),
    "lazy_conv_transpose2d": (
        lambda: torch.nn.LazyConvTranspose2d(9, 3, stride=2, output_padding=1, groups=3),
        (2, 6, 5, 5),
        (
            "torch.nn.ConvTranspose2d",
            {"in_channels": 6, "out_channels": 9, "kernel_size": 3, "stride": 2, "output_padding": 1, "groups": 3},
        ),
    ),
    "lazy_conv_transpose3d": (
        lambda: torch.nn.LazyConvTranspose3d(4, (2, 3, 3), bias=False),
        (1, 2, 3, 4, 4),
        ("torch.nn.ConvTranspose3d", {"in_channels": 2, "out_channels": 4, "kernel_size": (2, 3, 3), "bias": False}),
    ),
    "lazy_batch_norm1d": (
        lambda: torch.nn.LazyBatchNorm1d(momentum=None),
        (4, 6),
        (
            "torch.nn.BatchNorm1d",
            {"num_features": 6, "eps": 1e-05, "momentum": None, "affine": True, "track_running_stats": True},
        ),
    ),
    "lazy_batch_norm2d": (
        lambda: torch.nn.LazyBatchNorm2d(eps=1e-3, affine=False),
        (2, 6, 4, 4),
        (
            "torch.nn.BatchNorm2d",
            {"num_features": 6, "eps": 0.001, "momentum": 0.1, "affine": False, "track_running_stats": True},
        ),
    ),
    "lazy_batch_norm3d": (
        lambda: torch.nn.LazyBatchNorm3d(),
        (2, 6, 2, 4, 4),
        (
            "torch.nn.BatchNorm3d",
            {"num_features": 6, "eps": 1e-05, "momentum": 0.1, "affine": True, "track_running_stats": True},
        ),
    ),
    "lazy_instance_norm1d": (
        lambda: torch.nn.LazyInstanceNorm1d(),
        (2, 6, 10),
        # torch's lazy instance norms default to affine=True, track_running_stats=True
        (
            "torch.nn.InstanceNorm1d",
            {"num_features": 6, "eps": 1e-05, "momentum": 0.1, "affine": True, "track_running_stats": True},
        ),
    ),
    "lazy_instance_norm2d": (
        lambda: torch.nn.LazyInstanceNorm2d(affine=True, track_running_stats=False),
        (2, 6, 4, 4),
        (
            "torch.nn.InstanceNorm2d",
            {"num_features": 6, "eps": 1e-05, "momentum": 0.1, "affine": True, "track_running_stats": False},
        ),
    ),
    "lazy_instance_norm3d": (
        lambda: torch.nn.LazyInstanceNorm3d(momentum=0.01),
        (2, 6, 2, 4, 4),
        (
            "torch.nn.InstanceNorm3d",
            {"num_features": 6, "eps": 1e-05, "momentum": 0.01, "affine": True, "track_running_stats": True},
        ),
    ),
}


def _state_shapes(module: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(LAZY_CASES))
def test_lazy_modules_materialized_on_meta_yield_a_constructor_that_rebuilds_them(name: str) -> None:
    factory, shape, expected = LAZY_CASES[name]
    with torch.device("meta"):
        # eval mode: a training-mode BatchNorm with momentum=None reads its batch counter, impossible on meta
        module = factory().eval()
        original_cls = type(module)
        out = module(torch.empty(shape))
        address, kwargs = L.concrete_constructor(module, original_cls)
        rebuilt = _resolve(address)(**kwargs).eval()
        rebuilt_out = rebuilt(torch.empty(shape))

    assert (address, kwargs) == expected
    assert type(rebuilt) is type(module)
    assert _state_shapes(rebuilt) == _state_shapes(module)
    assert rebuilt_out.shape == out.shape
    assert all(t.device.type == "meta" for t in module.state_dict().values())


def test_lazy_module_classes_all_have_a_case() -> None:
    lazy_classes = {type(factory()) for factory, _, _ in LAZY_CASES.values()}
    expected = {L.ToChannelLast, L.ToChannelFirst, L.UnfoldExt, L.FoldExt, L.LazyLayerNorm, L.LazyRMSNorm}
    expected |= {getattr(torch.nn, name) for name in dir(torch.nn) if name.startswith("Lazy")}
    assert lazy_classes == expected


def test_concrete_constructor_returns_none_for_classes_that_are_not_lazy() -> None:
    assert L.concrete_constructor(torch.nn.Linear(2, 3), torch.nn.Linear) is None
    assert L.concrete_constructor(L.Permute((1,)), L.Permute) is None


def test_concrete_constructor_rejects_modules_that_are_not_materialized() -> None:
    with pytest.raises(RuntimeError, match="forward"):
        L.concrete_constructor(torch.nn.LazyLinear(3), torch.nn.LazyLinear)


def test_concrete_constructor_rejects_unknown_lazy_classes() -> None:
    class LazyCustom(torch.nn.modules.lazy.LazyModuleMixin, torch.nn.Identity):
        pass

    with pytest.raises(TypeError, match="LazyCustom"):
        L.concrete_constructor(torch.nn.Identity(), LazyCustom)


# --------------------------------------------------------------------------- package surface


def test_layers_exports_every_public_name() -> None:
    defined_here = {
        name
        for name, value in vars(L).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == L.__name__
    }
    assert set(L.__all__) == defined_here


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {RUNTIME_SRC!r}); {code}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_importing_the_package_does_not_import_torch() -> None:
    assert _run_python("import scmc_runtime; print('torch' in sys.modules)") == "False"


def test_importing_layers_pulls_in_nothing_but_torch() -> None:
    code = (
        "import torch; before = set(sys.modules); import scmc_runtime.layers; "
        "print(sorted(m for m in set(sys.modules) - before if not m.startswith('scmc_runtime')))"
    )
    assert _run_python(code) == "[]"


@pytest.mark.parametrize("required", [">=0.1", ">=0.1,<0.2", "==0.1.0", "==0.1", "!=0.2", "> 0.0.9", "<=0.1.0", "<1"])
def test_check_version_accepts_satisfied_requirements(required: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scmc_runtime, "__version__", "0.1.0")
    assert scmc_runtime.check_version(required) is None


@pytest.mark.parametrize("required", [">=0.2", ">=0.1,<0.1.0", "==0.1.1", "!=0.1", ">0.1", "<0.1", "<=0.0.9"])
def test_check_version_rejects_unsatisfied_requirements_with_a_pip_command(
    required: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scmc_runtime, "__version__", "0.1.0")
    with pytest.raises(ImportError, match="0.1.0 is installed") as info:
        scmc_runtime.check_version(required, package="my_model")
    spec = required.replace(" ", "")
    assert f"my_model requires scmc-runtime{spec}" in str(info.value)
    assert f"pip install 'scmc-runtime{spec}'" in str(info.value)


def test_check_version_compares_numerically_and_ignores_pre_release_suffixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scmc_runtime, "__version__", "0.10.0rc1")
    scmc_runtime.check_version(">=0.9,<0.11")
    with pytest.raises(ImportError):
        scmc_runtime.check_version("<0.2")


@pytest.mark.parametrize("required", ["~=0.1", "0.1", ">=0.1;", ">=a.b", ""])
def test_check_version_rejects_malformed_requirements(required: str) -> None:
    with pytest.raises(ValueError, match="invalid version requirement"):
        scmc_runtime.check_version(required)


def test_check_version_with_the_installed_version_passes() -> None:
    scmc_runtime.check_version(f"=={scmc_runtime.__version__}")
