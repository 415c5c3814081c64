"""`scmc inspect` and `scmc diff`: what a template or a built package builds, before training it.

A model is taken either from a template (compiled in memory with the same pipeline as
``scmc build``; nothing is written) or from a built package on disk (imported from its
``src/``). It is constructed on the meta device, so even ConvNeXtV2-huge costs no memory, and
run once at the input shapes of the template, the package's manifest or ``-s``:

- per layer, up to ``depth`` levels of qualified names: class, output shape, parameters,
  trainable parameters and FLOPs (``torch.utils.flop_counter.FlopCounterMode``);
- totals: parameters, and multiply-accumulates counted twice, independently, by ptflops (a real
  CPU forward at batch 1, up to ``PTFLOPS_MAX_PARAMS``) and by FlopCounterMode (FLOPs / 2). They count different things at the edges (ptflops adds norms,
  activations and element-wise ops; FlopCounterMode only matmuls and convolutions), so a
  disagreement over ``FLOP_DISAGREEMENT`` (10 %) is flagged rather than hidden;
- a training-memory estimate at a batch size: parameters, gradients, the optimizer state that the
  package's own compiled backward creates (its optimizer stepped once on the meta device), and
  the activations autograd saves for backward in training mode (measured with saved-tensor hooks
  on the meta device at that batch size; tensors that share a parameter's storage are not counted);
- optionally the CPU latency of a real forward (warm-up, then the median of several rounds).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import json
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from scmc.diagnostics import CompileError, Diagnostic

FLOP_DISAGREEMENT = 0.10  # |ptflops - FlopCounterMode| / max of the two, flagged above this
DEFAULT_DEPTH = 2
PTFLOPS_MAX_PARAMS = 10**9  # ptflops needs real weights (4 GB of float32 at this size); above it, only FlopCounterMode


@dataclass(frozen=True)
class LayerRow:
    name: str  # qualified attribute path ("" for the model itself)
    kind: str  # class name
    output_shape: str
    params: int
    trainable: int
    flops: int  # FlopCounterMode, this module and everything below it


@dataclass(frozen=True)
class MemoryEstimate:
    batch_size: int
    parameters: int  # bytes
    gradients: int
    optimizer_state: int
    activations: int
    optimizer: str  # what the state was measured from

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations


@dataclass(frozen=True)
class Inspection:
    source: str
    name: str
    input_shapes: dict[str, Any]
    rows: list[LayerRow]
    params: int
    trainable: int
    macs_ptflops: int | None
    macs_flop_counter: int
    memory: MemoryEstimate | None = None
    latency_ms: dict[str, float] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # the template parameters it was built with

    @property
    def flops_disagree(self) -> bool:
        if self.macs_ptflops is None:
            return False
        high = max(self.macs_ptflops, self.macs_flop_counter, 1)
        return abs(self.macs_ptflops - self.macs_flop_counter) / high > FLOP_DISAGREEMENT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["flops_disagree"] = self.flops_disagree
        if self.memory is not None:
            data["memory"]["total"] = self.memory.total
        return data


class InspectError(Exception):
    """A user mistake outside a template (not a package, bad shapes): one line, exit 1."""


# --------------------------------------------------------------------------- loading


class _MemoryModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a generated package from the sources the compiler produced, without writing them."""

    def __init__(self, package: str, sources: dict[str, str]):
        self.package = package
        self.sources = sources  # module name -> source

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.sources:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname == self.package)

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == self.package:
            module.__path__ = []  # a package: its submodules come from this finder too
        code = compile(self.sources[module.__name__], f"<scmc {module.__name__}>", "exec")
        exec(code, module.__dict__)  # noqa: S102 - the compiler's own output, never template text


@contextlib.contextmanager
def _imported(package: str, finder: importlib.abc.MetaPathFinder | None = None, src: Path | None = None) -> Iterator:
    """``package`` importable for the duration (from memory or from ``src``), forgotten afterwards."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == package or k.startswith(package + ".")}
    if finder is not None:
        sys.meta_path.insert(0, finder)
    if src is not None:
        sys.path.insert(0, str(src))
    try:
        yield importlib.import_module(package)
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
        if src is not None:
            sys.path.remove(str(src))
        for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
            del sys.modules[key]
        sys.modules.update(saved)


@dataclass
class Loaded:
    source: str
    name: str
    manifest: dict[str, Any]
    model_module: Any
    backward_module: Any | None


@contextlib.contextmanager
def load(target: Path, params: list[str], shapes: dict[str, Any], allow_modules: tuple[str, ...] = ()) -> Iterator:
    """A template (compiled in memory) or a built package directory, as a `Loaded`."""
    if target.is_dir():
        if params or allow_modules:
            raise InspectError(f"{target}: -p and --allow-module apply to templates, not to a built package")
        manifests = sorted(target.glob("src/*/manifest.json"))
        if len(manifests) != 1:
            raise InspectError(
                f"{target}: not a package built by scmc (no src/<name>/manifest.json); "
                "give a template (.yaml) or the directory `scmc build` wrote"
            )
        name = manifests[0].parent.name
        try:
            manifest = json.loads(manifests[0].read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InspectError(f"{manifests[0]}: unreadable manifest ({exc})") from None
        if shapes:
            manifest["input_shapes"] = shapes
        with _imported(name, src=target / "src"):
            yield _loaded(str(target), name, manifest)
        return
    if not target.is_file():
        raise InspectError(f"{target}: no such template or package directory")
    from scmc.build import BuildRequest, Part, plan_package

    request = BuildRequest(
        parts=[Part("model", target, "Model")], params=list(params), shapes=dict(shapes), allow_modules=allow_modules
    )
    plan = plan_package(request)
    prefix = f"src/{plan.name}/"
    sources = {
        (plan.name if rel == "__init__.py" else f"{plan.name}.{rel[:-3]}"): text.decode("utf-8")
        for path, text in plan.files.items()
        if path.startswith(prefix) and (rel := path[len(prefix) :]).endswith(".py") and "/" not in rel
    }
    manifest = json.loads(plan.files[prefix + "manifest.json"].decode("utf-8"))
    with _imported(plan.name, finder=_MemoryModules(plan.name, sources)):
        yield _loaded(str(target), plan.name, manifest)


def _loaded(source: str, name: str, manifest: dict[str, Any]) -> Loaded:
    model_module = importlib.import_module(f"{name}.model")
    backward_module = None
    if importlib.util.find_spec(f"{name}.backward") is not None:
        backward_module = importlib.import_module(f"{name}.backward")
    return Loaded(source, name, manifest, model_module, backward_module)


# --------------------------------------------------------------------------- measuring


def _dummy_inputs(manifest: dict[str, Any], batch: int, device: str) -> dict[str, Any]:
    import torch

    shapes = manifest.get("input_shapes") or {}
    if not shapes:
        raise InspectError(
            "the model's input shapes are unknown: add INPUT_SHAPES to the template or pass -s NAME=C,H,W"
        )
    out = {}
    for name in shapes:
        spec = shapes[name]
        dtype = getattr(torch, spec.get("dtype", "float32"))
        size = (batch, *spec["shape"])
        if dtype.is_floating_point:
            out[name] = (
                torch.randn(size, dtype=dtype, device=device)
                if device != "meta"
                else torch.empty(size, dtype=dtype, device="meta")
            )
        else:
            out[name] = torch.zeros(size, dtype=dtype, device=device)
    return out


def _shape_of(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "x".join(str(d) for d in value.shape) or "scalar"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_shape_of(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_shape_of(v) for v in value) + ")"
    return type(value).__name__


def _layer_rows(model: Any, inputs: dict[str, Any], depth: int) -> tuple[list[LayerRow], int]:
    """One meta-device forward with output hooks and FlopCounterMode; returns rows and total FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    modules = [(n, m) for n, m in model.named_modules() if n == "" or n.count(".") < depth]
    shapes: dict[str, str] = {}

    def record(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:  # returns None: the output stays as it is
            shapes.setdefault(name, _shape_of(output))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in modules]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    rows = []
    for name, module in modules:
        params = list(module.parameters())
        key = root if name == "" else f"{root}.{name}"
        rows.append(
            LayerRow(
                name=name,
                kind=type(module).__name__,
                output_shape=shapes.get(name, "(not called)"),
                params=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                flops=int(sum(counts.get(key, {}).values())),
            )
        )
    return rows, int(counter.get_total_flops())


def _ptflops_macs(model: Any, manifest: dict[str, Any]) -> int | None:
    """ptflops' count from a real CPU forward at batch 1 (on the meta device it counts nn.Linear twice)."""
    import io

    from ptflops import get_model_complexity_info

    inputs = _dummy_inputs(manifest, 1, "cpu")
    first = next(iter(inputs.values()))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        macs, _ = get_model_complexity_info(
            model,
            tuple(first.shape[1:]),
            as_strings=False,
            print_per_layer_stat=False,
            input_constructor=lambda _res: dict(inputs),
        )
    return int(macs) if macs is not None else None


def _optimizer_state_bytes(loaded: Loaded, model: Any) -> tuple[int, str]:
    """Build the package's own backward on the meta model, step its optimizers once, sum their state."""
    import torch

    if loaded.backward_module is None or not hasattr(loaded.backward_module, "Backward"):
        return 0, "none (the package has no backward.py)"
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    backward = loaded.backward_module.Backward(model, updates_per_epoch=1, epochs=1)
    optimizers = list(getattr(backward, "optimizers", {}).values()) or [backward.optimizer]
    total = 0
    for optimizer in optimizers:
        optimizer.step()
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
    for p in model.parameters():
        p.grad = None
    names = ", ".join(type(getattr(o, "optimizer", o)).__name__ for o in optimizers)
    return total, f"{names}, stepped once on the meta device"


def _activation_bytes(model: Any, inputs: dict[str, Any]) -> int:
    """What autograd saves for backward in a training-mode forward (meta device), parameters excluded."""
    import torch

    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = max(saved.get(storage._cdata, 0), tensor.numel() * tensor.element_size())
        return tensor

    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
    finally:
        model.eval()
    return sum(saved.values())


def _latency(model: Any, manifest: dict[str, Any], batch: int, threads: int, rounds: int) -> dict[str, float]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = _dummy_inputs(manifest, batch, "cpu")
        samples = []
        with torch.inference_mode():
            for _ in range(2):
                model(**inputs)
            for _ in range(rounds):
                start = time.perf_counter()
                model(**inputs)
                samples.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(previous)
    return {
        "batch": batch,
        "threads": threads,
        "rounds": rounds,
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
    }


def inspect_target(
    target: Path,
    *,
    params: Sequence[str] = (),
    shapes: dict[str, Any] | None = None,
    allow_modules: tuple[str, ...] = (),
    depth: int = DEFAULT_DEPTH,
    batch_size: int | None = None,
    latency: bool = False,
    threads: int = 1,
    rounds: int = 10,
) -> Inspection:
    import torch

    if depth < 0:
        raise InspectError(f"--depth must be 0 or more, not {depth}")
    if batch_size is not None and batch_size < 1:
        raise InspectError(f"--batch-size must be at least 1, not {batch_size}")
    with load(target, list(params), dict(shapes or {}), allow_modules) as loaded:
        model_cls = loaded.model_module.Model
        with torch.device("meta"):
            model = model_cls().eval()
        inputs = _dummy_inputs(loaded.manifest, 1, "meta")
        rows, flops = _layer_rows(model, inputs, depth)
        memory = None
        if batch_size is not None:
            state, optimizer = _optimizer_state_bytes(loaded, model)
            param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            activations = _activation_bytes(model, _dummy_inputs(loaded.manifest, batch_size, "meta"))
            memory = MemoryEstimate(batch_size, param_bytes, grad_bytes, state, activations, optimizer)
        count_macs = not _no_ptflops() and rows[0].params <= PTFLOPS_MAX_PARAMS
        # one real CPU model serves both; timed first, before ptflops has had its hooks on it
        cpu_model = model_cls().eval() if count_macs or latency else None
        timing = _latency(cpu_model, loaded.manifest, batch_size or 1, threads, rounds) if latency else None
        macs = _ptflops_macs(cpu_model, loaded.manifest) if count_macs else None
        return Inspection(
            source=loaded.source,
            name=loaded.name,
            input_shapes=loaded.manifest.get("input_shapes") or {},
            rows=rows,
            params=rows[0].params,
            trainable=rows[0].trainable,
            macs_ptflops=macs,
            macs_flop_counter=flops // 2,
            memory=memory,
            latency_ms=timing,
            parameters=dict(loaded.manifest.get("resolved_parameters") or {}),
        )


# --------------------------------------------------------------------------- rendering


def _no_ptflops() -> bool:
    return importlib.util.find_spec("ptflops") is None


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def _bytes(value: int) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def _table(columns: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        )

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)]).rstrip()


def render(report: Inspection) -> str:
    shapes = ", ".join(f"{k}={'x'.join(map(str, v['shape']))}" for k, v in report.input_shapes.items())
    rows = [
        [r.name or "(model)", r.kind, r.output_shape, f"{r.params:,}", f"{r.trainable:,}", _si(r.flops)]
        for r in report.rows
    ]
    out = [
        f"{report.name} from {report.source} at {shapes} (batch 1)",
        "",
        _table(["layer", "class", "output", "params", "trainable", "FLOPs"], rows, {3, 4, 5}),
        "",
        f"parameters  {report.params:,} ({report.trainable:,} trainable)",
    ]
    counter = f"{_si(report.macs_flop_counter, 'MACs')} (FlopCounterMode)"
    if report.macs_ptflops is None:
        why = (
            "not installed (pip install ptflops)"
            if _no_ptflops()
            else f"skipped above {PTFLOPS_MAX_PARAMS:,} parameters"
        )
        out.append(f"MACs        {counter}; ptflops {why}")
    else:
        flag = "  <- differ by more than 10 %: read both" if report.flops_disagree else ""
        out.append(f"MACs        {_si(report.macs_ptflops, 'MACs')} (ptflops) | {counter}{flag}")
    if report.memory is not None:
        m = report.memory
        out += [
            f"training memory at batch {m.batch_size}: {_bytes(m.total)}",
            f"  parameters {_bytes(m.parameters)}, gradients {_bytes(m.gradients)}, "
            f"optimizer state {_bytes(m.optimizer_state)} ({m.optimizer}), activations {_bytes(m.activations)}",
        ]
    if report.latency_ms is not None:
        t = report.latency_ms
        out.append(
            f"latency     {t['median_ms']:.2f} ms median (min {t['min_ms']:.2f}, max {t['max_ms']:.2f}) over "
            f"{t['rounds']} rounds, batch {t['batch']}, {t['threads']} thread(s), CPU"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class Difference:
    left: Inspection
    right: Inspection
    parameters: dict[str, tuple[Any, Any]]  # template parameters that differ
    added: list[LayerRow]
    removed: list[LayerRow]
    changed: list[tuple[LayerRow, LayerRow]]

    def to_json(self) -> dict[str, Any]:
        return {
            "left": {"source": self.left.source, "params": self.left.params, "macs": self.left.macs_flop_counter},
            "right": {"source": self.right.source, "params": self.right.params, "macs": self.right.macs_flop_counter},
            "parameters": {k: list(v) for k, v in self.parameters.items()},
            "added": [asdict(r) for r in self.added],
            "removed": [asdict(r) for r in self.removed],
            "changed": [{"left": asdict(a), "right": asdict(b)} for a, b in self.changed],
        }


def diff(left: Inspection, right: Inspection) -> Difference:
    keys = sorted(set(left.parameters) | set(right.parameters))
    parameters = {
        k: (left.parameters.get(k), right.parameters.get(k))
        for k in keys
        if left.parameters.get(k) != right.parameters.get(k)
    }
    lrows = {r.name: r for r in left.rows}
    rrows = {r.name: r for r in right.rows}
    added = [r for n, r in rrows.items() if n not in lrows]
    removed = [r for n, r in lrows.items() if n not in rrows]
    changed = [
        (lrows[n], r)
        for n, r in rrows.items()
        if n in lrows and (lrows[n].kind, lrows[n].output_shape, lrows[n].params) != (r.kind, r.output_shape, r.params)
    ]
    return Difference(left, right, parameters, added, removed, changed)


def render_diff(d: Difference) -> str:
    out = [f"A: {d.left.name} from {d.left.source}", f"B: {d.right.name} from {d.right.source}", ""]
    out.append(
        _table(
            ["", "A", "B", "B - A"],
            [
                ["parameters", f"{d.left.params:,}", f"{d.right.params:,}", f"{d.right.params - d.left.params:+,}"],
                [
                    "MACs",
                    _si(d.left.macs_flop_counter),
                    _si(d.right.macs_flop_counter),
                    _si(d.right.macs_flop_counter - d.left.macs_flop_counter),
                ],
            ],
            {1, 2, 3},
        )
    )
    if d.parameters:
        out += ["", "template parameters:"] + [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in d.parameters.items()]
    for title, rows in (("added", d.added), ("removed", d.removed)):
        if rows:
            out += ["", f"layers {title}:"] + [f"  {r.name} ({r.kind}, {r.output_shape}, {r.params:,})" for r in rows]
    if d.changed:
        out += ["", "layers changed:"]
        out += [
            f"  {a.name or '(model)'}: {a.kind} {a.output_shape} {a.params:,} -> {b.kind} {b.output_shape} {b.params:,}"
            for a, b in d.changed
        ]
    if not (d.parameters or d.added or d.removed or d.changed):
        out += ["", "no differences at this depth"]
    return "\n".join(out)


__all__ = [
    "CompileError",
    "Diagnostic",
    "Difference",
    "InspectError",
    "Inspection",
    "LayerRow",
    "MemoryEstimate",
    "diff",
    "inspect_target",
    "render",
    "render_diff",
]
