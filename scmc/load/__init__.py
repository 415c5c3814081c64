"""Load templates: YAML with source positions, parameters, ``-p`` overrides, Jinja.

YAML is read with ruamel.yaml's composer, so every mapping, list and scalar keeps its
line and column; values are rebuilt as :class:`LDict` / :class:`LList` (plain ``dict``
and ``list`` subclasses that remember where their keys and items came from). Only the
standard YAML scalar tags are accepted: a tag that would import or construct an object
is a diagnostic, not a Python object.

Jinja blocks are rendered with structcast's sandboxed environment and its parameter
semantics (``DEFAULT``/``SHARED``/named groups, see :class:`Parameters`). Nodes produced
by a block carry the span of the block itself, so later errors still point into the
YAML file.

The package, by concern (docs/architecture.md, "scmc/load/"), each module importing only
the ones before it:

- :mod:`~scmc.load.common`: the template keys the loader knows, ``shorten``;
- :mod:`~scmc.load.located`: :class:`LDict`, :class:`LList` and their helpers;
- :mod:`~scmc.load.parse`: YAML text -> located values;
- :mod:`~scmc.load.files`: template files (:class:`Source`, :func:`read_template`) and how paths are shown;
- :mod:`~scmc.load.parameters`: :class:`Parameters`;
- :mod:`~scmc.load.overrides`: ``-p`` overrides;
- :mod:`~scmc.load.filters`, :mod:`~scmc.load.sandbox`: the Jinja environment and its size guards;
- :mod:`~scmc.load.budget`: the build's Jinja budget;
- :mod:`~scmc.load.render`: one Jinja block rendered;
- :mod:`~scmc.load.expand`: every block of a template (:func:`expand`), :func:`template_kind`.

What other modules import is re-exported here.
"""

from __future__ import annotations

from scmc.load.budget import build_budget, current_budget
from scmc.load.common import JINJA_KEYS, LAYER_GRAPH_KEYS
from scmc.load.expand import expand, template_kind
from scmc.load.files import Source, display_path, read_template, recorded_path
from scmc.load.located import LDict, LList, plain
from scmc.load.overrides import (
    Override,
    _parse_value,
    apply_override,
    check_group_overrides,
    parameter_blocks,
    parse_override,
    report_unused_overrides,
)
from scmc.load.parameters import Parameters
from scmc.load.parse import parse_yaml
from scmc.load.render import clear_caches
from scmc.load.sandbox import jinja_environment

__all__ = [
    "JINJA_KEYS",
    "LAYER_GRAPH_KEYS",
    "LDict",
    "LList",
    "plain",
    "parse_yaml",
    "Source",
    "display_path",
    "read_template",
    "recorded_path",
    "Parameters",
    "Override",
    "_parse_value",  # lower/steps.py reads a `-p`-like value with it
    "apply_override",
    "check_group_overrides",
    "parameter_blocks",
    "parse_override",
    "report_unused_overrides",
    "jinja_environment",
    "build_budget",
    "current_budget",
    "clear_caches",
    "expand",
    "template_kind",
]
