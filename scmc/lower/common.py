"""What every part of lowering shares: the grammar's keys, the options, the scope, the diagnostic helper,
and :class:`LowererBase`, the state and cross-part methods of the parts of :class:`~scmc.lower.lowerer.Lowerer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scmc.addresses import AllowList
from scmc.diagnostics import CompileError, Diagnostic, Diagnostics, Span
from scmc.ir import ChildInst
from scmc.load import LDict, Parameters, Source

if TYPE_CHECKING:
    import scmc.expr as X
    from scmc.ir import Instance, Node

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


class LowererBase:
    """What one build part's lowering holds; set by :meth:`Lowerer.__init__ <scmc.lower.lowerer.Lowerer>`.

    Each part of the Lowerer (one class per concern: graphs, steps, layers, user layers,
    signatures, files) derives from it. Besides the state it declares, for the type checker, the
    methods one part calls on another; each is implemented by the part named in its comment.
    """

    options: Options
    diags: Diagnostics
    instances: int  # user-layer instances lowered so far (--max-instances)
    layers: int  # layers lowered so far (--max-instances)
    templates: dict[Path, Source]  # CFG-included templates, by resolved path
    cfg_roots: tuple[Path, ...]  # where CFG may read: the root template's folder + --allow-cfg-dir
    files: dict[str, Path]  # `_file_` modules: stem -> path

    if TYPE_CHECKING:  # implemented by the parts named in each comment

        # GraphLowering
        def _lower_graph(
            self,
            raw: LDict,
            scope: Scope,
            params: Parameters,
            template: str,
            class_hint: str,
            is_root: bool,
            use_span: Span | None = None,
        ) -> Instance: ...

        # StepLowering
        def _flow(self, graph: LDict, key: str, ctx: GraphContext) -> list[Node]: ...

        def _expr(self, text: str, span: Span, imports: dict[str, str], flow: bool) -> X.Expr: ...

        # LayerLowering
        def _layer(self, raw: Any, span: Span, ctx: GraphContext, name: str | None) -> ChildInst: ...

        # UserLayers
        def _user_child(self, spec: LDict, scope: Scope, params: Parameters, span: Span) -> Instance: ...

        # SignatureChecks
        def _check_constructs(self, obj: Any, address: str, args: tuple, kwargs: dict, span: Span) -> None: ...

        def _check_signature(
            self, obj: Any, address: str, args: tuple, kwargs: dict, span: Span, partial: bool
        ) -> None: ...

        # TemplateFiles
        def _resolve_cfg(self, cfg: str, source: Source, span: Span) -> Path: ...

        def _read(self, path: Path) -> Source: ...

        def _file_module(self, file: Any, span: Span, folder: Path | None) -> str: ...
