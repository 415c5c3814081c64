"""What every part of lowering shares: the grammar's keys, the options, the scope, the diagnostic helper."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scmc.addresses import AllowList
from scmc.diagnostics import Span
from scmc.load import LDict, Source

STEP_KEYS = ("INPUTS", "OUTPUTS", "NAME", "LAYER")
PACKAGE_KEY = "PACKAGE"  # scmc: default loss/metric/backward/data presets of a model template
USER_LAYER_KEYS = ("TYPE", "CFG", "PARAM")
PATTERN_KEYS = ("_addr_", "_file_", "_attr_", "_bind_", "_call_")
MAX_CONSTANT_DEPTH = 64  # nesting of a `constant:` value (later stages walk it recursively)

# Attribute names a layer may not take: they would shadow torch.nn.Module's own.
MODULE_ATTRS = frozenset(n for n in dir(__import__("torch").nn.Module) if not n.startswith("__")) | {"training"}


@dataclass
class Scope:
    """Where a layer graph was written: its file and the user layers it can see."""

    source: Source
    layers: dict[str, tuple[LDict, "Scope | None"]]  # key -> (definition, scope it was defined in)
    chain: tuple[str, ...] = ()  # user layers being built, for cycle detection


@dataclass
class Options:
    allow: AllowList = field(default_factory=AllowList)
    input_shapes: dict[str, Any] | None = None  # -s overrides
    structured: bool | None = None  # --no-structured-output
    max_instances: int = 10_000  # user-layer instances, and layers, per build part
    cfg_dirs: tuple[Path, ...] = ()  # --allow-cfg-dir: folders CFG may read besides the template's own


def _meta_device():
    import torch

    return torch.device("meta")


def _diag(code: str, message: str, span: Span | None, hint: str = ""):
    from scmc.diagnostics import Diagnostic

    return Diagnostic(code, message, span, hint)
