"""The dependency rule of scmc/ (docs/architecture.md, "Dependency rule"), read from the sources.

Every ``import`` of every module under scmc/ -- at module level and inside functions, classes
and ``if TYPE_CHECKING:`` blocks alike -- is parsed with ``ast``. A module may import modules
of its own layer or of lower layers, never of a higher one, and the imports may not form a
cycle. ``export`` is apart: it may use only ``diagnostics`` (and the package's version) of the
compiler, plus the runtime. A new module must be given a layer in ``LAYERS``.

Known exceptions are listed in ``ALLOWED_UPWARD`` with the reason each is still there; an
entry that no longer occurs fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scmc"

# Lowest first: a module may import from its own layer and the layers before it.
LAYER_ORDER = (
    "diagnostics",
    "names/addresses/expr",
    "load",
    "schema",
    "ir",
    "lower",
    "passes",
    "emit",
    "pipeline",
    "output/cache",
    "cli",
)
LAYERS = {
    "scmc": "diagnostics",  # the package itself: __version__ only
    "scmc.diagnostics": "diagnostics",
    "scmc.limits": "diagnostics",  # the table of limits (standard library)
    "scmc.names": "names/addresses/expr",
    "scmc.addresses": "names/addresses/expr",
    "scmc.expr": "names/addresses/expr",
    "scmc.load": "load",  # the package: re-exports what the later stages use
    "scmc.load.common": "load",
    "scmc.load.located": "load",
    "scmc.load.parse": "load",
    "scmc.load.files": "load",
    "scmc.load.parameters": "load",
    "scmc.load.overrides": "load",
    "scmc.load.filters": "load",
    "scmc.load.sandbox": "load",
    "scmc.load.budget": "load",
    "scmc.load.render": "load",
    "scmc.load.expand": "load",
    "scmc.schema": "schema",
    "scmc.ir": "ir",
    "scmc.interp": "ir",  # runs the IR; used by lowering (constant folding) and materialization
    "scmc.lower": "lower",  # the package: re-exports Lowerer, Options, cfg_roots and the grammar's keys
    "scmc.lower.common": "lower",
    "scmc.lower.naming": "lower",
    "scmc.lower.grammar": "lower",
    "scmc.lower.files": "lower",
    "scmc.lower.signatures": "lower",
    "scmc.lower.layers": "lower",
    "scmc.lower.steps": "lower",
    "scmc.lower.graphs": "lower",
    "scmc.lower.users": "lower",
    "scmc.lower.lowerer": "lower",
    "scmc.backward": "lower",  # lowers backward templates to ir.BackwardDef
    "scmc.passes": "passes",
    "scmc.passes.materialize": "passes",
    "scmc.passes.dedup": "passes",
    "scmc.passes.identity": "passes",
    "scmc.passes.inplace": "passes",
    "scmc.passes.comments": "passes",
    "scmc.passes.stages": "passes",  # repeated blocks as nn.Sequential stages (called by emit/python)
    "scmc.link": "passes",  # the link stage: the lowered parts -> one PackageDef
    "scmc.emit": "emit",
    "scmc.emit.jinja": "emit",
    "scmc.emit.python": "emit",
    "scmc.emit.backward": "emit",
    "scmc.emit.train": "emit",
    "scmc.emit.predict": "emit",
    "scmc.emit.package": "emit",
    "scmc.build": "pipeline",  # the package: re-exports what the CLI, inspection and watch use
    "scmc.build.request": "pipeline",
    "scmc.build.naming": "pipeline",
    "scmc.build.stages": "pipeline",
    "scmc.build.plan": "pipeline",
    "scmc.build.destination": "pipeline",
    "scmc.build.write": "pipeline",
    "scmc.build.commands": "pipeline",
    "scmc.cache": "output/cache",
    "scmc.inspection": "output/cache",  # scmc inspect/diff: runs the pipeline in memory, imports what it built
    "scmc.wheel": "output/cache",  # scmc wheel: a built package (and the runtime) as wheels
    "scmc.graph": "output/cache",  # scmc graph: loads a model as inspection does, traces and draws it
    "scmc.watch": "output/cache",  # scmc build --watch: the pipeline again on every change of its inputs
    "scmc.artifacts": "diagnostics",  # export's scan of untrusted artifacts: standard library (torch/onnx lazily)
    "scmc.cli": "cli",  # the package: registers every command, re-exports main and run
    "scmc.cli.conventions": "cli",
    "scmc.cli.app": "cli",
    "scmc.cli.build": "cli",
    "scmc.cli.render": "cli",
    "scmc.cli.export": "cli",
    "scmc.cli.compat": "cli",
    "scmc.cli.inspect": "cli",
    "scmc.__main__": "cli",
}
# export reads a built package and a checkpoint, never the compiler's stages. Inside the package the
# modules are ordered too, lowest first: each may import only the ones before it (the package's
# __init__, which re-exports what callers use, comes last).
EXPORT = "scmc.export"
EXPORT_ORDER = tuple(
    f"{EXPORT}.{name}"
    for name in (
        "common",
        "request",
        "report",
        "package",
        "checkpoint",
        "preprocess",
        "compare",
        "inputs",
        "runner",
        "pt2",
        "onnx",
        "torchscript",
        "aoti",
        "formats",
        "verify",
        "pipeline",
        "summary",
    )
) + (EXPORT,)
EXPORT_MAY_IMPORT = {"scmc", "scmc.diagnostics", "scmc.artifacts"}

# Packages split by concern inside one layer: each module may import only the ones before it (the
# package's __init__, which re-exports what other modules use, comes last).
PACKAGE_ORDERS = {
    "scmc.load": (
        "common",
        "located",
        "parse",
        "files",
        "parameters",
        "overrides",
        "filters",
        "sandbox",
        "budget",
        "render",
        "expand",
    ),
    "scmc.build": ("request", "naming", "stages", "plan", "destination", "write", "commands"),
    "scmc.cli": ("conventions", "app", "build", "render", "export", "compat", "inspect"),
}
ORDERS = {
    package: tuple(f"{package}.{name}" for name in names) + (package,) for package, names in PACKAGE_ORDERS.items()
}

# (importer, imported): upward imports that remain, each with why and what would remove it.
ALLOWED_UPWARD = {
    # The build cache records every file a build reads (note_read/note_absent) so that a hit can
    # check them; load/files.py's read_text and the CFG lookup of lower/files.py report to it. Removing it: a
    # small read recorder below load (e.g. scmc/reads.py) that cache.py reads back.
    ("scmc.load.files", "scmc.cache"): "load.read_text reports reads to the build cache's recorder",
    ("scmc.lower.files", "scmc.cache"): "the CFG lookup reports reads and absent candidates to the build cache",
    # format_python reuses black's output for a text formatted before (cache.formatted). Removing
    # it: the pipeline passes the memo (or the formatter) into the emitters.
    ("scmc.emit.python", "scmc.cache"): "format_python memoizes black's output in the build cache",
    # plan_package looks the request up in the cache and stores the result itself; under the rule
    # the cache wraps the pipeline. Removing it: move the lookup/store into cache.py or an output
    # module that calls build.compile_parts.
    ("scmc.build.plan", "scmc.cache"): "plan_package consults and fills the build cache itself",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> dict[str, int]:
    """scmc modules that module `name` imports anywhere in its source -> first line."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in MODULES:  # `scmc.ir.Program` -> scmc.ir
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "scmc" or alias.name.startswith("scmc."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module != "scmc" and not module.startswith("scmc."):
                continue
            for alias in node.names:  # `from scmc import cache` imports the module scmc.cache
                full = f"{module}.{alias.name}"
                add(full if full in MODULES else module, node.lineno)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_has_a_layer() -> None:
    unmapped = sorted(set(MODULES) - set(LAYERS) - set(EXPORT_ORDER))
    assert not unmapped, f"give these modules a layer in tests/test_imports.py and docs/architecture.md: {unmapped}"
    stale = sorted((set(LAYERS) | set(EXPORT_ORDER)) - set(MODULES))
    assert not stale, f"LAYERS names modules that no longer exist: {stale}"


def test_no_module_imports_from_a_higher_layer() -> None:
    rank = {layer: i for i, layer in enumerate(LAYER_ORDER)}
    upward = []
    for name, targets in GRAPH.items():
        if name in EXPORT_ORDER:
            continue
        for target, line in targets.items():
            if target in EXPORT_ORDER:
                if LAYERS[name] != "cli":
                    upward.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {name} imports {target}")
                continue
            if rank[LAYERS[target]] > rank[LAYERS[name]] and (name, target) not in ALLOWED_UPWARD:
                upward.append(
                    f"{MODULES[name].relative_to(ROOT)}:{line}: {name} ({LAYERS[name]}) imports "
                    f"{target} ({LAYERS[target]})"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_known_exceptions_still_occur() -> None:
    stale = sorted(f"{a} -> {b}" for a, b in ALLOWED_UPWARD if b not in GRAPH.get(a, {}))
    assert not stale, f"remove these fixed exceptions from ALLOWED_UPWARD: {stale}"


def test_export_depends_only_on_diagnostics_and_the_runtime() -> None:
    extra = sorted(
        f"{MODULES[name].relative_to(ROOT)}:{line}: {target}"
        for name in EXPORT_ORDER
        for target, line in GRAPH[name].items()
        if target not in EXPORT_ORDER and target not in EXPORT_MAY_IMPORT
    )
    assert not extra, f"scmc/export/ may use only {sorted(EXPORT_MAY_IMPORT)} of scmc; it imports:\n" + "\n".join(extra)


def test_export_modules_import_only_the_ones_before_them() -> None:
    rank = {name: i for i, name in enumerate(EXPORT_ORDER)}
    later = sorted(
        f"{MODULES[name].relative_to(ROOT)}:{line}: {name} imports {target}"
        for name in EXPORT_ORDER
        for target, line in GRAPH[name].items()
        if target in rank and rank[target] >= rank[name]
    )
    assert not later, "scmc/export/ imports against EXPORT_ORDER:\n" + "\n".join(later)


def test_split_packages_import_only_their_earlier_modules() -> None:
    later = []
    for package, order in ORDERS.items():
        rank = {name: i for i, name in enumerate(order)}
        assert set(order) == {m for m in MODULES if m == package or m.startswith(package + ".")}, package
        later += [
            f"{MODULES[name].relative_to(ROOT)}:{line}: {name} imports {target}"
            for name in order
            for target, line in GRAPH[name].items()
            if target in rank and rank[target] >= rank[name]
        ]
    assert not later, "imports against PACKAGE_ORDERS:\n" + "\n".join(sorted(later))


def test_the_imports_form_no_cycle() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_holds_function_local_and_type_checking_imports() -> None:
    # `from scmc import cache` and `from scmc.emit.package import package_files` inside plan_package
    assert {"scmc.cache", "scmc.emit.package", "scmc.link"} <= set(GRAPH["scmc.build.plan"])
    # `if TYPE_CHECKING: from scmc.link import ...` in emit/package.py
    assert "scmc.link" in GRAPH["scmc.emit.package"]
    # `import scmc.expr as X` at module level of lower/steps.py
    assert "scmc.expr" in GRAPH["scmc.lower.steps"]


def test_the_split_packages_stay_split() -> None:
    """scmc/export/ and scmc/lower/ were one file each: no module of theirs may grow back into one."""
    limits = {"scmc.export": 600, "scmc.lower": 800}
    long = [
        f"{MODULES[name].relative_to(ROOT)}: {lines} lines (at most {limit})"
        for name in MODULES
        for package, limit in limits.items()
        if name == package or name.startswith(package + ".")
        for lines in [len(MODULES[name].read_text(encoding="utf-8").splitlines())]
        if lines > limit
    ]
    assert not long, "\n".join(long)


def test_lowering_stops_at_a_mistake_through_error_at_only() -> None:
    """One diagnostic helper in scmc/lower/: `raise error_at(...)`, never a hand-built CompileError([Diagnostic])."""
    built = []
    for name, path in MODULES.items():
        if not name.startswith("scmc.lower"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "CompileError"
                and node.args
                and isinstance(node.args[0], ast.List)
                and node.args[0].elts
            ):
                built.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len([n for n in built if "common.py" in n]) <= 1, built  # error_at itself
    assert not [n for n in built if "common.py" not in n], "use error_at(code, message, span, hint):\n" + "\n".join(
        built
    )
