"""Lowering: rendered layer-graph templates -> an :class:`~scmc.ir.Instance` tree.

This is also where the layer-graph language is validated (design.md calls this the
``schema`` stage; the step grammar is positional, so it is checked here by hand with a
diagnostic per mistake rather than through pydantic). Each use of a user layer is rendered
with its own parameters (the parent's, merged with the step's ``PARAM``; the user layer's
own ``PARAMETERS`` are defaults) and lowered to one ``Instance``.

The package, by concern (docs/architecture.md, "scmc/lower/"):

- :mod:`~scmc.lower.common`: the grammar's keys, :class:`Options`, :class:`Scope`, the diagnostic helper;
- :mod:`~scmc.lower.lowerer`: :class:`Lowerer`, the entry point (``lower_root``);
- :mod:`~scmc.lower.users`: user layers (TYPE lookups, CFG includes);
- :mod:`~scmc.lower.graphs`: a layer graph (keys, IMPORTS, INPUTS/OUTPUTS, shapes, data flow);
- :mod:`~scmc.lower.steps`: FLOW steps, their inputs and outputs;
- :mod:`~scmc.lower.layers`: LAYER values (``_obj_`` patterns and their arguments);
- :mod:`~scmc.lower.signatures`: signature and construction checks;
- :mod:`~scmc.lower.files`: the files a template reads (CFG templates, ``_file_`` modules);
- :mod:`~scmc.lower.naming`: class and attribute names.
"""

from __future__ import annotations

from scmc.lower.common import (
    MAX_CONSTANT_DEPTH,
    MODULE_ATTRS,
    PACKAGE_KEY,
    PATTERN_KEYS,
    STEP_KEYS,
    USER_LAYER_KEYS,
    Options,
    Scope,
)
from scmc.lower.files import cfg_roots, display_dir, folder_words
from scmc.lower.lowerer import Lowerer
from scmc.lower.naming import to_pascal
from scmc.lower.users import user_layer_defs

__all__ = [
    "MAX_CONSTANT_DEPTH",
    "MODULE_ATTRS",
    "PACKAGE_KEY",
    "PATTERN_KEYS",
    "STEP_KEYS",
    "USER_LAYER_KEYS",
    "Lowerer",
    "Options",
    "Scope",
    "cfg_roots",
    "display_dir",
    "folder_words",
    "to_pascal",
    "user_layer_defs",
]
