"""The ``scmc`` command line: parse flags, call the stages, print, set the exit code.

The package, by concern (docs/architecture.md, "scmc/cli/"), each module importing only the ones
before it:

- :mod:`~scmc.cli.conventions`: what every command shares (``-q``/``-v``, colour, shapes, exit statuses);
- :mod:`~scmc.cli.app`: the ``scmc`` group (:func:`main`) and the console entry point (:func:`run`);
- one module per family of commands, each adding its commands to :func:`main`:
  :mod:`~scmc.cli.build` (``build``), :mod:`~scmc.cli.render` (``format``), :mod:`~scmc.cli.export`
  (``export``, ``wheel``), :mod:`~scmc.cli.compat` (``torch create model|backward``),
  :mod:`~scmc.cli.inspect` (``inspect``, ``diff``, ``graph``).

Importing this package registers every command. The stages themselves are imported by the command
that runs them, so ``scmc --help`` or a refused output never pays for torch.
"""

from __future__ import annotations

from scmc.cli import build, compat, export, inspect, render  # noqa: F401  (each registers its commands)
from scmc.cli.app import main, run
from scmc.cli.conventions import paint, use_colour

__all__ = ["main", "paint", "run", "use_colour"]
