"""``scmc build``: templates -> a standalone package, written atomically.

The stages run in order (load, render/lower, materialize, de-duplicate, verify, emit);
each template's diagnostics are collected and reported together, and nothing is written
unless every stage succeeded. The package is assembled in a temporary directory next to
the destination and moved into place with renames, so an interrupted build never leaves a
partial package where a good one was.

The package, by concern (docs/architecture.md, "scmc/build/"), each module importing only
the ones before it:

- :mod:`~scmc.build.request`: :class:`BuildRequest`, :class:`Part`, :class:`Plan`, :class:`InternalError`;
- :mod:`~scmc.build.naming`: the package and class names, and why one cannot be used;
- :mod:`~scmc.build.stages`: the stages for every part (:func:`compile_parts`);
- :mod:`~scmc.build.plan`: every file of the package in memory (:func:`plan_package`, the build cache);
- :mod:`~scmc.build.destination`: what an output may replace (:func:`guard_destination`, :func:`guard_file`);
- :mod:`~scmc.build.write`: the atomic write (:func:`write_package`, :func:`write_text_atomic`);
- :mod:`~scmc.build.commands`: :func:`build`, :func:`check` (``--check``), :func:`create_module` (``scmc torch create``).

What other modules import is re-exported here. Importing it imports no torch: a refusal of the
output comes before anything is compiled.
"""

from __future__ import annotations

from scmc.build.commands import build, check, create_module
from scmc.build.destination import guard_file
from scmc.build.plan import build_info, plan_package
from scmc.build.request import PACKAGE_KEYS, BuildRequest, InternalError, Part, Plan
from scmc.build.stages import compile_parts, compiled_inputs
from scmc.build.write import write_package, write_text_atomic

__all__ = [
    "BuildRequest",
    "InternalError",
    "PACKAGE_KEYS",
    "Part",
    "Plan",
    "build_info",
    "plan_package",
    "compile_parts",
    "compiled_inputs",
    "guard_file",
    "write_package",
    "write_text_atomic",
    "build",
    "check",
    "create_module",
]
