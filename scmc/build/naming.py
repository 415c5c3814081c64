"""The package's import name and class names: the default one, and why a given one cannot be used."""

from __future__ import annotations

import keyword
import re
import sys
import unicodedata
from typing import Any

from scmc.diagnostics import Diagnostics, Span
from scmc.load import Parameters, Source


def package_name(model: Source, groups: Parameters) -> str:
    """`ConvNeXtV2.yaml` with DEFAULT `backbone: femto` -> `convnextv2_femto`."""
    stem = re.sub(r"[^0-9a-zA-Z]+", "_", model.path.stem).strip("_").lower() or "model"
    suffix = []
    default = groups.group("default") or {}
    for value in default.values():
        if isinstance(value, str) and value in groups.groups and value != "default":
            suffix.append(re.sub(r"[^0-9a-zA-Z]+", "_", value).lower())
    name = "_".join([stem, *suffix])
    if name[0].isdigit():
        name = "m_" + name
    return name


# Modules a generated package imports besides its own: a package of the same name would hide them.
IMPORTED_BY_PACKAGES = ("torch", "torchvision", "timm", "numpy", "PIL", "onnxruntime", "onnx", "scmc", "scmc_runtime")


def package_name_problem(name: str) -> str:
    """Why `name` cannot be the import name of a generated package ('' when it can)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return "it is not a lowercase Python identifier"
    if keyword.iskeyword(name):
        return "it is a Python keyword"
    if name.startswith("__"):
        return "Python treats names starting with `__` specially"
    if name in ("test", "tests") or name in sys.stdlib_module_names:
        return "a module of Python's standard library has that name"
    if name.lower() in {m.lower() for m in IMPORTED_BY_PACKAGES} or name in sys.builtin_module_names:
        return "the generated code imports a module of that name"
    return ""


def class_name_problem(name: str) -> str:
    """Why `name` cannot be the class of a generated module ('' when it can)."""
    from scmc.emit.python import RESERVED

    if not name.isidentifier():
        return "it is not a Python identifier"
    if unicodedata.normalize("NFKC", name) != name:
        return f"Python reads it as `{unicodedata.normalize('NFKC', name)}`"
    if keyword.iskeyword(name) or name == "__debug__":
        return "it is a Python keyword"
    if name.startswith("_"):
        return "names starting with `_` are private to the generated modules"
    if name in RESERVED:
        return "the generated code uses that name (a builtin, typing or module name)"
    return ""


def check_backward_losses(bdef: Any, source: Source) -> None:
    """The generated `Backward.__call__(self, <losses>, *, last_in_epoch)` takes each loss by its
    name: a name Python treats specially, or one its body uses (self, update, last_in_epoch, the
    modules it imports), would break backward.py or train.py's keyword call."""
    from scmc.emit.python import RESERVED, addresses_in

    taken = set(RESERVED) | {"self", "update", "last_in_epoch", "scmc_runtime", "contextlib"}
    for opt in bdef.optimizers:
        for ctor in (opt.factory, opt.clip):
            if ctor is not None:
                taken |= {a.split(".")[0] for a in addresses_in(ctor)}
    diags = Diagnostics()
    where = source.data.key_span("BACKWARDS") if "BACKWARDS" in source.data else Span(source.display, 1, 1)
    for name in bdef.losses:
        if name.startswith("__") or keyword.iskeyword(name) or name in taken:
            diags.error(
                "E0931",
                f"loss `{name}` cannot be an argument of the generated `{bdef.classname}.__call__`: "
                + (
                    "Python treats names starting with `__` specially"
                    if name.startswith("__")
                    else "the generated code uses that name"
                ),
                where,
                f"rename the loss output `{name}` (in the loss template and in LOSS here), e.g. to `{name.strip('_')}_loss`",
            )
    diags.raise_if_any()
