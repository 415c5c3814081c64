"""The state and the methods the parts of :class:`~scmc.lower.lowerer.Lowerer` share.

Each part (one class per concern: graphs, steps, layers, user layers, signatures, files) derives
from :class:`LowererBase`, which declares what the build part holds and, for the type checker,
the methods one part calls on another. The methods themselves live in the part that owns them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from scmc.diagnostics import Diagnostics, Span
from scmc.load import Source
from scmc.lower.common import Options

if TYPE_CHECKING:
    import scmc.expr as X
    from scmc.ir import ChildInst, Instance, Node
    from scmc.load import LDict, Parameters
    from scmc.lower.common import GraphContext, Scope


class LowererBase:
    """What one build part's lowering holds; set by :meth:`Lowerer.__init__ <scmc.lower.lowerer.Lowerer>`."""

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
