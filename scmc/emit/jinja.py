"""The Jinja environment of the package skeleton's templates (``scmc/emit/templates``), and
:func:`imported_roots`, which reads back what a generated source imports."""

from __future__ import annotations

import functools
import re
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


@functools.cache
def environment():
    """The one environment of every generated file's template (shared: templates compile once per process)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = repr
    env.filters["regex_escape_stem"] = re.escape
    return env


def imported_roots(source: str) -> list[str]:
    """Top-level modules a Python source imports, in order of first import."""
    import ast

    roots: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        )
        for name in names:
            root = name.split(".")[0]
            if root and root not in roots:
                roots.append(root)
    return roots
