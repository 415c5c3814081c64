"""Every file of a package in memory: the parts compiled and linked, or the build cache's entry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scmc.build.request import BuildRequest, Plan
from scmc.build.stages import compile_parts
from scmc.diagnostics import Diagnostic

if TYPE_CHECKING:
    from scmc.link import BuildInfo


def plan_package(request: BuildRequest) -> Plan:
    """Every generated file of the package, in memory; from the build cache when allowed and unchanged."""
    from scmc import cache

    warnings = []
    refused = cache.refusal() if request.cache else None  # checked before anything is read from it
    if refused is not None:
        warnings.append(Diagnostic("E0950", refused, severity="warning"))
    fingerprint = cache.environment_fingerprint() if request.cache and refused is None else None
    key = cache.request_key(request, fingerprint) if fingerprint is not None else None
    entry = cache.load(key) if key is not None else None
    if entry is not None:
        return Plan(entry.name, entry.files, [], entry.param_count, cached=True)
    with cache.recording(fingerprint) as reads:
        name, compiled, allow = compile_parts(request)
        from scmc.emit.package import package_files  # not needed by a hit
        from scmc.link import link

        package = link(name, compiled, build_info(request), allow)
        files = package_files(package)
    count = next((c.param_count for c in compiled if c.role == "model"), 0)
    if key is not None:
        cache.store(key, reads, name, files, count)
    return Plan(name, files, compiled, count, warnings=warnings + list(package.warnings))


def build_info(request: BuildRequest) -> "BuildInfo":
    from scmc.link import BuildInfo

    return BuildInfo(
        params=tuple(request.params),
        parts=tuple((p.role, p.path) for p in request.parts),
        shapes=tuple(request.shapes.items()),
        allow_modules=tuple(request.allow_modules),
    )
