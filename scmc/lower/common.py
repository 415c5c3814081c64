"""What every part of lowering shares: the grammar's keys, the options, the scope, the diagnostic helper."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scmc.addresses import AllowList
from scmc.diagnostics import CompileError, Diagnostic, Span
from scmc.ir import ChildInst
from scmc.load import LDict, Parameters, Source

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
class GraphContext:
    """What lowering one layer graph hands to its steps and layers, passed explicitly.

    One per graph (the root, each user-layer instance, each CFG include): the scope it was
    written in, the parameters it was rendered with, its IMPORTS (for ``eval:`` in steps and in
    layer arguments), the layers lowered so far and the names they were given.
    """

    scope: Scope
    params: Parameters
    imports: dict[str, str] = field(default_factory=dict)
    children: list[ChildInst] = field(default_factory=list)
    layers: dict[str, ChildInst | None] = field(default_factory=dict)  # None: its definition failed (reported)

    @property
    def directory(self) -> Path:
        """The folder of the template the graph was written in (`_file_` modules are looked up there)."""
        return self.scope.source.directory


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


def error_at(code: str, message: str, span: Span | None, hint: str = "") -> CompileError:
    """The one way lowering stops at a mistake: ``raise error_at(code, message, span, hint)``.

    Mistakes that do not stop the step (the rest of the graph is still checked) go to the
    build's :class:`~scmc.diagnostics.Diagnostics` with ``diags.error(...)`` instead.
    """
    return CompileError([Diagnostic(code, message, span, hint)])
