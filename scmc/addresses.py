"""Capabilities: which objects a template may name, decided by what each object *is*.

An address (``torch.nn.Conv2d``, ``torch.utils.collect_env.run``) is first checked as text by
:func:`check_address`: every segment a public identifier and the root one of the modules scmc
may import to look the name up (``torch``, ``torchvision``, ``timm``, ``math``, ``operator``,
``scmc_runtime`` and what ``--allow-module`` adds). :func:`resolve` then imports and walks it
(attributes are read only from modules and classes) and :func:`classify` decides what the
object it reached may be used as. A template may name:

* ``layer``: a ``torch.nn.Module`` subclass defined in one of the layer libraries
  (:data:`LAYER_LIBRARIES`), minus the wrappers in :data:`EXCLUDED_LAYER_NAMES`;
* ``function``: a reviewed pure tensor function: what torch lists as overridable tensor
  operations of ``torch``, ``torch.nn.functional``, ``torch.linalg``, ``torch.fft`` and
  ``torch.special`` (minus :data:`DENIED_TORCH_FUNCTIONS`), the tensor methods of
  :data:`TENSOR_METHODS` (also spelled unbound, ``torch.Tensor.view``), the functions of
  :data:`MATH_FUNCTIONS` and :data:`OPERATOR_FUNCTIONS` and the public functions of
  ``scmc_runtime.layers``;
* ``factory``: a tensor-creating function of :data:`TENSOR_FACTORIES` (its size is estimated
  before it runs, and at build time it runs on the meta device);
* ``optimizer``, ``scheduler``, ``training``: what backward templates name (``torch.optim``
  optimizer and scheduler classes, the factories of ``scmc_runtime.optim``, gradient clipping);
* ``value``: plain data (numbers, strings, ``torch.float32``, ``torch.channels_last``);
* ``module``: a module, only as an IMPORTS entry (a namespace for names below it);
* ``trusted``: anything defined in (or reached by an address under) a module the user named
  with ``--allow-module``.

Everything else (files, processes, the network, storages, pickles, Python internals) is refused
with E0403, naming the address, what it leads to and what it is. Upstream layer paths
``structcast_model.torch.layers.X`` are rewritten to ``scmc_runtime.layers.X``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import keyword
import types
from dataclasses import dataclass, field
from typing import Any

# Modules scmc may import to look a name up (a name is judged by what it resolves to, below).
DEFAULT_ALLOWED_ROOTS = ("torch", "torchvision", "timm", "math", "operator", "scmc_runtime")

UPSTREAM_PREFIX = "structcast_model.torch.layers."
RUNTIME_LAYERS = "scmc_runtime.layers"
UPSTREAM_OPTIMIZERS = "structcast_model.torch.optimizers."
RUNTIME_OPTIM = "scmc_runtime.optim"

# torch.nn.Module subclasses defined in these modules (their `__module__`) are layers.
LAYER_LIBRARIES = ("torch.nn", "torchvision.ops", "timm.layers", "timm.loss", "scmc_runtime.layers")
# ... except these, which wrap a model for multi-process training (they reach process groups).
EXCLUDED_LAYER_NAMES = ("torch.nn.parallel.DataParallel", "torch.nn.parallel.DistributedDataParallel")

# The namespaces whose overridable tensor operations (torch.overrides) are pure functions.
TORCH_FUNCTION_NAMESPACES = (
    "torch",
    "torch.functional",
    "torch.nn.functional",
    "torch.linalg",
    "torch.fft",
    "torch.special",
)
# Overridable functions of those namespaces that are refused anyway (they reach Python
# objects, global state or devices rather than computing on tensors).
DENIED_TORCH_FUNCTIONS = frozenset({"autocast"})

# Tensor methods a template may call (`x.view(...)` in `eval:`, or unbound as
# `torch.Tensor.view`): computations on the tensor. Not here, so refused: methods that reach
# storage, memory or Python objects (`numpy`, `tolist`, `item`, `storage`, `untyped_storage`,
# `data_ptr`, `set_`, `share_memory_`, `pin_memory`, `resize_`), move data to devices (`cuda`,
# `cpu`, `type`), run callables or autograd (`apply_`, `map_`, `register_hook`, `backward`).
TENSOR_METHODS = frozenset("""
    abs absolute acos acosh add addbmm addcdiv addcmul addmm addmv addr adjoint all allclose amax amin
    aminmax angle any arccos arccosh arcsin arcsinh arctan arctan2 arctanh argmax argmin argsort argwhere
    asin asinh atan atan2 atanh baddbmm bfloat16 bitwise_and bitwise_left_shift bitwise_not bitwise_or
    bitwise_right_shift bitwise_xor bmm bool broadcast_to byte ceil char chunk clamp clamp_max clamp_min
    clip clone conj contiguous copysign cos cosh count_nonzero cross cummax cummin cumprod cumsum deg2rad
    detach diag diag_embed diagflat diagonal diff digamma dim dist div divide dot double dsplit eq equal erf
    erfc erfinv exp exp2 expand expand_as expm1 fix flatten flip fliplr flipud float float_power floor
    floor_divide fmax fmin fmod frac gather gcd ge greater greater_equal gt half heaviside hsplit hypot i0
    index_add index_copy index_fill index_put index_select inner int inverse is_complex is_contiguous
    is_floating_point isclose isfinite isinf isnan isneginf isposinf isreal kron kthvalue lcm ldexp le lerp
    less less_equal lgamma log log10 log1p log2 log_softmax logaddexp logaddexp2 logcumsumexp logdet
    logical_and logical_not logical_or logical_xor logit logsumexp long lt masked_fill masked_scatter
    masked_select matmul matrix_exp matrix_power max maximum mean median min minimum mm mode moveaxis movedim
    msort mul multiply mv nan_to_num nanmean nanmedian nanquantile nansum narrow ndimension ne neg negative
    nelement new_empty new_full new_ones new_zeros nextafter nonzero norm not_equal numel outer permute
    pinverse positive pow prod quantile rad2deg ravel reciprocal relu remainder renorm repeat
    repeat_interleave reshape reshape_as roll rot90 round rsqrt scatter scatter_add scatter_reduce select
    sgn short sigmoid sign signbit sin sinc sinh size slice_scatter softmax sort split sqrt square squeeze
    std sub subtract sum sum_to_size swapaxes swapdims t take take_along_dim tan tanh tensor_split tile to
    topk trace transpose tril triu true_divide trunc type_as unbind unflatten unfold unique
    unique_consecutive unsqueeze var view view_as vsplit where xlogy
    """.split())
# Tensor attributes a template may read in `eval:` (`tokens.shape[1]`, `x.device`).
TENSOR_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "layout", "T", "mT", "H", "mH", "real", "imag"})

# Tensor-creating functions (torch.overrides lists them as "ignored": they take no tensor).
TENSOR_FACTORIES = (
    "arange",
    "bartlett_window",
    "blackman_window",
    "empty",
    "eye",
    "full",
    "hamming_window",
    "hann_window",
    "kaiser_window",
    "linspace",
    "logspace",
    "ones",
    "rand",
    "randint",
    "randn",
    "randperm",
    "scalar_tensor",
    "tensor",
    "as_tensor",
    "tril_indices",
    "triu_indices",
    "zeros",
)
# Other torch functions without tensor arguments that only compute on types and sizes.
TORCH_UTILITIES = ("broadcast_shapes", "can_cast", "get_default_dtype", "is_tensor", "promote_types", "result_type")

MATH_FUNCTIONS = tuple("""
    acos acosh asin asinh atan atan2 atanh cbrt ceil comb copysign cos cosh degrees dist erf erfc exp exp2
    expm1 fabs factorial floor fma fmod frexp fsum gamma gcd hypot isclose isfinite isinf isnan isqrt lcm
    ldexp lgamma log log10 log1p log2 modf nextafter perm pow prod radians remainder sin sinh sqrt sumprod
    tan tanh trunc ulp
    """.split())
# Not here: attrgetter, itemgetter, methodcaller and call (they reach attributes or call
# arbitrary objects), setitem and delitem (they mutate), countOf and indexOf (they iterate a
# tensor element by element).
OPERATOR_FUNCTIONS = tuple("""
    abs add and_ concat contains eq floordiv ge getitem gt index inv invert is_ is_not le length_hint lshift lt
    matmul mod mul ne neg not_ or_ pos pow rshift sub truediv truth xor
    """.split())
# What backward templates name besides optimizer and scheduler classes.
TRAINING_FUNCTIONS = (
    "scmc_runtime.optim.create",
    "scmc_runtime.optim.create_with_scheduler",
    "scmc_runtime.optim.param_groups",
    "torch.nn.utils.clip_grad_norm_",
    "torch.nn.utils.clip_grad_value_",
    "timm.utils.clip_grad.dispatch_clip_grad",
    "timm.utils.agc.adaptive_clip_grad",
)

LAYER_HINT = (
    "templates may construct torch.nn.Module layers of " + ", ".join(LAYER_LIBRARIES) + " and call pure tensor "
    "functions (see docs/security.md, Capabilities)"
)


@dataclass
class AllowList:
    roots: tuple[str, ...] = DEFAULT_ALLOWED_ROOTS
    extra: tuple[str, ...] = ()  # --allow-module
    _cache: dict[tuple[str, bool], Any] = field(default_factory=dict, repr=False)

    def all_roots(self) -> tuple[str, ...]:
        return self.roots + self.extra


class AddressError(Exception):
    def __init__(self, code: str, message: str, hint: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


def normalize(address: str) -> str:
    address = address.strip()
    if address.startswith(UPSTREAM_PREFIX):
        return RUNTIME_LAYERS + "." + address[len(UPSTREAM_PREFIX) :]
    if address.startswith(UPSTREAM_OPTIMIZERS):
        return RUNTIME_OPTIM + "." + address[len(UPSTREAM_OPTIMIZERS) :]
    return address


def _under(address: str, prefix: str) -> bool:
    return address == prefix or address.startswith(prefix + ".")


def check_address(address: str, allow: AllowList) -> str:
    """Validate an address string; returns the normalized address or raises AddressError."""
    address = normalize(address)
    parts = address.split(".")
    if not address or any(not p.isidentifier() or keyword.iskeyword(p) for p in parts):
        raise AddressError("E0400", f"`{address}` is not a dotted Python name")
    for part in parts:
        if part.startswith("_"):
            raise AddressError(
                "E0401",
                f"`{address}` reaches the private name `{part}`",
                "templates may only use public names (no leading underscore)",
            )
    roots = allow.all_roots()
    if not any(_under(address, root) for root in roots):
        raise AddressError(
            "E0402",
            f"`{address}` is outside the address allow-list",
            f"allowed: {', '.join(roots)}; widen it explicitly with --allow-module {parts[0]} if you trust that module",
        )
    return address


def resolve(address: str, allow: AllowList, namespace: bool = False) -> Any:
    """Import and return the object an address names, if a template may use it (:func:`classify`).

    ``namespace``: the address is an IMPORTS entry, which may also be a module."""
    address = check_address(address, allow)
    key = (address, namespace)
    if key in allow._cache:
        return allow._cache[key]
    parts = address.split(".")
    obj: Any = None
    module_end = 0
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and not name.startswith(exc.name) and not exc.name.startswith(name):
                raise AddressError("E0404", f"importing `{name}` failed: {exc}") from None
            continue
        except Exception as exc:  # an allowed module that fails to import
            raise AddressError("E0404", f"importing `{name}` failed: {type(exc).__name__}: {exc}") from None
        module_end = end
        break
    if module_end == 0:
        raise AddressError("E0405", f"no module `{parts[0]}` is installed", f"pip install {parts[0]}")
    canonical = ".".join(parts[:module_end])  # where the address really leads, module aliases spelled out
    for index in range(module_end, len(parts)):
        part = parts[index]
        where = ".".join(parts[:index])
        if not isinstance(obj, types.ModuleType) and not inspect.isclass(obj):
            raise _refused(
                address,
                where,
                f"a {type(obj).__name__} object",
                "templates may reach names of modules and classes only",
            )
        if not hasattr(obj, part):
            from scmc.diagnostics import did_you_mean

            names = [n for n in dir(obj) if not n.startswith("_")]
            raise AddressError("E0406", f"`{where}` has no attribute `{part}`", did_you_mean(part, names))
        obj = getattr(obj, part)
        canonical += "." + part
        if isinstance(obj, types.ModuleType) and obj.__name__ != canonical:
            # `torch.os` is the `os` module: an alias is followed as what it really is
            canonical = _implementation_root(obj.__name__)
            roots = allow.all_roots()
            if not any(_under(canonical, r) for r in roots):
                rest = ".".join([canonical, *parts[index + 1 :]])
                raise AddressError(
                    "E0402",
                    f"`{address}` leads to `{rest}`, which is outside the address allow-list",
                    f"allowed: {', '.join(roots)}; a module re-exported by an allowed one is not allowed with it",
                )
    classify(obj, address, canonical, allow, namespace)
    allow._cache[key] = obj
    return obj


# Implementation modules of allowed roots (`operator.add.__module__` is `_operator`).
_IMPLEMENTATION_ROOTS = {"_operator": "operator"}


def _implementation_root(name: str) -> str:
    root, _, rest = name.partition(".")
    return _IMPLEMENTATION_ROOTS.get(root, root) + ("." + rest if rest else "")


def _refused(address: str, canonical: str, what: str, hint: str = "") -> AddressError:
    lead = f"`{address}` leads to `{canonical}`, which" if canonical != address else f"`{address}`"
    return AddressError("E0403", f"{lead} is refused: it is {what}", hint or LAYER_HINT)


def _defined_in(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    return _implementation_root(module) if isinstance(module, str) else ""


def _spelled(obj: Any) -> str:
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    module = _defined_in(obj)
    return f"{module}.{qualname}" if module and isinstance(qualname, str) else (qualname or type(obj).__name__)


def classify(obj: Any, address: str, canonical: str, allow: AllowList, namespace: bool = False) -> str:
    """What a template may use ``obj`` as (see the module docstring), or AddressError E0403."""
    if isinstance(obj, types.ModuleType):
        if namespace:
            return "module"
        raise _refused(address, canonical, "a module", "name a layer class or a function inside it")
    if allow.extra and (
        any(_under(canonical, r) for r in allow.extra) or any(_under(_defined_in(obj), r) for r in allow.extra)
    ):
        return "trusted"
    if _is_value(obj):
        return "value"
    import sys

    defined = _defined_in(obj)
    widen = (
        f"if you trust `{defined}`, pass --allow-module {defined}"
        if defined in sys.modules and defined not in DEFAULT_ALLOWED_ROOTS
        else "if you need it, wrap it in a layer of a module of your own and pass --allow-module with that module"
    )
    if inspect.isclass(obj):
        import torch

        if issubclass(obj, torch.nn.Module):
            if obj in _excluded_layers():
                raise _refused(address, canonical, "a wrapper for multi-process training", LAYER_HINT)
            if any(_under(defined, lib) for lib in LAYER_LIBRARIES):
                return "layer"
            raise _refused(
                address,
                canonical,
                f"a torch.nn.Module defined in `{defined}`, which is not one of the layer libraries",
                f"layers come from {', '.join(LAYER_LIBRARIES)}; {widen}",
            )
        if _under(defined, "torch.optim"):
            if issubclass(obj, torch.optim.Optimizer):
                return "optimizer"
            if issubclass(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
                return "scheduler"
        raise _refused(address, canonical, f"the class `{_spelled(obj)}`, which is not a torch.nn.Module", widen)
    if callable(obj):
        kind = _functions().get(_key(obj))
        if kind is not None:
            return kind
        if _training_function(obj):
            return "training"
        what = "a function" if inspect.isroutine(obj) else f"a callable {type(obj).__name__} object"
        spelled = _spelled(obj)
        named = f" (`{spelled}`)" if spelled not in (address, canonical) else ""
        raise _refused(
            address,
            canonical,
            f"{what}{named}, not a layer class or one of the reviewed pure tensor functions",
            f"{LAYER_HINT}; {widen}",
        )
    raise _refused(address, canonical, f"a {type(obj).__name__} object, not a layer, a function or a plain value")


def _key(obj: Any) -> Any:
    try:
        hash(obj)
    except TypeError:
        return id(obj)
    return obj


def _is_value(obj: Any) -> bool:
    if obj is None or isinstance(obj, (bool, int, float, complex, str)):
        return True
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, (torch.dtype, torch.memory_format, torch.layout))


@functools.lru_cache(maxsize=1)
def _excluded_layers() -> tuple[type, ...]:
    out = []
    for name in EXCLUDED_LAYER_NAMES:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except Exception:  # pragma: no cover - a torch without it
            continue
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _functions() -> dict[Any, str]:
    """Every callable a template may call, by identity -> its kind."""
    import math
    import operator

    import torch
    import torch.overrides

    out: dict[Any, str] = {}
    namespaces = {getattr(ns, "__name__", ""): fns for ns, fns in torch.overrides.get_overridable_functions().items()}
    for name in TORCH_FUNCTION_NAMESPACES:
        for fn in namespaces.get(name, ()):
            fn_name = getattr(fn, "__name__", "")
            if callable(fn) and not fn_name.startswith("_") and fn_name not in DENIED_TORCH_FUNCTIONS:
                out[_key(fn)] = "function"
    for name in sorted(TENSOR_METHODS):
        method = getattr(torch.Tensor, name, None)
        if method is not None:
            out[_key(method)] = "function"
    for name in TENSOR_FACTORIES:
        if hasattr(torch, name):
            out[_key(getattr(torch, name))] = "factory"
    for name in TORCH_UTILITIES:
        if hasattr(torch, name):
            out[_key(getattr(torch, name))] = "function"
    for name in MATH_FUNCTIONS:
        if hasattr(math, name):
            out[_key(getattr(math, name))] = "function"
    for name in OPERATOR_FUNCTIONS:
        out[_key(getattr(operator, name))] = "function"
    import scmc_runtime.layers as runtime_layers

    for name in runtime_layers.__all__:
        fn = getattr(runtime_layers, name)
        if inspect.isfunction(fn) and name != "concrete_constructor":
            out[_key(fn)] = "function"
    return out


def _training_function(obj: Any) -> bool:
    """One of TRAINING_FUNCTIONS (looked up in modules already imported: naming it imported it)."""
    import sys

    for address in TRAINING_FUNCTIONS:
        module, _, attr = address.rpartition(".")
        if module in sys.modules and getattr(sys.modules[module], attr, None) is obj:
            return True
    return False


def module_of(address: str, obj: Any) -> tuple[str, str]:
    """Split an address into (module to import, attribute path) for emitted code."""
    parts = address.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            importlib.import_module(name)
        except Exception:
            continue
        return name, ".".join(parts[end:])
    return parts[0], ".".join(parts[1:])
