"""User layers: the mappings a template defines, TYPE lookups through nested scopes, CFG includes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scmc.diagnostics import CompileError, Diagnostics, Span, did_you_mean
from scmc.ir import Instance
from scmc.load import JINJA_KEYS, LAYER_GRAPH_KEYS, LDict, Parameters, plain
from scmc.lower.common import PACKAGE_KEY, USER_LAYER_KEYS, LowererBase, Scope, error_at
from scmc.lower.naming import to_pascal
from scmc.names import is_name


def graph_keys(data: LDict) -> LDict:
    """The layer graph of a mapping: its layer-graph and Jinja keys (not its user layers), spans kept."""
    graph = LDict({k: v for k, v in data.items() if k in LAYER_GRAPH_KEYS or k in JINJA_KEYS}, span=data.span)
    graph.key_spans = dict(data.key_spans)
    graph.value_spans = dict(data.value_spans)
    return graph


def user_layer_defs(data: LDict, diags: Diagnostics) -> dict[str, LDict]:
    """The user layers a mapping defines: every key that is not a layer-graph key."""
    out: dict[str, LDict] = {}
    for key, value in data.items():
        if key in LAYER_GRAPH_KEYS or key in JINJA_KEYS or key == PACKAGE_KEY:
            continue
        if not isinstance(key, str) or not is_name(key):
            diags.error("E0760", f"user layer name `{key}` is not a valid Python identifier", data.key_span(key))
            continue
        if not isinstance(value, LDict):  # the loader reads every mapping as an LDict
            hint = did_you_mean(key, LAYER_GRAPH_KEYS)
            diags.error(
                "E0761",
                f"top-level key `{key}` is neither a template key nor a user layer (a mapping)",
                data.key_span(key),
                hint or "user layers are mappings with a FLOW",
            )
            continue
        if key.isupper() and key not in ("BACKWARDS",) and did_you_mean(key, LAYER_GRAPH_KEYS) and "FLOW" not in value:
            diags.error(
                "E0762", f"unknown template key `{key}`", data.key_span(key), did_you_mean(key, LAYER_GRAPH_KEYS)
            )
            continue
        out[key] = value
    return out


class UserLayers(LowererBase):
    """User layers: TYPE lookups through the scopes, CFG includes, and their instances.

    A part of :class:`~scmc.lower.lowerer.Lowerer`.
    """

    def _find_layer(self, parts: list[str], scope: Scope, span: Span) -> tuple[LDict, Scope]:
        first, rest = parts[0], parts[1:]
        if first not in scope.layers:
            raise self._unknown_type(first, scope, span)
        definition, def_scope = scope.layers[first]
        def_scope = def_scope or scope
        if not rest:
            return definition, def_scope
        inner = Scope(def_scope.source, dict(def_scope.layers), def_scope.chain)
        for key, value in user_layer_defs(definition, self.diags).items():
            inner.layers[key] = (value, inner)
        return self._find_layer(rest, inner, span)

    def _unknown_type(self, name: str, scope: Scope, span: Span) -> CompileError:
        hint = did_you_mean(name, scope.layers) or (
            f"user layers of this file: {', '.join(sorted(scope.layers))}"
            if scope.layers
            else "this file defines no user layers"
        )
        return error_at("E0700", f"unknown user layer TYPE `{name}`", span, hint)

    def _lower_user(
        self,
        definition: LDict,
        scope: Scope,
        params: Parameters,
        class_hint: str,
        key: str,
        span: Span,
        passed: dict[str, Any] | None = None,
        is_root: bool = False,
    ) -> Instance:
        if key in scope.chain:
            cycle = " -> ".join((*scope.chain[scope.chain.index(key) :], key))
            raise error_at("E0701", f"user layer TYPE cycle: {cycle}", span, "a user layer cannot contain itself")
        own = Parameters.from_raw(
            definition.get("PARAMETERS"),
            definition.key_span("PARAMETERS") if "PARAMETERS" in definition else definition.span,
            self.diags,
        )
        merged = own.merge(params)
        inner = Scope(scope.source, dict(scope.layers), (*scope.chain, key))
        for name, value in user_layer_defs(definition, self.diags).items():
            inner.layers[name] = (value, inner)
        inst = self._lower_graph(
            graph_keys(definition), inner, merged, template=key, class_hint=class_hint, is_root=is_root, use_span=span
        )
        inst.params = dict(passed or {})
        return inst

    def _user_child(self, spec: LDict, scope: Scope, params: Parameters, span: Span) -> Instance:
        """A step's LAYER ``{TYPE: ..., CFG: ..., PARAM: ...}``, lowered with the parent's parameters and PARAM."""
        for k in spec:
            if k not in USER_LAYER_KEYS:
                self.diags.error(
                    "E0702",
                    f"unknown key `{k}` in a user layer",
                    spec.key_span(k),
                    did_you_mean(str(k), USER_LAYER_KEYS) or "a user layer has TYPE, CFG and PARAM",
                )
        type_name = spec.get("TYPE")
        cfg = spec.get("CFG")
        param_raw = spec.get("PARAM")
        passed = Parameters.from_raw(param_raw, spec.key_span("PARAM") if "PARAM" in spec else span, self.diags)
        merged = params.merge(passed)
        passed_default = dict(plain(param_raw).get("DEFAULT") or {}) if isinstance(param_raw, dict) else {}
        if type_name is not None and not isinstance(type_name, str):
            raise error_at("E0703", "TYPE must be a string naming a user layer", spec.value_span("TYPE"))
        if cfg is not None:
            return self._cfg_child(spec, cfg, type_name, scope, merged, passed_default, span)
        if not type_name:
            raise error_at(
                "E0705", "a user layer needs TYPE (or CFG)", span, "write {TYPE: Name, PARAM: {DEFAULT: {...}}}"
            )
        parts = type_name.split(".")
        if not all(parts):
            raise error_at("E0703", f"TYPE `{type_name}` is not a name", spec.value_span("TYPE"))
        definition, def_scope = self._find_layer(parts, scope, spec.value_span("TYPE"))
        def_scope = Scope(def_scope.source, def_scope.layers, scope.chain)  # the caller's chain, to catch cycles
        return self._lower_user(
            definition, def_scope, merged, to_pascal(parts[-1]), type_name, spec.value_span("TYPE"), passed_default
        )

    def _cfg_child(
        self,
        spec: LDict,
        cfg: Any,
        type_name: str | None,
        scope: Scope,
        merged: Parameters,
        passed_default: dict[str, Any],
        span: Span,
    ) -> Instance:
        """``{CFG: file}`` (the file's graph) or ``{CFG: file, TYPE: Name}`` (a user layer of that file)."""
        if not isinstance(cfg, str):
            raise error_at("E0704", "CFG must be a path to a template file", spec.value_span("CFG"))
        path = self._resolve_cfg(cfg, scope.source, spec.value_span("CFG"))
        other = self._read(path)
        other_scope = Scope(other, {}, scope.chain)
        for name, value in user_layer_defs(other.data, self.diags).items():
            other_scope.layers[name] = (value, other_scope)
        own = Parameters.from_raw(other.data.get("PARAMETERS"), other.data.span, self.diags)
        hint = to_pascal(Path(cfg).stem)
        if type_name:
            parts = type_name.split(".")
            definition, def_scope = self._find_layer(parts, other_scope, spec.value_span("TYPE"))
            def_scope = Scope(def_scope.source, def_scope.layers, scope.chain)
            return self._lower_user(
                definition,
                def_scope,
                own.merge(merged),
                hint + to_pascal(parts[-1]),
                f"{other.display}:{type_name}",
                span,
                passed_default,
            )
        key = f"{other.display}"
        if key in scope.chain:
            raise error_at("E0701", f"CFG cycle: {' -> '.join((*scope.chain, key))}", spec.value_span("CFG"))
        other_scope.chain = (*scope.chain, key)
        inst = self._lower_graph(
            graph_keys(other.data),
            other_scope,
            own.merge(merged),
            template=key,
            class_hint=hint,
            is_root=False,
            use_span=span,
        )
        inst.params = passed_default
        return inst
