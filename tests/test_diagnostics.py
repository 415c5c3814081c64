"""Rendering diagnostics (scmc/diagnostics.py): a source line is shown only from a file the build
read as a template, cut to a window around the caret; long messages are cut; control characters
are spelled out."""

from __future__ import annotations

from pathlib import Path

from scmc import diagnostics
from scmc.diagnostics import MAX_LINE_CHARS, MAX_MESSAGE_CHARS, Diagnostic, Span, note_source
from tests.conftest import cli


def test_a_line_is_shown_only_from_a_file_read_as_a_template(tmp_path: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("password: hunter2\n")
    diag = Diagnostic("E0700", "somewhere", Span(str(secret), 1, 1))
    assert diag.render() == f"{secret}:1:1: error[E0700]: somewhere"  # on disk, but never read as a template
    note_source(str(secret), "template: line\n")
    assert diag.render().splitlines()[2] == " 1 | template: line"  # the text as the build read it


def test_a_long_line_is_cut_to_a_window_around_the_caret() -> None:
    line = "a" * 5_000 + "X" + "b" * 5_000
    note_source("long.yaml", f"first\n{line}\n")
    text = Diagnostic("E0100", "here", Span("long.yaml", 2, 5_001)).render()
    _, _, shown, caret = text.splitlines()
    assert shown.startswith(" 2 | ...a") and shown.endswith("b...")
    assert len(shown) <= MAX_LINE_CHARS + 20
    assert shown[caret.index("^")] == "X"  # the caret still points at the column


def test_the_window_starts_at_the_line_when_the_caret_is_near_its_start() -> None:
    note_source("start.yaml", "k" + "x" * 1_000 + "\n")
    _, _, shown, caret = Diagnostic("E0100", "here", Span("start.yaml", 1, 1)).render().splitlines()
    assert shown == " 1 | k" + "x" * (MAX_LINE_CHARS - 1) + "..."
    assert caret == "   | ^"


def test_a_long_message_and_hint_are_cut() -> None:
    text = Diagnostic("E0702", "unknown key `" + "k" * 100_000 + "`", hint="h" * 100_000).render()
    first, help_line = text.splitlines()
    assert first.endswith("... (99,014 more characters)")
    assert len(first) < MAX_MESSAGE_CHARS + 60 and len(help_line) < MAX_MESSAGE_CHARS + 60


def test_control_characters_are_spelled_out() -> None:
    note_source("ansi.yaml", "name: \x1b[2J\u202eevil\tX\n")
    text = Diagnostic("E0702", "key `\x1b[31m`", Span("ansi.yaml", 1, 17)).render()
    assert "\x1b" not in text and "\u202e" not in text and "\t" not in text
    _, _, shown, caret = text.splitlines()
    assert shown == " 1 | name: \\x1b[2J\\u202eevil X"
    assert shown[caret.index("^")] == "X"
    assert "key `\\x1b[31m`" in text


def test_only_the_most_recent_sources_are_kept() -> None:
    for i in range(diagnostics.MAX_SOURCES + 5):
        note_source(f"t{i}.yaml", "x: 1\n")
    assert "t0.yaml" not in diagnostics._sources
    assert f"t{diagnostics.MAX_SOURCES + 4}.yaml" in diagnostics._sources
    assert len(diagnostics._sources) == diagnostics.MAX_SOURCES


def test_a_20_mb_template_line_gives_a_short_diagnostic(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SCMC_MAX_TEMPLATE_BYTES", "30000000")  # past the size limit, to reach the YAML error
    (tmp_path / "big.yaml").write_text("INPUTS: [x]\nFLOW: b: c " + "x" * 20_000_000 + "\n")
    result = cli(tmp_path, "big.yaml", "-o", "out")
    assert result.exit_code == 1
    assert len(result.output) < 1_000, len(result.output)
    lines = result.output.splitlines()
    assert lines[0] == "big.yaml:2:8: error[E0100]: invalid YAML: mapping values are not allowed here"
    assert lines[2] == " 2 | FLOW: b: c " + "x" * (MAX_LINE_CHARS - 11) + "..."
    assert lines[3] == "   |        ^"
    assert not (tmp_path / "out").exists()
