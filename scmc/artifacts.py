"""What scmc checks in an exported artifact before torch reads it.

``torch.export.load`` (``.pt2``) and ``torch.jit.load`` (TorchScript ``.pt``) read zip archives
that can carry pickles, Python source and native code:

- a ``.pt2`` unpickles with ``torch.load(weights_only=False)`` every weight or constant its
  payload config marks ``use_pickle``, ``pickle.loads`` "opaque" constants, falls back to
  ``weights_only=False`` for its sample inputs, ``exec``s its ``guards_code`` when the program
  is turned into a module, resolves graph targets by walking attributes of ``torch``
  (``torch.os.system`` is ``os.system``), and may hold an AOTInductor shared library;
- a TorchScript archive unpickles ``data.pkl``/``constants.pkl`` and compiles and runs its
  TorchScript ``code/`` (which can call ``aten::save`` and ``aten::from_file``).

:func:`check_artifact` reads the archive with :mod:`zipfile` (nothing is unpickled or run)
and raises :class:`ArtifactRefused` unless every member is data: raw tensor bytes, JSON,
pickles whose imports (found with :func:`pickletools.genops`) are the few objects torch's own
tensor format needs, graph targets that are tensor operators, guards that are shape
arithmetic, TorchScript code that calls no file operator. ``scmc export --trust-artifact``
skips the check for a file the user vouches for. ``docs/security.md`` (## Artifacts) lists
what is loaded how.
"""

from __future__ import annotations

import ast
import collections
import functools
import io
import json
import math
import operator
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

# Limits (documented in docs/security.md; --trust-artifact skips the whole check).
MAX_MEMBERS = 100_000  # zip entries in one archive
MAX_PICKLE_BYTES = 64 * 2**20  # one pickle member (tensor data lives in raw members, not in the pickle)
MAX_TEXT_BYTES = 256 * 2**20  # one JSON or TorchScript source member
MAX_NESTING = 2  # a torch.save archive inside a .pt2 archive; nothing deeper

PICKLE_MAGIC = b"\x80"
ZIP_MAGIC = b"PK\x03\x04"

# Opcodes that call or build an object from something the pickle names.
_IMPORTS = {"GLOBAL", "STACK_GLOBAL", "INST"}
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_EXTENSIONS = {"EXT1", "EXT2", "EXT4"}  # the copyreg extension registry: an import by number


class ArtifactRefused(Exception):
    """The artifact holds something that would run code (or cannot be told apart from that) when loaded."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}" if member else reason)
        self.member = member
        self.reason = reason


# ------------------------------------------------------------------------------------------
# Pickles


def _tensor_format_objects() -> tuple[set[int], Callable[[Any], bool]]:
    """The objects torch.save's tensor format imports, by identity, and a test for the rest (dtypes, storages)."""
    import torch
    import torch._utils

    exact = {
        collections.OrderedDict,
        torch._utils._rebuild_tensor_v2,
        torch._utils._rebuild_parameter,
        torch.Size,
        torch.device,
    }

    def by_kind(obj: Any) -> bool:
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return True
        storages = (torch.storage.TypedStorage, torch.storage.UntypedStorage)
        return isinstance(obj, type) and issubclass(obj, storages)

    return {id(o) for o in exact}, by_kind


def _jit_pickle_helpers() -> set[int]:
    """``torch.jit._pickle``'s list and tensor builders (TorchScript's pickles use them; pure constructors)."""
    import torch.jit._pickle as helpers

    return {
        id(getattr(helpers, name))
        for name in dir(helpers)
        if name.startswith("build_") or name == "restore_type_tag"
        if callable(getattr(helpers, name))
    }


# Modules a pickle may name at all: scmc looks the name up only in an already-imported module of
# this list (it never imports what an untrusted file names), then judges the object it finds.
_LOOKUP_MODULES = ("torch", "torch._utils", "collections", "torch.jit._pickle")


def _resolve(module: str, name: str) -> Any:
    import sys

    if module not in _LOOKUP_MODULES or module not in sys.modules:
        return None
    obj: Any = sys.modules[module]
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def pickle_imports(data: bytes) -> Iterator[tuple[str, str]]:
    """Every (module, name) the pickle ``data`` imports, in order.

    Raises :class:`ValueError` for a pickle that is malformed, uses the extension registry, or
    imports through STACK_GLOBAL from values that are not plain strings (so what it imports
    cannot be read off the bytes).
    """
    import pickletools

    memo: dict[Any, Any] = {}
    pushed: list[Any] = []  # the values of recent pushes (strings, or None for anything else)
    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name in _EXTENSIONS:
            raise ValueError(f"pickle opcode {name} (an import through the copyreg registry)")
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield module, attr
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            if len(pushed) < 2 or not all(isinstance(v, str) for v in pushed[-2:]):
                raise ValueError("STACK_GLOBAL whose module and name are not plain strings")
            module, attr = pushed[-2], pushed[-1]
            del pushed[-2:]
            yield module, attr
            pushed.append(None)
        elif name in _STRINGS:
            pushed.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in _PUTS:
            memo[arg] = pushed[-1] if pushed else None
        elif name in _GETS:
            pushed.append(memo.get(arg))
        elif name in ("PROTO", "FRAME", "STOP"):
            pass
        else:
            pushed.append(None)
        if len(pushed) > 64:
            del pushed[:-8]


@dataclass
class _Policy:
    """Which imports a pickle may make: objects of torch's tensor format, plus what ``extra`` allows."""

    exact: set[int]
    by_kind: Callable[[Any], bool]
    torchscript_classes: Callable[[str, str], bool] | None = None

    def allows(self, module: str, name: str) -> bool:
        if self.torchscript_classes is not None and (module == "__torch__" or module.startswith("__torch__.")):
            return self.torchscript_classes(module, name)
        obj = _resolve(module, name)
        return obj is not None and (id(obj) in self.exact or self.by_kind(obj))


def scan_pickle(data: bytes, member: str, policy: _Policy) -> None:
    if len(data) > MAX_PICKLE_BYTES:
        raise ArtifactRefused(member, f"a pickle of {len(data):,} bytes, over the {MAX_PICKLE_BYTES:,}-byte scan limit")
    try:
        for module, name in pickle_imports(data):
            if not policy.allows(module, name):
                raise ArtifactRefused(
                    member,
                    f"its pickle imports `{module}.{name}`, which is not part of torch's tensor format "
                    "(loading it would run that code)",
                )
    except ValueError as exc:
        raise ArtifactRefused(member, f"not a pickle scmc can read safely ({exc})") from None


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise ArtifactRefused(info.filename, f"{info.file_size:,} bytes, over the {limit:,}-byte limit for this kind")
    with archive.open(info) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ArtifactRefused(info.filename, f"more than {limit:,} bytes, over the limit for this kind")
    return data


def _open_zip(source: Path | bytes, member: str) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArtifactRefused(member, f"not a zip archive ({exc})") from None
    if len(archive.infolist()) > MAX_MEMBERS:
        raise ArtifactRefused(member, f"more than {MAX_MEMBERS:,} archive members")
    return archive


def scan_torch_save(data: bytes, member: str, policy: _Policy, depth: int = 1) -> None:
    """A ``torch.save`` file inside an archive: a zip whose ``.pkl`` members use only the tensor format."""
    if depth > MAX_NESTING:
        raise ArtifactRefused(member, "archives nested deeper than torch writes them")
    if not data:
        return
    if not data.startswith(ZIP_MAGIC):
        # The legacy (pre-1.6) format is a run of pickles read with pickle itself, and a raw
        # pickle here would be passed to pickle.loads: scan it as one.
        scan_pickle(data, member, policy)
        return
    with _open_zip(data, member) as inner:
        for info in inner.infolist():
            name = f"{member}!{info.filename}"
            if info.filename.endswith(".pkl"):
                scan_pickle(_read(inner, info, MAX_PICKLE_BYTES), name, policy)
            elif info.filename.endswith((".pt", ".pt2")) or _looks_like_archive(inner, info):
                raise ArtifactRefused(name, "an archive inside a tensor file")


def _looks_like_archive(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    with archive.open(info) as handle:
        return handle.read(4) == ZIP_MAGIC


# ------------------------------------------------------------------------------------------
# .pt2 (torch.export.save)

# Arithmetic the exported graph may call besides tensor operators (all pure).
_OPERATOR_FUNCTIONS = (
    "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor not_ invert"
).split()
_SYM_FUNCTIONS = ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum")
_OP_NAMESPACES = ("aten", "prims", "prim", "higher_order")


@functools.lru_cache(maxsize=1)
def file_operators() -> frozenset[str]:
    """Registered operators that take a file name (``aten::save``, ``aten::from_file``, ...), by their schemas."""
    import torch

    names = set()
    for schema in torch._C._jit_get_all_schemas():
        for arg in schema.arguments:
            if "str" in str(arg.type) and re.search(r"file|path|dir", arg.name, re.IGNORECASE):
                names.add(schema.name)
    names.add("debugprims::load_tensor")
    return frozenset(names)


def _graph_target(target: str, file_ops: frozenset[str]) -> str:
    """Why the graph target ``target`` is refused, or an empty string. Resolved the way torch's deserializer does."""
    import torch

    if target.startswith("#"):
        return "an extension operator"
    roots = {"_operator": operator, "torch": torch, "math": math}
    root_name = target.split(".")[0]
    if root_name not in roots:
        return ""  # torch leaves it a string: calling it fails, it runs nothing
    obj: Any = roots[root_name]
    for part in target.split(".")[1:]:
        if not hasattr(obj, part):
            return ""
        obj = getattr(obj, part)
    if root_name == "_operator":
        return "" if ".".join(target.split(".")[1:]) in _OPERATOR_FUNCTIONS else "not pure arithmetic"
    if root_name == "math":
        return "" if callable(obj) and getattr(obj, "__module__", None) in (None, "math") else "not a math function"
    if any(obj is getattr(torch, n, None) for n in _SYM_FUNCTIONS):
        return ""
    if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        qualified = obj._qualified_op_name if isinstance(obj, torch._ops.OpOverloadPacket) else obj._schema.name
        namespace = qualified.split("::")[0]
        if namespace not in _OP_NAMESPACES:
            return f"an operator of the `{namespace}` namespace (only aten/prims operators are loaded)"
        if qualified in file_ops:
            return "an operator that reads or writes files"
        return ""
    if isinstance(obj, torch._ops.HigherOrderOperator):
        return ""
    return f"{type(obj).__name__}, not a tensor operator"


def _nodes(value: Any) -> Iterator[dict[str, Any]]:
    """Every serialized graph node (a dict with ``target``, ``inputs`` and ``outputs``), subgraphs included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("target"), str) and "inputs" in item and "outputs" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


_GUARD_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Constant,
    ast.Subscript,
    ast.Name,
    ast.Attribute,
    ast.Call,
    ast.Load,
    ast.Tuple,
    ast.operator,
    ast.cmpop,
    ast.unaryop,
    ast.boolop,
)


def guard_problem(code: str) -> str:
    """Why a ``guards_code`` entry is not plain shape arithmetic on the inputs, or an empty string.

    torch writes guards such as ``L['x'].size()[2] >= 3`` and ``torch.sym_max(1, ...) != 1``; it
    ``exec``s them when the program becomes a module, so anything else is refused.
    """
    if len(code) > 10_000:
        return "longer than any shape guard"
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return "not a Python expression"
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            return f"uses {type(node).__name__}"
        if isinstance(node, ast.Name) and node.id not in ("L", "torch"):
            return f"names `{node.id}`"
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool)):
            return "holds a constant that is not a number or a string"
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                if node.attr not in _SYM_FUNCTIONS:
                    return f"calls `torch.{node.attr}`"
            elif node.attr not in ("size", "stride", "storage_offset", "dim", "shape"):
                return f"reads `.{node.attr}`"
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Attribute) or node.keywords):
            return "calls something other than a size method or torch.sym_*"
    names = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "torch"]
    attrs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    if any(id(n) not in attrs for n in names):
        return "uses `torch` other than torch.sym_*"
    return ""


def check_pt2(path: Path) -> None:
    """Refuse a ``torch.export.save`` archive that holds anything but data."""
    exact, by_kind = _tensor_format_objects()
    policy = _Policy(exact, by_kind)
    file_ops = file_operators()
    with _open_zip(path, path.name) as archive:
        infos = archive.infolist()
        by_name = {i.filename: i for i in infos}
        pickled: set[str] = set()
        for info in infos:
            name = info.filename
            parts = name.split("/")
            if "aotinductor" in parts or name.endswith((".so", ".cpp", ".dll", ".dylib", ".o")):
                raise ArtifactRefused(name, "compiled native code (an AOTInductor library): loading it runs it")
            if name.endswith("_config.json") and len(parts) >= 2 and parts[-2] in ("weights", "constants"):
                config = _json(archive, info)
                entries = config.get("config", {}) if isinstance(config, dict) else None
                if not isinstance(entries, dict):
                    raise ArtifactRefused(name, "a payload config that is not a JSON object of entries")
                for fqn, entry in entries.items():
                    if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
                        raise ArtifactRefused(name, f"payload entry `{fqn}` has no path_name")
                    member = "/".join([*parts[:-1], entry["path_name"]])
                    if entry["path_name"].startswith(("custom_obj_", "opaque_obj_")):
                        raise ArtifactRefused(
                            member, f"constant `{fqn}` is a pickled Python object, which torch would unpickle"
                        )
                    if entry.get("use_pickle"):
                        pickled.add(member)
            elif len(parts) >= 2 and parts[-2] == "models" and name.endswith(".json"):
                program = _json(archive, info)
                for node in _nodes(program):
                    problem = _graph_target(node["target"], file_ops)
                    if problem:
                        raise ArtifactRefused(name, f"the graph calls `{node['target']}`: {problem}")
                guards = program.get("guards_code", []) if isinstance(program, dict) else []
                for guard in guards if isinstance(guards, list) else [guards]:
                    problem = guard_problem(guard) if isinstance(guard, str) else "not a string"
                    if problem:
                        raise ArtifactRefused(
                            name, f"guards_code `{str(guard)[:80]}` {problem} (torch would exec it as Python)"
                        )
            if name.endswith((".pt", ".pkl")):
                pickled.add(name)
        for member in sorted(pickled):
            if member not in by_name:
                continue  # torch fails to find it: nothing is unpickled
            scan_torch_save(_read(archive, by_name[member], MAX_PICKLE_BYTES), member, policy)


def _json(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    try:
        return json.loads(_read(archive, info, MAX_TEXT_BYTES))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactRefused(info.filename, f"not valid JSON ({exc})") from None


# ------------------------------------------------------------------------------------------
# TorchScript (torch.jit.save)


def check_torchscript(path: Path) -> None:
    """Refuse a TorchScript archive whose pickles import more than TorchScript's own classes and tensor
    format, or whose code calls an operator that touches files or lives outside aten/prim."""
    exact, by_kind = _tensor_format_objects()
    exact |= _jit_pickle_helpers()
    file_ops = file_operators()
    file_names = sorted({op.split("::")[1] for op in file_ops if op.startswith(("aten::", "prim::"))})
    call_re = re.compile(r"\b(?:torch|ops\.aten|ops\.prim)\.(" + "|".join(map(re.escape, file_names)) + r")\s*\(")
    ns_re = re.compile(r"\bops\.(\w+)\.")
    with _open_zip(path, path.name) as archive:
        infos = archive.infolist()
        names = {i.filename for i in infos}
        sources: dict[str, str] = {}
        for info in infos:
            if "/code/" in f"/{info.filename}" and info.filename.endswith(".py"):
                try:
                    sources[info.filename] = _read(archive, info, MAX_TEXT_BYTES).decode("utf-8")
                except UnicodeDecodeError:
                    raise ArtifactRefused(info.filename, "TorchScript source that is not UTF-8") from None

        def defined_in_archive(module: str, cls: str) -> bool:
            """``__torch__.a.b Cls`` is a class the archive's TorchScript code defines (code/__torch__/a/b.py)."""
            rel = "code/" + module.replace(".", "/") + ".py"
            for file, text in sources.items():
                if file == rel or file.endswith("/" + rel):
                    return re.search(rf"^class {re.escape(cls.split('.')[-1])}\b", text, re.MULTILINE) is not None
            return False

        policy = _Policy(exact, by_kind, defined_in_archive)
        for file, text in sources.items():
            match = call_re.search(text)
            if match:
                raise ArtifactRefused(
                    file, f"TorchScript code calls `{match.group(1)}`, an operator that touches files"
                )
            for ns in ns_re.findall(text):
                if ns not in ("aten", "prim", "prims"):
                    raise ArtifactRefused(file, f"TorchScript code calls an operator of the `{ns}` namespace")
            if "torch.classes." in text or "__torch__.torch.classes" in text:
                raise ArtifactRefused(file, "TorchScript code uses a custom C++ class (torch.classes)")
        for info in infos:
            if info.filename.endswith((".pkl", ".debug_pkl")):
                scan_pickle(_read(archive, info, MAX_PICKLE_BYTES), info.filename, policy)
            elif info.filename.endswith((".so", ".dll", ".dylib")):
                raise ArtifactRefused(info.filename, "a native library in a TorchScript archive")
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            raise ArtifactRefused("", "no data.pkl: not a TorchScript archive")


# ------------------------------------------------------------------------------------------
# ONNX


def check_onnx(path: Path) -> None:
    """An ONNX model is data, but its external-data locations must stay next to the model."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ArtifactRefused("", f"not an ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    base = path.resolve().parent
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            where = Path(entry.value)
            if where.is_absolute() or not (base / where).resolve().is_relative_to(base):
                raise ArtifactRefused(tensor.name, f"external data at `{entry.value}`, outside the model's folder")


def check_artifact(fmt: str, path: Path) -> None:
    """Raise :class:`ArtifactRefused` unless loading ``path`` as ``fmt`` reads data only."""
    if fmt == "pt2":
        check_pt2(path)
    elif fmt == "aoti":
        raise ArtifactRefused(
            "",
            "an AOTInductor package is a compiled shared library, and loading it runs its native code; "
            "scmc loads one only right after compiling it",
        )
    elif fmt == "torchscript":
        check_torchscript(path)
    elif fmt == "onnx":
        check_onnx(path)
    else:
        raise ValueError(fmt)
