"""The address allow-list: which dotted names a template may reach.

An address is resolved only after it passes :func:`check_address`: every segment a public
identifier, the root inside the allow-list, and no segment under a refused prefix (names
that load code or data, reach the network, or change global state). Upstream layer paths
``structcast_model.torch.layers.X`` are rewritten to ``scmc_runtime.layers.X``.
"""

from __future__ import annotations

import importlib
import inspect
import keyword
import types
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ALLOWED_ROOTS = ("torch", "torchvision", "timm", "math", "operator", "scmc_runtime")

UPSTREAM_PREFIX = "structcast_model.torch.layers."
RUNTIME_LAYERS = "scmc_runtime.layers"
UPSTREAM_OPTIMIZERS = "structcast_model.torch.optimizers."
RUNTIME_OPTIM = "scmc_runtime.optim"

# Prefixes refused even though their root is allowed. Each loads code or data, reaches the
# network, touches files or processes, or mutates interpreter-wide state.
REFUSED_PREFIXES = (
    "torch.hub",
    "torch.load",
    "torch.save",
    "torch.serialization",
    "torch.jit.load",
    "torch.jit.save",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch.utils.model_zoo",
    "torch.utils.data",
    "torch.utils.tensorboard",
    "torch.utils.benchmark",
    "torch.ops",
    "torch.classes",
    "torch.library",
    "torch.multiprocessing",
    "torch.distributed",
    "torch.backends",
    "torch.cuda.memory",
    "torch.compiler",
    "torch.compile",
    "torch.export",
    "torch.onnx",
    "torch.fx",
    "torch.set_",
    "torch.manual_seed",
    "torch.use_deterministic_algorithms",
    "torch.from_file",
    "torch.storage",
    "torchvision.datasets",
    "torchvision.io",
    "torchvision.models",
    "torchvision.utils",
    "timm.create_model",
    "timm.models",
    "timm.data",
    "timm.utils.model",
    "timm.utils.checkpoint_saver",
    "timm.utils.log",
    "timm.utils.summary",
    "timm.optim",
    "timm.scheduler",
    "timm.list_models",
    "timm.is_model",
    "operator.attrgetter",
    "operator.methodcaller",
    "operator.itemgetter",
)


@dataclass
class AllowList:
    roots: tuple[str, ...] = DEFAULT_ALLOWED_ROOTS
    extra: tuple[str, ...] = ()  # --allow-module
    refused: tuple[str, ...] = REFUSED_PREFIXES
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

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
    if prefix.endswith("_"):
        return address.startswith(prefix)
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
    explicitly_allowed = any(_under(address, root) for root in allow.extra)
    for prefix in allow.refused:
        if _under(address, prefix) and not explicitly_allowed:
            raise AddressError(
                "E0403",
                f"`{address}` is refused: `{prefix.rstrip('_.')}` can load code or data, reach the network or change global state",
                "build-time templates may only name layers and pure functions",
            )
    return address


def resolve(address: str, allow: AllowList) -> Any:
    """Import and return the object an allowed address names."""
    address = check_address(address, allow)
    if address in allow._cache:
        return allow._cache[address]
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
    for index in range(module_end, len(parts)):
        part = parts[index]
        if not hasattr(obj, part):
            where = ".".join(parts[:index])
            from scmc.diagnostics import did_you_mean

            names = [n for n in dir(obj) if not n.startswith("_")]
            raise AddressError("E0406", f"`{where}` has no attribute `{part}`", did_you_mean(part, names))
        obj = getattr(obj, part)
        if isinstance(obj, types.ModuleType) and obj.__name__ != ".".join(parts[: index + 1]):
            # `torch.os` is the `os` module: an alias is checked as what it really is
            _check_canonical(address, ".".join([obj.__name__, *parts[index + 1 :]]), allow)
    if not isinstance(obj, types.ModuleType) and (inspect.isroutine(obj) or inspect.isclass(obj)):
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and module:
            qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "")
            _check_canonical(address, f"{module}.{qualname}" if qualname else module, allow)
    allow._cache[address] = obj
    return obj


# Implementation modules of allowed roots (`operator.add.__module__` is `_operator`).
_IMPLEMENTATION_ROOTS = {"_operator": "operator"}


def _check_canonical(address: str, canonical: str, allow: AllowList) -> None:
    """Where an allowed address really leads (a re-exported module or function) must be allowed too."""
    root, _, rest = canonical.partition(".")
    canonical = _IMPLEMENTATION_ROOTS.get(root, root) + ("." + rest if rest else "")
    if canonical == address:
        return
    roots = allow.all_roots()
    if not any(_under(canonical, r) for r in roots):
        raise AddressError(
            "E0402",
            f"`{address}` leads to `{canonical}`, which is outside the address allow-list",
            f"allowed: {', '.join(roots)}; a module re-exported by an allowed one is not allowed with it",
        )
    if any(_under(canonical, r) for r in allow.extra):
        return
    for prefix in allow.refused:
        if _under(canonical, prefix):
            raise AddressError(
                "E0403",
                f"`{address}` leads to `{canonical}`, which is refused: `{prefix.rstrip('_.')}` can load code or data, "
                "reach the network or change global state",
                "build-time templates may only name layers and pure functions",
            )


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
