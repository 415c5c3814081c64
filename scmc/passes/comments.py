"""Carry the template's own comments into the generated code.

A comment block directly above a user layer's key (``# LayerNorm over the channels of an NCHW
tensor.`` above ``LayerNorm2d:``) opens that class's docstring, and the first paragraph of the
file's leading comment opens the root class's; the provenance line (``User layer `Block` of
`cfg/models/ConvNeXtV2.yaml`.``) follows as the docstring's last paragraph. A comment block
directly above a plain FLOW step becomes a ``#`` comment above that step's line in ``forward``.
A comment above a Jinja block describes the block (how it renders), not the code it renders
to, so it is not carried.

The loader keeps every key's line (``LDict.key_spans``) and every step's span; the comments
themselves are read from the template text, which the build already holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from scmc.ir import ModuleDef, Node, Program


def comment_above(lines: Sequence[str], line: int) -> list[str]:
    """The `#` comment lines directly above 1-based LINE (no blank line between), without `# `."""
    found: list[str] = []
    index = line - 2
    while index >= 0 and lines[index].lstrip().startswith("#"):
        found.append(lines[index].lstrip()[1:].removeprefix(" ").rstrip())
        index -= 1
    return list(reversed(found))


def leading_paragraph(lines: Sequence[str]) -> list[str]:
    """The first paragraph of the comment the file opens with (up to an empty `#` line)."""
    found: list[str] = []
    for text in lines:
        if not text.startswith("#"):
            break
        body = text[1:].removeprefix(" ").rstrip()
        if not body:
            if found:
                break
            continue
        found.append(body)
    return found


def _key_line(data: Any, key: str) -> int:
    spans = getattr(data, "key_spans", None) or {}
    span = spans.get(key)
    return span.line if span is not None and span.line > 0 else 0


def _class_comment(module: ModuleDef, root: str, sources: dict[str, Any]) -> list[str]:
    template = module.template
    if module.name == root and template in sources:
        return leading_paragraph(sources[template].text.splitlines())
    display, _, key = template.rpartition(":") if ":" in template else ("", "", template)
    candidates = [sources[display]] if display in sources else list(sources.values())
    for source in candidates:
        line = _key_line(source.data, key)
        if line:
            return comment_above(source.text.splitlines(), line)
    return []


def _with_step_comments(
    graph: tuple[Node, ...], sources: dict[str, Any], seen: set[tuple[str, int]]
) -> tuple[Node, ...]:
    nodes = []
    for node in graph:
        span = node.span
        key = (span.path, span.line)
        if span.note or span.line <= 0 or span.path not in sources or key in seen:
            nodes.append(node)
            continue
        seen.add(key)
        comment = comment_above(sources[span.path].text.splitlines(), span.line)
        nodes.append(dataclasses.replace(node, comment="\n".join(comment)) if comment else node)
    return tuple(nodes)


def carry_comments(program: Program, sources: Sequence[Any]) -> Program:
    """PROGRAM with the comments of SOURCES (the templates it was compiled from) in its docs and steps."""
    by_display = {source.display: source for source in sources}
    modules = []
    for module in program.modules:
        comment = _class_comment(module, program.root, by_display)
        doc = "\n".join(comment) + ("\n\n" + module.doc if module.doc else "") if comment else module.doc
        flow = _with_step_comments(module.flow, by_display, set())
        inference = None if module.inference is None else _with_step_comments(module.inference, by_display, set())
        modules.append(dataclasses.replace(module, doc=doc, flow=flow, inference=inference))
    return dataclasses.replace(program, modules=tuple(modules))
