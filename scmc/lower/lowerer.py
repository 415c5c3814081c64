"""The Lowerer: one build part's layer-graph template -> an :class:`~scmc.ir.Instance` tree."""

from __future__ import annotations

from pathlib import Path

from scmc.diagnostics import Diagnostics
from scmc.ir import Instance
from scmc.load import Parameters, Source
from scmc.lower.common import Options, Scope
from scmc.lower.files import TemplateFiles, cfg_roots
from scmc.lower.graphs import GraphLowering
from scmc.lower.layers import LayerLowering
from scmc.lower.signatures import SignatureChecks
from scmc.lower.steps import StepLowering
from scmc.lower.users import UserLayers, graph_keys, user_layer_defs


class Lowerer(UserLayers, GraphLowering, StepLowering, LayerLowering, SignatureChecks, TemplateFiles):
    """Lowers the templates of one build part; made of one class per concern (the bases).

    What it holds is the build part's, shared by every graph it lowers: the options, the
    diagnostics, the instance and layer counts (``--max-instances``), the CFG templates and the
    `_file_` modules read. What belongs to one graph (its scope, parameters, IMPORTS, layers) is a
    :class:`~scmc.lower.common.GraphContext` handed down explicitly.
    """

    def __init__(self, options: Options, diags: Diagnostics):
        self.options = options
        self.diags = diags
        self.instances = 0
        self.layers = 0
        self.templates: dict[Path, Source] = {}  # CFG-included templates, by resolved path
        self.cfg_roots: tuple[Path, ...] = ()  # where CFG may read: the root template's folder + --allow-cfg-dir
        self.files: dict[str, Path] = {}  # `_file_` modules: stem -> path

    def lower_root(self, source: Source, params: Parameters, classname: str, sublayer: str | None = None) -> Instance:
        self.cfg_roots = cfg_roots(source, self.options.cfg_dirs)
        scope = Scope(source, {k: (v, None) for k, v in user_layer_defs(source.data, self.diags).items()})
        for key in scope.layers:
            scope.layers[key] = (scope.layers[key][0], scope)
        if sublayer:
            parts = sublayer.split(".")
            definition, def_scope = self._find_layer(parts, scope, source.data.span)
            # the sublayer is the root of this build: INPUT_SHAPES, --shape and --no-structured-output apply to it
            return self._lower_user(
                definition, def_scope, params, classname, ".".join(parts), source.data.span, is_root=True
            )
        return self._lower_graph(
            graph_keys(source.data), scope, params, template=source.display, class_hint=classname, is_root=True
        )
