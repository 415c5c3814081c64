"""Parameter groups (``DEFAULT``/``SHARED``/named groups) with structcast's semantics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from scmc.diagnostics import Diagnostics, Span
from scmc.load.located import LDict, plain

_GROUPS_CACHE: dict[str, dict[str, dict[str, Any]]] = {}


def _validated_groups(shared: dict, default: dict, groups: dict) -> dict[str, dict[str, Any]]:
    """structcast's Parameters validation and group merging, memoized: a template renders
    the same user layer with the same parameters many times."""
    from structcast.core.template import Parameters as StructcastParameters

    key = json.dumps([shared, default, groups], sort_keys=True, default=repr)
    if key not in _GROUPS_CACHE:
        _GROUPS_CACHE[key] = StructcastParameters.model_validate(
            {"_shared_": shared, "_default_": default, **groups}
        ).template_kwargs
    return {k: dict(v) for k, v in _GROUPS_CACHE[key].items()}


@dataclass
class Parameters:
    """Parameter groups with structcast's semantics.

    ``groups`` holds ``default`` and every named group, each already merged with SHARED
    (SHARED wins, as in structcast's ``Parameters.template_kwargs``).
    """

    groups: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})

    @classmethod
    def from_raw(cls, raw: Any, span: Span, diags: Diagnostics) -> "Parameters":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            diags.error("E0200", "PARAMETERS must be a mapping of parameter groups", span)
            return cls()
        groups: dict[str, dict[str, Any]] = {}
        for key, value in raw.items():
            if value is None:
                value = {}
            if not isinstance(value, dict):
                where = raw.value_span(key) if isinstance(raw, LDict) else span
                diags.error("E0201", f"parameter group `{key}` must be a mapping, not {type(value).__name__}", where)
                continue
            groups["default" if key == "DEFAULT" else "_shared_" if key == "SHARED" else key] = plain(value)
        shared = groups.pop("_shared_", {})
        default = groups.pop("default", {})
        both = sorted(set(shared) & set(default))
        if both:
            where = raw.key_span("SHARED") if isinstance(raw, LDict) else span
            shared_block = raw.get("SHARED") if isinstance(raw, LDict) else None
            if isinstance(shared_block, LDict):
                where = shared_block.key_span(both[0])  # the key itself, inside SHARED
            default_block = raw.get("DEFAULT") if isinstance(raw, LDict) else None
            also = (
                f" (DEFAULT sets it at line {default_block.key_span(both[0]).line})"
                if isinstance(default_block, LDict)
                else ""
            )
            diags.error(
                "E0202",
                f"parameter{'s' if len(both) > 1 else ''} {', '.join(f'`{k}`' for k in both)} set in both SHARED and DEFAULT",
                where,
                hint=f"keep each key in one of the two groups{also}; SHARED is merged into every group",
            )
            return cls()
        try:
            merged = _validated_groups(shared, default, groups)
        except Exception as exc:
            diags.error("E0203", f"invalid PARAMETERS: {exc}", span)
            return cls()
        return cls({k: dict(v) for k, v in merged.items()})

    def merge(self, other: "Parameters") -> "Parameters":
        """``other`` over ``self``, group by group (structcast's ``Parameters.merge``)."""
        names = list(self.groups) + [k for k in other.groups if k not in self.groups]
        return Parameters({k: {**self.groups.get(k, {}), **other.groups.get(k, {})} for k in names})

    def group(self, name: str | None) -> dict[str, Any] | None:
        return self.groups.get(name or "default")
