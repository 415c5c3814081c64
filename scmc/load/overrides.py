"""``-p`` overrides: parsed, applied to the PARAMETERS blocks of a build's templates, and the ones
that applied nowhere reported."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from scmc.diagnostics import CompileError, Diagnostics, Span, did_you_mean, fail
from scmc.load.common import LAYER_GRAPH_KEYS, shorten
from scmc.load.files import Source
from scmc.load.located import LDict, plain
from scmc.load.parse import parse_yaml

_DOTTED_KEY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\s*=(.*)$", re.S)


@dataclass
class Override:
    """One ``-p`` value: ``key=value``, ``group.key=value`` or a YAML mapping of groups."""

    text: str
    group: str | None = None
    key: str | None = None
    value: Any = None
    groups: dict[str, dict[str, Any]] | None = None  # the upstream form
    applied: set[tuple[str, str]] = field(default_factory=set)  # (group, key) of the upstream form that applied

    def describe(self) -> str:
        return f"-p {shorten(self.text)}"


def parse_override(text: str) -> Override:
    match = _DOTTED_KEY.match(text)
    if match:
        first, second, raw_value = match.groups()
        value = _parse_value(raw_value, text)
        if second is None:
            return Override(text, None, first, value)
        return Override(text, first, second, value)
    value = _parse_value(text, text)
    if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
        raise fail(
            "E0210",
            f"cannot read `-p {shorten(text)}`",
            hint="write `-p key=value`, `-p group.key=value` or `-p 'DEFAULT: {key: value}'`",
        )
    groups = {
        ("default" if k == "DEFAULT" else "_shared_" if k == "SHARED" else str(k)): plain(v or {})
        for k, v in value.items()
    }
    return Override(text, groups=groups)


def _parse_value(raw: str, whole: str) -> Any:
    """A -p value, read as YAML by the same reader as templates (tags refused, aliases counted,
    nesting and integer sizes bounded)."""
    if not raw.strip():
        return None
    try:
        return plain(parse_yaml(raw, "<-p>"))
    except CompileError as exc:
        diag = exc.diagnostics[0]
        if diag.code == "E0100":
            message = diag.message.removeprefix("invalid YAML: ")
            raise fail("E0211", f"the value in `-p {shorten(whole)}` is not valid YAML: {message}") from None
        raise fail(
            "E0211", f"the value in `-p {shorten(whole)}` is not usable: {diag.message}", hint=diag.hint
        ) from None


def parameter_blocks(data: LDict) -> list[LDict]:
    """Every PARAMETERS mapping of a template: the root's and those of its user layers."""
    blocks: list[LDict] = []

    def visit(node: Any) -> None:
        if not isinstance(node, LDict):
            return
        params = node.get("PARAMETERS")
        if isinstance(params, LDict):
            blocks.append(params)
        for key, value in node.items():
            if (
                key != "PARAMETERS"
                and isinstance(key, str)
                and key not in LAYER_GRAPH_KEYS
                and isinstance(value, LDict)
            ):
                visit(value)

    visit(data)
    return blocks


def defined_keys(blocks: list[LDict]) -> set[str]:
    keys: set[str] = set()
    for block in blocks:
        for group in block.values():
            if isinstance(group, dict):
                keys.update(str(k) for k in group)
    return keys


def apply_override(blocks: list[LDict], override: Override, allow_new: bool) -> bool:
    """Apply one override to a template's PARAMETERS blocks. Returns whether it applied.

    The rule (docs/template-language.md, "Parameters and -p precedence"): a value given on the
    command line is never ignored. A bare key (or SHARED) sets the key wherever the block defines
    it; a group's value (`group.key=value`, `'group: {key: value}'`, `'DEFAULT: {...}'`) wins over
    SHARED for that group, as in structcast-model (the command line's groups are merged over the
    template's, SHARED already applied): the key is moved out of SHARED into every group, with
    SHARED's value, before the given group gets its own."""
    items: list[tuple[str | None, str | None, Any]]
    if override.groups is not None:
        items = [(group, key, value) for group, values in override.groups.items() for key, value in values.items()]
    else:
        items = [(override.group, override.key, override.value)]
    applied = False
    for given, key, value in items:
        group = (
            None if given in (None, "_shared_", "SHARED") else "default" if given in ("default", "DEFAULT") else given
        )
        if _apply_one(blocks, group, str(key), value, allow_new):
            applied = True
            override.applied.add((str(given), str(key)))
    return applied


def _apply_one(blocks: list[LDict], group: str | None, key: str, value: Any, allow_new: bool) -> bool:
    import copy

    applied = False
    for block in blocks:
        if not any(isinstance(g, dict) and key in g for g in block.values()):
            continue
        if group is None:
            for target in block.values():
                if isinstance(target, dict) and key in target:
                    target[key] = copy.deepcopy(value)
                    applied = True
            continue
        yaml_group = "DEFAULT" if group == "default" else group
        target = block.get(yaml_group)
        if not isinstance(target, dict):
            if yaml_group != "DEFAULT":
                continue  # this block has no such group (another may; an unknown group is E0214)
            target = LDict(span=block.span)
            block["DEFAULT"] = target
        _unshare(block, key)
        target[key] = copy.deepcopy(value)
        applied = True
    if not applied and allow_new and blocks:
        first = blocks[0]
        name = "DEFAULT" if group in (None, "default") else group
        target = first.get(name)
        if not isinstance(target, dict):
            target = LDict(span=first.span)
            first[name] = target
        target[key] = copy.deepcopy(value)
        applied = True
    return applied


def _unshare(block: LDict, key: str) -> None:
    """Move ``key`` out of SHARED into DEFAULT and every named group of ``block``, each with SHARED's
    value: what every group sees is unchanged, and one group can now be given a value of its own."""
    import copy

    shared, default = block.get("SHARED"), block.get("DEFAULT")
    if not isinstance(shared, dict) or key not in shared:
        return
    if isinstance(default, dict) and key in default:
        return  # the template sets it in both: E0202 says so
    value = shared.pop(key)
    span = shared.key_span(key) if isinstance(shared, LDict) else block.span
    if not isinstance(block.get("DEFAULT"), dict):
        block["DEFAULT"] = LDict(span=span)
    for name, group in list(block.items()):
        if name == "SHARED":
            continue
        if group is None:
            group = block[name] = LDict(span=span)
        if isinstance(group, dict):
            group[key] = copy.deepcopy(value)
            if isinstance(group, LDict):
                group.key_spans.setdefault(key, span)


def check_group_overrides(overrides: list[Override], used: set[str], sources: list[Source], diags: Diagnostics) -> None:
    """A `-p` value for a named group that no Jinja block of the build rendered with would be lost:
    it is an error naming the groups that were used (issue 13: `-p femto.depths=...` with atto selected)."""
    for override in overrides:
        if override.groups is not None:
            names = [g for g in override.groups if g not in ("default", "_shared_", "DEFAULT", "SHARED")]
        elif override.group not in (None, "default", "DEFAULT", "SHARED"):
            names = [override.group]
        else:
            names = []
        for name in names:
            if name in used:
                continue
            chosen = sorted(used - {"default"})
            span, hint = None, ""
            for source in sources:
                for block in parameter_blocks(source.data):
                    if name in block and span is None:
                        span = block.key_span(name)
                    selector = block.get("DEFAULT")
                    if isinstance(selector, dict) and not hint:
                        for key, value in selector.items():
                            if isinstance(value, str) and value in chosen and name in block:
                                hint = f"select it with `-p {key}={name}`, or leave out `{override.describe()}`"
            if chosen:
                what = f"the blocks of this build render with group{'s' if len(chosen) > 1 else ''} " + ", ".join(
                    f"`{g}`" for g in chosen
                )
            else:
                what = "no block of this build renders with a named group (only DEFAULT)"
            diags.error(
                "E0217",
                f"`{override.describe()}` sets group `{name}`, which this build does not use: {what}",
                span,
                hint=hint
                or f"a value for a group that is not used would be ignored; leave out `{override.describe()}`",
            )


def report_unused_overrides(
    overrides: list[Override], used: list[bool], sources: list[Source], diags: Diagnostics
) -> None:
    known: set[str] = set()
    groups: set[str] = set()
    for source in sources:
        blocks = parameter_blocks(source.data)
        known |= defined_keys(blocks)
        for block in blocks:
            groups.update(str(k) for k in block)
    for override, was_used in zip(overrides, used, strict=True):
        first = sources[0] if sources else None
        span = None
        if first is not None:
            params = first.data.get("PARAMETERS")
            span = first.data.key_span("PARAMETERS") if params is not None else Span(first.display, 1, 1)
        if override.groups is not None:  # each (group, key) must apply: one that did not is never silently dropped
            missed = [
                (g, str(k))
                for g, values in override.groups.items()
                for k in values
                if (g, str(k)) not in override.applied
            ]
            for group in dict.fromkeys(g for g, _ in missed if g not in ("default", "_shared_") and g not in groups):
                diags.error(
                    "E0214",
                    f"`{override.describe()}` names group `{group}`, which no template defines",
                    span,
                    hint=did_you_mean(group, groups) or f"groups: {', '.join(sorted(groups))}",
                )
            names = [k for g, k in missed if g in ("default", "_shared_") or g in groups]
            if not names:
                continue
            names = [k for k in names if k not in known] or names
            what = ", ".join(f"`{n}`" for n in names) or "its keys"
            hint = " ".join(filter(None, (did_you_mean(n, known) for n in names)))
            diags.error(
                "E0213",
                f"`{override.describe()}` sets {what}, which no template of this build defines",
                span,
                hint=(hint + " " if hint else "") + "or pass --allow-new-params to add it to DEFAULT",
            )
            continue
        if was_used:
            continue
        if override.group is not None and override.group not in groups and override.group != "default":
            diags.error(
                "E0214",
                f"`{override.describe()}` names group `{override.group}`, which no template defines",
                span,
                hint=did_you_mean(override.group, groups) or f"groups: {', '.join(sorted(groups))}",
            )
            continue
        hint = did_you_mean(override.key or "", known)
        diags.error(
            "E0213",
            f"`{override.describe()}` sets `{override.key}`, which no template of this build defines",
            span,
            hint=(hint + " " if hint else "") + "(or pass --allow-new-params to add it to DEFAULT)",
        )
