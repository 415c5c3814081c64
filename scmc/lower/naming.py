"""Naming: class names for user layers, attribute names for unnamed layers."""

from __future__ import annotations

import builtins
import keyword
import re

from scmc.ir import ChildInst
from scmc.lower.common import MODULE_ATTRS
from scmc.names import ATTRIBUTE, Namespace, to_snake


def to_pascal(name: str) -> str:
    parts = re.split(r"[^0-9A-Za-z]+", name)
    out = "".join(p[:1].upper() + p[1:] for p in parts if p)
    if not out or not out[0].isalpha():
        out = "Layer" + out
    return out


def auto_name(children: list[ChildInst]) -> None:
    """Give each layer the step did not name an attribute name: snake_case of its class, numbered on collisions."""
    attributes = Namespace((c.attr for c in children if c.name_given), numbering=ATTRIBUTE)
    for child in children:
        if child.name_given:
            continue
        if child.kind == "user":
            base = to_snake(child.instance.class_hint if child.instance else "layer")
        else:
            assert child.ctor is not None  # module and function children are built by a constructor
            last = child.ctor.address.split(".")[-1]
            if last.startswith("Lazy") and len(last) > 4:
                last = last[4:]
            base = to_snake(last)
        if base in MODULE_ATTRS or keyword.iskeyword(base) or base in dir(builtins):
            base = base + "_layer"
        child.attr = attributes.fresh(base)  # conv, conv_1, conv_2
