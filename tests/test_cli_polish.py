"""The command line's conventions: -v/-q everywhere, colour only on a terminal (never with
NO_COLOR), an example in every --help, the exit codes and shell completion documented."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import click
import pytest

from scmc.cli import main, paint, use_colour
from tests.conftest import ROOT, run_scmc

ANSI = "\x1b["


def commands(group: click.Group = main, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command and group below GROUP, with the words that name it."""
    out = []
    for name, command in sorted(group.commands.items()):
        out.append(((*path, name), command))
        if isinstance(command, click.Group):
            out += commands(command, (*path, name))
    return out


def test_every_command_and_group_has_an_example_in_its_help() -> None:
    found = commands()
    assert {"build", "format", "export", "wheel", "inspect", "diff", "graph", "torch"} <= {p[0] for p, _ in found}
    for words, _ in [((), main), *found]:
        result = run_scmc(ROOT, *words, "--help")
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        heading = next((i for i, line in enumerate(lines) if line.strip() in ("Example:", "Examples:")), None)
        assert heading is not None, f"`scmc {' '.join(words)} --help` has no example"
        assert lines[heading + 1].strip().startswith("scmc "), lines[heading + 1]


def test_every_command_takes_verbose_and_quiet() -> None:
    for words, command in commands():
        if isinstance(command, click.Group):
            continue
        flags = {opt for p in command.params for opt in p.opts}
        assert {"-v", "--verbose", "-q", "--quiet"} <= flags, words


def test_verbose_and_quiet_together_are_a_usage_error() -> None:
    result = run_scmc(ROOT, "inspect", "cfg/models/ConvNeXtV2.yaml", "-v", "-q")
    assert result.exit_code == 2 and "-v and -q" in result.output


def test_the_top_help_documents_the_exit_codes_and_shell_completion() -> None:
    text = run_scmc(ROOT, "--help").output
    for code in ("0 success", "1 a user error", "2 a usage error", "70 an internal error"):
        assert code in text
    assert "_SCMC_COMPLETE=bash_source scmc" in text and "NO_COLOR" in text


def test_the_readme_documents_the_exit_codes_and_shell_completion() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "_SCMC_COMPLETE=bash_source scmc" in readme
    assert all(f"| {code} |" in readme for code in ("0", "1", "2", "70"))


def test_quiet_silences_the_status_line_and_keeps_the_errors(tmp_path: Path) -> None:
    args = ["torch", "create", "backward", "cfg/backwards/ConvNeXtV2.yaml"]
    loud = run_scmc(ROOT, *args, "-o", str(tmp_path / "a.py"))
    assert loud.exit_code == 0 and "wrote" in loud.output
    quiet = run_scmc(ROOT, *args, "-o", str(tmp_path / "b.py"), "-q")
    assert quiet.exit_code == 0 and quiet.output == ""
    assert (tmp_path / "b.py").read_text() == (tmp_path / "a.py").read_text()
    failed = run_scmc(ROOT, *args, "-o", str(tmp_path / "b.py"), "-q")  # exists, no --force
    assert failed.exit_code == 1 and "error[E0901]" in failed.output


def test_paint_colours_errors_and_warnings_only_when_asked() -> None:
    text = "cfg/x.yaml:3:1: error[E0001]: bad\nwarning[E0950]: not private"
    assert paint(text, False) == text
    coloured = paint(text, True)
    assert coloured.count(ANSI) >= 2 and click.unstyle(coloured) == text


class _Terminal:
    def isatty(self) -> bool:
        return True


def test_colour_needs_a_terminal_and_no_NO_COLOR(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(_Terminal())
    assert not use_colour(open(os.devnull, "w"))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(_Terminal())


def _stderr_on_a_terminal(env: dict[str, str]) -> str:
    """`scmc build` of a missing template with its stderr on a pseudo-terminal; what it printed there."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "scmc", "build", "no/such/template.yaml"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
        os.close(slave)
        chunks = []
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert process.wait(timeout=60) == 1
    finally:
        os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_on_a_real_terminal_errors_are_coloured_unless_NO_COLOR_is_set() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "runtime" / "src"), *sys.path])
    coloured = _stderr_on_a_terminal(env)
    assert "E0001" in coloured and ANSI in coloured
    plain = _stderr_on_a_terminal({**env, "NO_COLOR": "1"})
    assert "E0001" in plain and ANSI not in plain
    piped = subprocess.run(
        [sys.executable, "-m", "scmc", "build", "no/such/template.yaml"], cwd=ROOT, env=env, capture_output=True
    )
    assert piped.returncode == 1 and b"E0001" in piped.stderr and ANSI.encode() not in piped.stderr
