"""The build cache (scmc/cache.py): a hit gives the same bytes as compiling; any change to what
the build read, asked for or ran on is a miss; a broken cache never breaks a build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from scmc import cache
from scmc.cli import main
from tests.conftest import tree_bytes

HEAD = """\
PARAMETERS:
  DEFAULT: {classes: 3}
INPUTS: [feat]
OUTPUTS: [logits]
FLOW:
  - _jinja_yaml_: |-
      - [feat, logits, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ classes }}}}]]
"""

MODEL = """\
PARAMETERS:
  DEFAULT: {width: 8}
INPUTS: [x]
OUTPUTS: [y]
INPUT_SHAPES: {x: [4]}
FLOW:
  - _jinja_yaml_: |-
      - [x, _, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ width }}}}]]
  - [_, y, head, {CFG: parts/head.yaml}]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model template with a CFG include, the cache switched on in a private directory."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "head.yaml").write_text(HEAD)
    (tmp_path / "net.yaml").write_text(MODEL)
    monkeypatch.delenv("SCMC_NO_CACHE", raising=False)
    monkeypatch.setenv("SCMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def build(out: str, *args: str, expect: int = 0, template: str = "net.yaml") -> str:
    result = CliRunner().invoke(main, ["build", template, "-o", out, "--force", *args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.output


def entries(project: Path) -> list[Path]:
    return sorted((project / "cache" / f"v{cache.FORMAT}").glob("*.json"))


def test_a_hit_writes_the_same_bytes_as_compiling(project: Path) -> None:
    first = build("a")
    assert "from the build cache" not in first
    assert len(entries(project)) == 1
    second = build("b")
    assert "from the build cache" in second
    build("c", "--no-cache")
    assert tree_bytes(project / "a") == tree_bytes(project / "b") == tree_bytes(project / "c")
    assert len(entries(project)) == 1  # --no-cache neither read nor wrote it


def test_the_cache_directory_is_private(project: Path) -> None:
    build("a")
    assert (project / "cache").stat().st_mode & 0o077 == 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# change -> (template (and arguments) built first, what changes, template and arguments of the rebuild,
#            the file it writes (relative to the project) and a text that shows the change)
KEY_CASES = {
    "edit the template": (
        "net.yaml",
        lambda p: _write(p / "net.yaml", MODEL.replace("width: 8", "width: 6")),
        ["net.yaml"],
        "b/src/net/model.py",
        "Linear(in_features=4, out_features=6",
    ),
    "edit a CFG file": (
        "net.yaml",
        lambda p: _write(p / "parts" / "head.yaml", HEAD.replace("classes: 3", "classes: 5")),
        ["net.yaml"],
        "b/src/net/model.py",
        "Linear(in_features=8, out_features=5",
    ),
    # CFG looks next to the template first, then in the working directory: a template one
    # level down first takes parts/head.yaml from the cwd (a folder it may read only with
    # --allow-cfg-dir), then one appears next to it.
    "a CFG candidate appears": (
        "sub/net.yaml --allow-cfg-dir .",
        lambda p: _write(p / "sub" / "parts" / "head.yaml", HEAD.replace("classes: 3", "classes: 7")),
        ["sub/net.yaml", "--allow-cfg-dir", "."],
        "b/src/net/model.py",
        "Linear(in_features=8, out_features=7",
    ),
    "another -p": (
        "net.yaml",
        None,
        ["net.yaml", "-p", "width=5"],
        "b/src/net/model.py",
        "Linear(in_features=4, out_features=5",
    ),
    "another --name": ("net.yaml", None, ["net.yaml", "--name", "other"], "b/src/other/model.py", "class Model"),
    # another folder CFG may read: the same files today, but it decides what a later build may read
    "another --allow-cfg-dir": (
        "net.yaml",
        None,
        ["net.yaml", "--allow-cfg-dir", "parts"],
        "b/src/net/model.py",
        "class Model",
    ),
    # the same file, named from another directory: generated files show paths relative to the cwd
    # (and only the file name of one outside it)
    "another cwd": (
        "net.yaml",
        lambda p: os.chdir(p / "parts"),
        ["../net.yaml"],
        "b/src/net/manifest.json",
        '"path": "head.yaml"',
    ),
}


@pytest.mark.parametrize("change", list(KEY_CASES))
def test_every_input_of_a_build_is_part_of_its_key(project: Path, change: str) -> None:
    first, prepare, (template, *args), written, shown = KEY_CASES[change]
    _write(project / "sub" / "net.yaml", MODEL)
    first_template, *first_args = first.split()
    build("a", *first_args, template=first_template)
    if prepare is not None:
        prepare(project)
    out = os.path.relpath(project / "b")  # from the cwd of the rebuild
    output = build(out, *args, template=template)
    assert "from the build cache" not in output
    assert shown in (project / written).read_text()
    assert "from the build cache" in build(out, *args, template=template)  # and the new result is cached in turn


def test_the_installed_software_is_part_of_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "timm-1.0.31.dist-info").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    before = cache.environment_fingerprint()
    (site / "timm-1.0.31.dist-info").rename(site / "timm-1.0.32.dist-info")
    assert cache.environment_fingerprint() != before


def test_a_damaged_entry_is_a_miss_and_is_replaced(project: Path) -> None:
    build("a")
    (entry,) = entries(project)
    entry.write_text(entry.read_text()[:100])
    assert "from the build cache" not in build("b")
    json.loads(entry.read_text())  # rewritten whole
    assert "from the build cache" in build("c")
    assert tree_bytes(project / "a") == tree_bytes(project / "b") == tree_bytes(project / "c")


def test_a_cache_that_cannot_be_written_does_not_fail_the_build(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = project / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("SCMC_CACHE_DIR", str(blocker))
    build("a")
    build("b")
    assert tree_bytes(project / "a") == tree_bytes(project / "b")


def test_failed_builds_and_trusted_modules_are_not_cached(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build("a", "-p", "nope=1", expect=1)
    assert entries(project) == []
    build("a", "--allow-module", "math")
    assert entries(project) == []
    monkeypatch.setenv("SCMC_NO_CACHE", "1")
    build("a")
    assert entries(project) == []


def test_the_oldest_entries_are_evicted(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "MAX_ENTRIES", 2)
    build("a", "-p", "width=1")
    mine = project / "cache" / f"v{cache.FORMAT}" / "notes.json"
    mine.write_text("not scmc's")
    os.utime(mine, (0, 0))  # the oldest file there: still not scmc's to remove
    for width in (2, 3, 4):
        build("a", "-p", f"width={width}")
    assert mine.read_text() == "not scmc's"
    entries_left = [p for p in entries(project) if p != mine]
    assert len(entries_left) == 2
    assert "from the build cache" in build("a", "-p", "width=4")
    assert "from the build cache" not in build("a", "-p", "width=2")


def test_check_compares_against_a_cached_plan(project: Path) -> None:
    build("a")
    (project / "a" / "src" / "net" / "model.py").write_text("# edited\n")
    result = CliRunner().invoke(main, ["build", "net.yaml", "-o", "a", "--check"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "changed   src/net/model.py" in result.output


def test_a_hit_imports_neither_torch_nor_timm(project: Path) -> None:
    """The point of the cache: a whole `scmc build` process without torch start-up."""
    probe = (
        "import sys\n"
        "from scmc.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'timm') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-c", probe, "build", "net.yaml", "-o", "a", "--force"]
    cold = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert cold.returncode == 0, cold.stderr
    assert "IMPORTED ['torch']" in cold.stdout
    warm = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr
    assert "from the build cache" in warm.stdout
    assert "IMPORTED []" in warm.stdout


def test_a_rebuild_after_an_edit_formats_only_what_changed(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import black

    calls: list[str] = []
    real = black.format_str

    def counting(source: str, *, mode: black.Mode) -> str:
        calls.append(source)
        return real(source, mode=mode)

    monkeypatch.setattr(black, "format_str", counting)
    build("a")
    first = len(calls)
    assert first >= 2  # model.py and __init__.py at least
    calls.clear()
    build("b", "-p", "width=5")  # only model.py changes
    assert len(calls) == 1 and "class Model" in calls[0]
    calls.clear()
    build("c", "-p", "width=5", "--no-cache")
    assert len(calls) == first
    assert tree_bytes(project / "b") == tree_bytes(project / "c")


# --------------------------------------------------------------------------- a cache that is data, not instructions
#
# Entries are crafted by hand the way someone who can write the cache directory would: the
# entry's own digest is recomputed after each change, so each check is tested on its own.


def rewrite(entry: Path, change, redigest: bool = True) -> None:
    raw = json.loads(entry.read_text())
    raw.pop("digest")
    change(raw)
    if redigest:
        raw["digest"] = cache._entry_digest(raw)
    entry.write_text(json.dumps(raw))


def add_file(rel: str, data: bytes = b"pwned\n"):
    import base64
    import hashlib

    def change(raw: dict) -> None:
        raw["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "data": base64.b64encode(data).decode()}

    return change


POISONED = {
    "an absolute path": lambda tmp: add_file(str(tmp / "escaped-absolute")),
    "a .. path": lambda tmp: add_file("../escaped-dotdot"),
    "a .. inside the package": lambda tmp: add_file("src/net/../../../escaped-inner"),
    "a hidden name": lambda tmp: add_file("src/.hidden"),
    "a backslash": lambda tmp: add_file("..\\escaped-backslash"),
    "a package name that climbs": lambda tmp: lambda raw: raw.update(name="../../escaped"),
    "a wrong file digest": lambda tmp: lambda raw: raw["files"]["src/net/model.py"].update(sha256="0" * 64),
    "too many files": lambda tmp: lambda raw: [add_file(f"extra{i}.txt")(raw) for i in range(cache.MAX_FILES)],
    "a read that is not a regular file": lambda tmp: lambda raw: raw["reads"].update({"/dev/zero": "0" * 64}),
    "a relative read": lambda tmp: lambda raw: raw["reads"].update({"net.yaml": None}),
}


@pytest.mark.parametrize("case", list(POISONED))
def test_a_poisoned_entry_is_a_miss_and_writes_nothing_outside_the_output(project: Path, case: str) -> None:
    build("a")
    (entry,) = entries(project)
    rewrite(entry, POISONED[case](project))
    output = build("b")
    assert "from the build cache" not in output  # compiled
    assert tree_bytes(project / "a") == tree_bytes(project / "b")
    assert not list(project.parent.glob("escaped*")) and not list(project.glob("escaped*"))
    assert not list(project.rglob("escaped*"))
    assert "from the build cache" in build("c")  # the rebuild replaced the poisoned entry


def test_an_entry_whose_own_digest_is_wrong_is_a_miss(project: Path) -> None:
    build("a")
    (entry,) = entries(project)
    rewrite(entry, lambda raw: raw.update(param_count=7), redigest=False)
    assert "from the build cache" not in build("b")


def test_an_entry_over_the_size_bounds_is_a_miss(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build("a")
    monkeypatch.setattr(cache, "MAX_FILE_BYTES", 100)  # model.py is larger
    assert "from the build cache" not in build("b")
    monkeypatch.setattr(cache, "MAX_FILE_BYTES", 2**20)
    monkeypatch.setattr(cache, "MAX_ENTRY_BYTES", 1_000)
    assert "from the build cache" not in build("c")


def test_an_entry_that_is_a_symlink_is_a_miss(project: Path) -> None:
    build("a")
    (entry,) = entries(project)
    elsewhere = project / "elsewhere.json"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    assert "from the build cache" not in build("b")


def test_a_read_that_became_a_fifo_is_a_miss_not_a_hang(project: Path) -> None:
    build("a")
    (entry,) = entries(project)
    fifo = project / "pipe"
    os.mkfifo(fifo)
    rewrite(entry, lambda raw: raw["reads"].update({str(fifo): "0" * 64}))
    assert "from the build cache" not in build("b")


def _formatted(project: Path) -> list[Path]:
    return sorted((project / "cache" / f"v{cache.FORMAT}" / "formatted").glob("*.json"))


@pytest.mark.parametrize("redigest", [False, True], ids=["text appended", "text and its digest replaced"])
def test_tampered_formatted_text_never_reaches_a_package(project: Path, redigest: bool) -> None:
    import hashlib

    build("a")
    payload = "\nopen('PWNED', 'w').write('ran on import')\n"
    for path in _formatted(project):
        raw = json.loads(path.read_text())
        raw["text"] += payload
        if redigest:  # a consistent entry, but for another input text than the one it is keyed by
            raw["output"] = hashlib.sha256(raw["text"].encode()).hexdigest()
            raw["input"] = hashlib.sha256(b"some other text").hexdigest()
        path.write_text(json.dumps(raw))
    build("b", "-p", "width=5")  # the package entry misses; __init__.py etc. come from the formatted texts
    build("c", "-p", "width=5", "--no-cache")
    assert tree_bytes(project / "b") == tree_bytes(project / "c")
    assert not any(b"PWNED" in data for data in tree_bytes(project / "b").values())


def test_a_formatted_text_is_reused_only_for_the_text_it_formats(project: Path) -> None:
    build("a")
    raw = json.loads(_formatted(project)[0].read_text())
    assert set(raw) == {"format", "line_length", "input", "output", "text"}
    assert len(raw["input"]) == len(raw["output"]) == 64


def refused_line(output: str, where: Path, says: str) -> str:
    """The one line that says the cache is not used: the directory, why, and what to do."""
    (line,) = [l for l in output.splitlines() if "E0950" in l]
    assert line == (
        f"warning[E0950]: not using the build cache: {where} {says}; make it yours and private (chmod 700 {where}), "
        "set SCMC_CACHE_DIR to a private directory, or pass --no-cache"
    )
    return line


@pytest.mark.parametrize(
    "mode, says", [(0o777, "is writable by group and others"), (0o770, "is writable by its group")]
)
def test_a_cache_directory_others_can_write_is_not_used(project: Path, mode: int, says: str) -> None:
    build("a")
    (entry,) = entries(project)
    rewrite(entry, add_file("../escaped-dotdot"))  # poisoned too: must not even be looked at
    (project / "cache").chmod(mode)
    output = build("b")
    refused_line(output, project / "cache", says)
    assert "from the build cache" not in output
    assert tree_bytes(project / "a") == tree_bytes(project / "b")
    assert not list(project.parent.glob("escaped*"))
    before = {p: p.stat().st_mtime_ns for p in (project / "cache").rglob("*")}
    build("c")
    assert {p: p.stat().st_mtime_ns for p in (project / "cache").rglob("*")} == before  # nothing written


def test_a_cache_subdirectory_that_is_a_symlink_is_not_used(project: Path) -> None:
    build("a")
    version = project / "cache" / f"v{cache.FORMAT}"
    version.rename(project / "moved")
    version.symlink_to(project / "moved")
    output = build("b", "-q")  # said even with --quiet
    assert output.splitlines() == [refused_line(output, version, "is a symbolic link")]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_cache_directory_of_another_user_is_not_used(project: Path) -> None:
    build("a")
    os.chown(project / "cache", 54321, -1)
    output = build("b")
    refused_line(output, project / "cache", "belongs to another user (uid 54321)")
    assert "from the build cache" not in output
    assert tree_bytes(project / "a") == tree_bytes(project / "b")


def test_a_subdirectory_its_group_can_write_is_named(project: Path) -> None:
    build("a")
    version = project / "cache" / f"v{cache.FORMAT}"
    (version / "formatted").chmod(0o770)
    refused_line(build("b"), version / "formatted", "is writable by its group")


def test_a_missing_cache_directory_is_created_private(project: Path) -> None:
    assert cache.refusal() is None  # nothing there yet: not a reason to warn
    build("a")
    for path in [project / "cache", *[p for p in (project / "cache").rglob("*") if p.is_dir()]]:
        assert path.stat().st_mode & 0o077 == 0, path
