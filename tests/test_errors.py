"""The error-case corpus: each malformed template in tests/errors/ gives exactly its diagnostics.

Every ``tests/errors/<case>.yaml`` holds one realistic template with a mistake (one, except
``three_mistakes``); ``<case>.expected`` holds the diagnostic lines the build must print
(``path:line:col: error[CODE]: message``), in order. A case can pass flags to
``scmc build`` with a first-line comment ``# args: -p key=value``. The case file is the model
template, unless the args hold the word ``CASE``: then it stands where ``CASE`` is (``# args:
tests/errors/link/model.yaml --loss CASE``), for mistakes in a loss, metric, backward or
dataset preset. Templates such cases share live in ``tests/errors/link/`` (not cases themselves).

Regenerate the expected files after a deliberate change to a message, then review the diff
line by line (each message must name the right file and line and say what to do):

    .venv/bin/python tests/test_errors.py --regenerate
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES_DIR = ROOT / "tests" / "errors"
CASES = sorted(p.stem for p in CASES_DIR.glob("*.yaml"))

# A diagnostic's first line: `path:line:col: error[E0123]: ...`, or `path: error[...]` without a position.
DIAGNOSTIC = re.compile(r"^\S+?(?::\d+:\d+)?: (?:error|warning)\[[EW]\d{4}\]: ")


def case_args(case: str) -> list[str]:
    first = (CASES_DIR / f"{case}.yaml").read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace")
    match = re.match(r"#\s*args:(.*)", first)
    return shlex.split(match.group(1)) if match else []


def diagnostic_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if DIAGNOSTIC.match(line)]


def run_build(args: list[str]):
    """`scmc build ARGS` in-process, from the repository root; returns click's Result."""
    import os

    from click.testing import CliRunner

    from scmc.cli import main

    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        return CliRunner().invoke(main, ["build", *args])
    finally:
        os.chdir(previous)


def build_case(case: str, out: Path):
    path, args = f"tests/errors/{case}.yaml", case_args(case)
    if "CASE" in args:
        return run_build([path if a == "CASE" else a for a in args] + ["-o", str(out)])
    return run_build([path, *args, "-o", str(out)])


def test_the_corpus_has_at_least_twenty_cases_each_with_expected_diagnostics() -> None:
    assert len(CASES) >= 20
    missing = [c for c in CASES if not (CASES_DIR / f"{c}.expected").is_file()]
    assert not missing, f"cases without a .expected file: {missing}"
    orphans = [p.name for p in CASES_DIR.glob("*.expected") if p.stem not in CASES]
    assert not orphans, f".expected files without a case: {orphans}"


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_template_reports_exactly_its_diagnostics_and_writes_nothing(case: str, tmp_path: Path) -> None:
    result = build_case(case, tmp_path / "out")
    stderr = result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), stderr
    assert "Traceback" not in stderr
    assert "internal compiler error" not in stderr
    assert result.exit_code == 1, stderr
    expected = (CASES_DIR / f"{case}.expected").read_text(encoding="utf-8").splitlines()
    assert diagnostic_lines(stderr) == expected, stderr
    for line in expected:  # each diagnostic names this case's file and a line in it
        assert line.startswith(f"tests/errors/{case}.yaml:"), line
    count = len(expected)
    assert stderr.rstrip().endswith(f"{count} error{'s' if count != 1 else ''}; nothing was written.")
    assert list(tmp_path.iterdir()) == []


def test_every_diagnostic_shows_its_source_line_with_a_caret(tmp_path: Path) -> None:
    result = build_case("unknown_type", tmp_path / "out")
    assert result.stderr.splitlines()[:5] == [
        "tests/errors/unknown_type.yaml:5:28: error[E0700]: unknown user layer TYPE `Blok`",
        "   |",
        " 5 |   - [_, out, block, {TYPE: Blok}]",
        "   |                            ^",
        "  = help: did you mean `Block`?",
    ]


def test_three_independent_mistakes_are_reported_in_one_run(tmp_path: Path) -> None:
    result = build_case("three_mistakes", tmp_path / "out")
    codes = [re.search(r"error\[(E\d+)\]", line).group(1) for line in diagnostic_lines(result.stderr)]
    assert codes == ["E0700", "E0402", "E0722"]


# --------------------------------------------------------------------------- CLI-level errors


def scmc_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scmc", "build", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_a_missing_template_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    result = scmc_subprocess("tests/errors/no_such_template.yaml", "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert diagnostic_lines(result.stderr) == []  # no position to give
    assert result.stderr.startswith("error[E0001]: template file not found: tests/errors/no_such_template.yaml\n")
    assert "= help: check the path" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_template_that_is_not_utf8_is_an_error_at_its_first_bad_line(tmp_path: Path) -> None:
    result = scmc_subprocess("tests/errors/not_utf8.yaml", "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert diagnostic_lines(result.stderr) == (CASES_DIR / "not_utf8.expected").read_text().splitlines()
    assert "= help: save the template as UTF-8" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_directory_is_kept_unless_force_is_given(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = scmc_subprocess("cfg/metrics/topk.yaml", "-o", str(out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.match(r"error\[E0901\]: \S*out already exists\n", result.stderr), result.stderr
    assert "= help: pass --force to replace it" in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "out"]
    assert (out / "keep.txt").read_text() == "mine"


def test_an_unknown_p_key_in_the_upstream_mapping_form_gets_a_did_you_mean(tmp_path: Path) -> None:
    result = run_build(["tests/errors/unknown_param.yaml", "-p", "DEFAULT: {widht: 32}", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "tests/errors/unknown_param.yaml:3:1: error[E0213]: `-p DEFAULT: {widht: 32}` sets `widht`, "
        "which no template of this build defines"
    ]
    assert "did you mean `width`?" in result.stderr


# --------------------------------------------------------------------------- regeneration


def regenerate() -> None:
    import tempfile

    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            result = build_case(case, Path(tmp) / "out")
        lines = diagnostic_lines(result.stderr)
        if result.exit_code != 1 or not lines:
            print(f"{case}: exit {result.exit_code}, no diagnostics -- not written\n{result.output}", file=sys.stderr)
            continue
        target = CASES_DIR / f"{case}.expected"
        text = "\n".join(lines) + "\n"
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_errors.py --regenerate")
    sys.path.insert(0, str(ROOT))
    regenerate()
