"""Hostile templates: each one is refused with a located diagnostic, or compiles to harmless code.

Every ``tests/hostile/<case>.yaml`` is a template written to make the compiler do something
it must not: reach ``os.system``, load a pickle, escape the Jinja sandbox, exhaust memory,
run a layer file from outside its directory, or smuggle code into the generated sources.
Its first lines say what it tries and what must happen::

    # hostile: os.system bound to a shell command
    # expect: E0402          (the first diagnostic's code; or `built` for a template that may compile)
    # args: --allow-module evil

``@MARKER@`` in a case is replaced by a path inside the test's temporary directory; every
payload would create that file. ``@OUTSIDE@`` is a folder beside the template's, holding
``evil.py`` and ``creds.yaml`` (a secret line, ``CANARY``); the template's folder has symbolic
links to both (``evil_link.py``, ``creds_link.yaml``). No output may ever show the secret. Each build runs in-process with an audit hook and a socket
guard armed, so the test also sees a process started, a connection attempted, or a file
written outside the temporary directory, even where no marker would appear.

A case that is expected to fail must exit 1 with ``path:line:col: error[CODE]`` pointing into
the case file, without a traceback or an internal compiler error, and leave the temporary
directory exactly as it was. A case marked ``built`` may compile: then the generated files
must parse, contain only the expected kinds of statements and calls, import without side
effects, and run forward.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from scmc.addresses import TENSOR_METHODS
from scmc.cli import main
from tests.conftest import ROOT, import_package, snapshot

CASES_DIR = ROOT / "tests" / "hostile"
CASES = sorted(p.stem for p in CASES_DIR.glob("*.yaml"))

PAYLOAD = """\
import torch

open({marker!r}, "w").write("a layer file from outside the template's directory ran")


class Evil(torch.nn.Module):
    def forward(self, x):
        return x
"""

# --------------------------------------------------------------------------- side-effect guard

# Audit events that a build must never raise: processes, the network, native libraries.
FORBIDDEN_EVENTS = {
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pty.spawn",
    "socket.connect",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
    "socket.sendto",
    "urllib.Request",
    "ctypes.dlopen",
    "webbrowser.open",
}
# Audit events that change the file system: allowed only inside the test's temporary directory.
WRITE_EVENTS = {
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "os.truncate",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copyfile",
    "os.utime",
}


class Guard:
    armed = False
    root: str = ""
    events: list[str] = []

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if not cls.armed:
            return
        if event in FORBIDDEN_EVENTS:
            cls.events.append(f"{event}{args!r:.200}")
        elif event in WRITE_EVENTS and args:
            cls._path(event, args[0])
        elif event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1] or "", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes:
                cls._path(event, path)

    @classmethod
    def _path(cls, event: str, path: object) -> None:
        if isinstance(path, int) or path is None:
            return
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        text = os.path.abspath(text)
        if text.startswith(cls.root) or "__pycache__" in text or text == os.devnull:
            return
        cls.events.append(f"{event}({text!r})")


sys.addaudithook(Guard.hook)  # audit hooks cannot be removed; the guard is inert unless armed


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One ordinary build and import first: loading the libraries' own native code (torch, and
    torchvision through timm) is not the template's doing."""
    import timm  # noqa: F401
    import torch  # noqa: F401

    tmp = tmp_path_factory.mktemp("warm")
    (tmp / "warm.yaml").write_text(
        "INPUTS: [x]\nINPUT_SHAPES: {x: [4]}\nFLOW:\n"
        "  - [x, h, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: 4}}]]\n"
        "  - [[[h, x]], y, cat, [_obj_, {_addr_: structcast_model.torch.layers.Concatenate}, {_call_: {dim: -1}}]]\n"
    )
    previous = os.getcwd()
    os.chdir(tmp)
    try:
        result = CliRunner().invoke(main, ["build", "warm.yaml", "-o", str(tmp / "out"), "-q"])
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
    run_forward(tmp / "out", "warm")


@pytest.fixture
def guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm: None):
    """Arm the audit guard and refuse every socket connection for the duration of a test."""

    def refuse(self, *args, **kwargs):
        Guard.events.append(f"socket.connect{args!r}")
        raise OSError("network access is refused in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    Guard.root, Guard.events, Guard.armed = str(tmp_path.resolve()), [], True
    try:
        yield Guard
    finally:
        Guard.armed = False


# --------------------------------------------------------------------------- helpers


def case_meta(case: str) -> tuple[str, list[str], str]:
    text = (CASES_DIR / f"{case}.yaml").read_text(encoding="utf-8")
    expect = re.search(r"^# expect: (\S+)", text, re.M)
    args = re.search(r"^# args:(.*)$", text, re.M)
    what = re.search(r"^# hostile: (.*)$", text, re.M)
    assert expect and what, f"{case}.yaml needs `# hostile:` and `# expect:` lines"
    return expect.group(1), shlex.split(args.group(1)) if args else [], what.group(1)


CANARY = "secret-canary-3b1f: do not show this line"


def stage(case: str, tmp_path: Path) -> tuple[Path, Path]:
    """The case file (with the marker path) in tmp/tpl; a payload and a secret outside it, and symlinks to those."""
    marker = tmp_path / "MARKER"
    template_dir = tmp_path / "tpl"
    outside = tmp_path / "outside"
    template_dir.mkdir()
    outside.mkdir()
    payload = PAYLOAD.format(marker=str(marker))
    (outside / "evil.py").write_text(payload)
    (template_dir / "payload.py").write_text(payload)
    (template_dir / "evil_link.py").symlink_to(outside / "evil.py")
    (outside / "creds.yaml").write_text(f"{CANARY}\n  - [unbalanced\n")  # shown by any error pointing into it
    (template_dir / "creds_link.yaml").symlink_to(outside / "creds.yaml")
    text = (CASES_DIR / f"{case}.yaml").read_text(encoding="utf-8")
    text = text.replace("@MARKER@", str(marker)).replace("@OUTSIDE@", str(outside))
    (template_dir / f"{case}.yaml").write_text(text, encoding="utf-8")
    return template_dir, marker


def build_in(template_dir: Path, args: list[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(template_dir)
    return CliRunner().invoke(main, ["build", *args])


def assert_refused(result, case_file: str, expect: str | None) -> None:
    output = result.output
    assert result.exit_code == 1, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output and "internal compiler error" not in output, output
    first = re.search(r"^(\S+?):(\d+):(\d+): error\[(E\d{4})\]: ", output, re.M)
    assert first, f"no located diagnostic in:\n{output}"
    assert first.group(1) == case_file, output
    if expect:
        assert first.group(4) == expect, output
    lines = (Path(case_file).read_text(encoding="utf-8").count("\n") + 1) if Path(case_file).exists() else 10**9
    assert 1 <= int(first.group(2)) <= lines, output


# --------------------------------------------------------------------------- generated code checks

ALLOWED_ROOTS = {"torch", "torchvision", "timm", "math", "operator", "scmc_runtime", "typing", "dataclasses"}
DANGEROUS_NAMES = {
    "eval",
    "exec",
    "compile",
    "open",
    "__import__",
    "getattr",
    "setattr",
    "delattr",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "os",
    "sys",
    "subprocess",
    "builtins",
    "importlib",
    "pickle",
    "shutil",
    "socket",
    "ctypes",
}


def module_level_is_inert(tree: ast.Module, path: Path) -> None:
    """Importing a generated module runs only imports, constant assignments, class and function
    definitions, and (in __init__.py) the runtime version check."""
    for index, node in enumerate(tree.body):
        where = f"{path.name}:{node.lineno}"
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    assert isinstance(base, (ast.Name, ast.Attribute)), where
                functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)} | {
                    a.asname or a.name
                    for n in tree.body
                    if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("scmc_runtime")
                    for a in n.names
                }
                for item in node.body:
                    assert isinstance(item, (ast.FunctionDef, ast.AnnAssign, ast.Assign, ast.Expr, ast.Pass)), where
                    if isinstance(item, ast.Expr):
                        assert isinstance(item.value, ast.Constant), f"{where}: class body runs {ast.unparse(item)}"
                    value = getattr(item, "value", None) if isinstance(item, (ast.Assign, ast.AnnAssign)) else None
                    if isinstance(value, ast.Call):  # a dataclass field: flag(default, help) of the runtime
                        assert isinstance(value.func, ast.Name) and value.func.id in functions, ast.unparse(item)
                        for arg in [*value.args, *(k.value for k in value.keywords)]:
                            ast.literal_eval(arg)
                    elif value is not None:
                        ast.literal_eval(value)
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and index == 0:
            continue  # the module docstring
        if path.name == "__init__.py" and _is_version_check(node):
            continue
        if isinstance(node, ast.Try) and path.name == "__init__.py":
            # `try: import scmc_runtime / except ImportError: scmc_runtime = None / else: <version check>`
            assert all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body), where
            for handler in node.handlers:
                assert all(isinstance(n, (ast.Pass, ast.Assign)) for n in handler.body), where
                for n in handler.body:
                    if isinstance(n, ast.Assign):
                        ast.literal_eval(n.value)
            assert all(_is_version_check(n) for n in node.orelse) and not node.finalbody, where
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            ast.literal_eval(node.value)  # constants only (`__all__`, `__version__`, `PACKAGE`)
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue
        raise AssertionError(f"{where}: a generated module runs `{ast.unparse(node)[:80]}` at import time")


def _is_version_check(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    call = node.value
    return ast.unparse(call.func) == "scmc_runtime.check_version" and all(
        isinstance(a, ast.Constant) for a in [*call.args, *(k.value for k in call.keywords)]
    )


def calls_are_expected(tree: ast.Module, path: Path) -> None:
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            assert node.id not in DANGEROUS_NAMES, f"{path.name}:{node.lineno}: `{node.id}` in generated code"
        if isinstance(node, ast.Attribute) and node.attr.startswith("__"):
            assert node.attr == "__init__" and ast.unparse(node.value) == "super()", ast.unparse(node)
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        root = func.split(".")[0].split("(")[0]
        ok = (
            func in ("super", "super().__init__")
            or func.startswith("self.")
            or func in classes
            or root in ALLOWED_ROOTS
            or func in ("isinstance", "len", "dict", "list", "tuple", "float", "int", "range")
            or (isinstance(node.func, ast.Attribute) and node.func.attr in TENSOR_METHODS)  # `x.view(...)` in eval:
        )
        assert ok, f"{path.name}:{node.lineno}: unexpected call `{func}`"


def check_generated_model_files(package_src: Path) -> None:
    for path in sorted(package_src.glob("*.py")):
        if path.name in ("train.py", "predict.py"):
            module_level_is_inert(ast.parse(path.read_text(encoding="utf-8")), path)
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_level_is_inert(tree, path)
        if path.name in ("model.py", "loss.py", "metric.py"):
            calls_are_expected(tree, path)
        for line in path.read_text(encoding="utf-8").splitlines():
            assert "\x00" not in line


def run_forward(out: Path, name: str) -> None:
    import json

    import torch

    manifest = json.loads((out / "src" / name / "manifest.json").read_text())
    package = import_package(out, name)
    model = getattr(package, manifest["classes"]["model"])()
    model.eval()
    shapes = manifest["input_shapes"]
    inputs = [torch.randn(2, *shapes[n]["shape"]) for n in shapes]
    with torch.no_grad():
        model(*inputs)


# --------------------------------------------------------------------------- the corpus


def test_the_corpus_has_at_least_thirty_cases_each_saying_what_it_tries() -> None:
    assert len(CASES) >= 30
    for case in CASES:
        case_meta(case)


# Every case's build, refused or not, ends within these bounds (docs/security.md, Limits): the
# whole-build Jinja budget is 5 s here, and every size guard fires before it allocates.
CASE_SECONDS = 60.0
CASE_MEMORY_BYTES = 1 << 30  # growth of the process's peak resident memory during one build


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")


def reset_peak_memory() -> int:
    """Reset the kernel's peak-RSS mark of this process (clear_refs 5); returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_memory() -> int:
    return _status_kib("VmHWM") * 1024


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_template_is_refused_or_compiles_to_harmless_code(
    case: str, tmp_path: Path, guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCMC_MAX_JINJA_SECONDS", "5")
    expect, args, what = case_meta(case)
    template_dir, marker = stage(case, tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    baseline = reset_peak_memory()
    guard.events.clear()  # the test's own write to /proc/self/clear_refs
    start = time.monotonic()
    result = build_in(template_dir, [f"{case}.yaml", *args, "-o", str(out), "--name", case], monkeypatch)
    elapsed, grown = time.monotonic() - start, peak_memory() - baseline
    assert elapsed < CASE_SECONDS, f"the build took {elapsed:.1f} s ({what})"
    assert grown < CASE_MEMORY_BYTES, f"the build's peak memory grew by {grown / 2**20:.0f} MiB ({what})"
    assert not marker.exists(), f"the payload ran ({what})"
    assert guard.events == [], f"side effects while building ({what}): {guard.events}"
    assert CANARY not in result.output, f"a line of a file outside the template's folder was shown ({what})"
    after = snapshot(tmp_path)
    if expect != "built":
        assert_refused(result, f"{case}.yaml", expect)
        assert after == before, "a refused build changed the file system"
        return
    assert result.exit_code == 0, result.output
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert all(k == "out" or k.startswith("out/") for k in changed), sorted(changed)
    check_generated_model_files(out / "src" / case)
    run_forward(out, case)
    assert not marker.exists(), f"the generated package ran the payload ({what})"
    assert guard.events == [], f"side effects while importing or running the package: {guard.events}"


# --------------------------------------------------------------------------- the command line


SIMPLE = (
    "INPUTS: [x]\nINPUT_SHAPES: {x: [4]}\nPARAMETERS: {DEFAULT: {note: hello}}\nFLOW:\n"
    "  - [x, y, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: 3}}]]\n"
)


def test_a_p_value_cannot_inject_code_into_the_generated_header(tmp_path: Path, guard, monkeypatch) -> None:
    marker = tmp_path / "MARKER"
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "net.yaml").write_text(SIMPLE)
    payload = f"note=hi\nopen({str(marker)!r}, 'w')\r\nimport os; os.system('touch {marker}')"
    result = build_in(tmp_path / "tpl", ["net.yaml", "-p", payload, "-o", str(tmp_path / "out")], monkeypatch)
    assert result.exit_code == 0, result.output
    src = tmp_path / "out" / "src" / "net"
    model = (src / "model.py").read_text()
    header = [line for line in model.splitlines() if "Parameters:" in line]
    assert header == [
        "# Parameters: note=hi\\nopen("
        + repr(str(marker))
        + ", 'w')\\r\\nimport os; os.system('touch "
        + str(marker)
        + "')"
    ]
    check_generated_model_files(src)
    run_forward(tmp_path / "out", "net")
    assert not marker.exists() and guard.events == []


@pytest.mark.parametrize("filename", ['net"""+open("MARKER", "w")+""".yaml', "net\nimport os\n.yaml", 'net\\".yaml'])
def test_a_template_file_name_cannot_inject_code(filename: str, tmp_path: Path, guard, monkeypatch) -> None:
    template_dir = tmp_path / "tpl"
    template_dir.mkdir()
    (template_dir / filename).write_text(SIMPLE)
    result = build_in(template_dir, [filename, "-o", str(tmp_path / "out"), "--name", "net"], monkeypatch)
    assert result.exit_code == 0, result.output
    src = tmp_path / "out" / "src" / "net"
    for path in src.glob("*.py"):
        tree = ast.parse(path.read_text())
        module_level_is_inert(tree, path)
    check_generated_model_files(src)
    run_forward(tmp_path / "out", "net")
    assert not (template_dir / "MARKER").exists() and not (tmp_path / "MARKER").exists()
    assert guard.events == []


@pytest.mark.parametrize("classname", ["class", "List", "torch", "super", "print"])
def test_a_class_name_that_would_break_or_shadow_generated_code_is_refused(
    classname: str, tmp_path: Path, monkeypatch
) -> None:
    (tmp_path / "net.yaml").write_text(SIMPLE)
    result = build_in(tmp_path, ["net.yaml", "-c", classname, "-o", str(tmp_path / "out")], monkeypatch)
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "internal compiler error" not in result.output
    assert f"`{classname}`" in result.output or f"'{classname}'" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_widening_the_allow_list_is_explicit_and_recorded_in_the_manifest(tmp_path: Path, monkeypatch) -> None:
    import json

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "mylayers.py").write_text(
        "import torch\n\nclass Scale(torch.nn.Module):\n    def __init__(self, factor: float) -> None:\n"
        "        super().__init__()\n        self.factor = factor\n\n    def forward(self, x):\n        return x * self.factor\n"
    )
    monkeypatch.syspath_prepend(str(lib))
    (tmp_path / "net.yaml").write_text(
        "INPUTS: [x]\nFLOW:\n  - [x, y, scale, [_obj_, {_addr_: mylayers.Scale}, {_call_: {factor: 2.0}}]]\n"
    )
    refused = build_in(tmp_path, ["net.yaml", "-o", str(tmp_path / "out")], monkeypatch)
    assert refused.exit_code == 1
    assert "net.yaml:3:36: error[E0402]: `mylayers.Scale` is outside the address allow-list" in refused.output
    assert "--allow-module mylayers" in refused.output
    assert not (tmp_path / "out").exists()
    built = build_in(tmp_path, ["net.yaml", "--allow-module", "mylayers", "-o", str(tmp_path / "out")], monkeypatch)
    assert built.exit_code == 0, built.output
    src = tmp_path / "out" / "src" / "net"
    assert json.loads((src / "manifest.json").read_text())["allowed_modules"] == ["mylayers"]
    assert "self.scale = mylayers.Scale(factor=2.0)" in (src / "model.py").read_text()
    assert '"mylayers"' in (tmp_path / "out" / "pyproject.toml").read_text()
    # widening one module does not widen what it imports
    (tmp_path / "alias.yaml").write_text("INPUTS: [x]\nFLOW:\n  - [x, y, s, [_obj_, {_addr_: mylayers.torch.load}]]\n")
    alias = build_in(tmp_path, ["alias.yaml", "--allow-module", "mylayers", "-o", str(tmp_path / "out2")], monkeypatch)
    assert alias.exit_code == 1 and "error[E0403]: `mylayers.torch.load` leads to `torch.load`" in alias.output


def test_a_jinja_loop_that_never_ends_is_stopped_with_a_diagnostic(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SCMC_MAX_JINJA_SECONDS", "2")
    (tmp_path / "spin.yaml").write_text(
        "INPUTS: [x]\nFLOW:\n  - _jinja_yaml_: |-\n"
        "      {% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n"
        "      - [x, y]\n"
    )
    start = time.monotonic()
    result = build_in(tmp_path, ["spin.yaml", "-o", str(tmp_path / "out")], monkeypatch)
    assert time.monotonic() - start < 30
    assert_refused(result, "spin.yaml", "E0311")


def test_nested_user_layers_generating_a_million_layers_hit_the_layer_limit(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "huge.yaml").write_text(
        "INPUTS: [x]\nINPUT_SHAPES: {x: [4]}\nFLOW:\n  - _jinja_yaml_: |-\n"
        "      {% for i in range(1000) %}\n      - [x, x, {TYPE: Inner}]\n      {% endfor %}\n  - [x, y]\n"
        "Inner:\n  FLOW:\n    - _jinja_yaml_: |-\n"
        "        {% for i in range(1000) %}\n        - [x, x, [_obj_, {_addr_: torch.nn.Identity}, _call_]]\n"
        "        {% endfor %}\n    - [x, y]\n"
    )
    start = time.monotonic()
    result = build_in(tmp_path, ["huge.yaml", "-o", str(tmp_path / "out")], monkeypatch)
    assert time.monotonic() - start < 60
    assert_refused(result, "huge.yaml", "E0707")
    assert "more than 10000 layers" in result.output


def test_the_shipped_golden_packages_run_nothing_at_import_time() -> None:
    for src in sorted((ROOT / "tests" / "golden").glob("*/src/*")):
        check_generated_model_files(src)


# --------------------------------------------------------------------------- the harness itself


def test_the_guard_sees_processes_and_writes_outside_the_test_directory(tmp_path: Path, guard) -> None:
    import subprocess
    import tempfile

    subprocess.run(["true"], check=True)
    with tempfile.TemporaryDirectory() as elsewhere:
        Path(elsewhere, "f").write_text("x")
    (tmp_path / "inside").write_text("fine")
    events = list(guard.events)
    guard.events.clear()
    assert any(e.startswith("subprocess.Popen") for e in events), events
    assert any(e.startswith("open(") and elsewhere in e for e in events), events
    assert not any("inside" in e for e in events)


def test_the_marker_does_appear_when_a_payload_is_trusted(tmp_path: Path, monkeypatch) -> None:
    """The corpus would notice a payload that runs: trusting payload.py runs it at build time."""
    template_dir, marker = stage("file_untrusted", tmp_path)
    result = build_in(
        template_dir, ["file_untrusted.yaml", "--allow-module", "payload", "-o", str(tmp_path / "out")], monkeypatch
    )
    assert marker.exists(), result.output
    sys.modules.pop("scmc_files.payload", None)


def test_a_p_value_with_exploding_aliases_is_refused(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "net.yaml").write_text(SIMPLE)
    levels = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 8)]
    value = "note=[" + ", ".join(levels) + "]"
    start = time.monotonic()
    result = build_in(tmp_path, ["net.yaml", "-p", value, "-o", str(tmp_path / "out")], monkeypatch)
    assert time.monotonic() - start < 30
    assert result.exit_code == 1
    assert "error[E0211]" in result.output and "expands to more than 200,000 values" in result.output
    assert not (tmp_path / "out").exists()
