"""Where CFG and PACKAGE may read templates from (scmc/lower.py `_resolve_cfg`, scmc/build/
`preset_parts`): the folder of the template given on the command line and its subfolders, plus
``--allow-cfg-dir`` folders. Anything else is refused before it is read (tests/hostile/cfg_*.yaml
try /etc/passwd, /proc/self/environ, ``..``, absolute paths and symbolic links)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import cli


def head(inp: str = "feat", out: str = "logits") -> str:
    return (
        f"INPUTS: [{inp}]\nOUTPUTS: [{out}]\nFLOW:\n"
        f"  - [{inp}, {out}, fc, [_obj_, {{_addr_: torch.nn.LazyLinear}}, {{_call_: {{out_features: 3}}}}]]\n"
    )


HEAD = head()


def model(cfg: str) -> str:
    return f"INPUTS: [x]\nOUTPUTS: [y]\nINPUT_SHAPES: {{x: [4]}}\nFLOW:\n  - [x, y, head, {{CFG: {cfg}}}]\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """models/net.yaml, models/parts/, and a sibling folder shared/ with a head template."""
    for folder in ("models/parts", "shared"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "shared" / "head.yaml").write_text(HEAD)
    return tmp_path


def test_a_cfg_in_a_subfolder_and_a_nested_one_back_in_the_folder_are_read(tree: Path) -> None:
    (tree / "models" / "parts" / "wrap.yaml").write_text(
        model("../common.yaml").replace("INPUT_SHAPES: {x: [4]}\n", "")
    )
    (tree / "models" / "common.yaml").write_text(head("x", "y"))
    (tree / "models" / "net.yaml").write_text(model("parts/wrap.yaml"))
    result = cli(tree, "models/net.yaml", "-o", "out", "-q")
    assert result.exit_code == 0, result.output
    assert "out_features=3" in (tree / "out" / "src" / "net" / "model.py").read_text()


def test_a_sibling_folder_needs_allow_cfg_dir(tree: Path) -> None:
    (tree / "models" / "net.yaml").write_text(model("../shared/head.yaml"))
    refused = cli(tree, "models/net.yaml", "-o", "out")
    assert refused.exit_code == 1
    assert refused.output.splitlines()[0] == (
        "models/net.yaml:5:24: error[E0790]: CFG `../shared/head.yaml` is outside the template's folder models; "
        "it was not read"
    )
    assert "pass --allow-cfg-dir DIR" in refused.output
    assert not (tree / "out").exists()
    allowed = cli(tree, "models/net.yaml", "-o", "out", "-q", "--allow-cfg-dir", "shared")
    assert allowed.exit_code == 0, allowed.output
    assert "out_features=3" in (tree / "out" / "src" / "net" / "model.py").read_text()


def test_allow_cfg_dir_must_name_a_folder(tree: Path) -> None:
    (tree / "models" / "net.yaml").write_text(model("parts/head.yaml"))
    result = cli(tree, "models/net.yaml", "-o", "out", "--allow-cfg-dir", "nope")
    assert result.exit_code == 2
    assert "'--allow-cfg-dir': Directory 'nope' does not exist" in result.output


def test_a_cfg_that_is_not_a_regular_file_is_refused_without_reading_it(tree: Path) -> None:
    os.mkfifo(tree / "models" / "pipe.yaml")  # reading it would block forever
    (tree / "models" / "net.yaml").write_text(model("pipe.yaml"))
    result = cli(tree, "models/net.yaml", "-o", "out")
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == "models/net.yaml:5:24: error[E0791]: CFG `pipe.yaml` is not a regular file"


def test_a_symlink_that_stays_in_the_folder_is_followed(tree: Path) -> None:
    (tree / "models" / "parts" / "head.yaml").write_text(HEAD)
    (tree / "models" / "alias.yaml").symlink_to(tree / "models" / "parts" / "head.yaml")
    (tree / "models" / "net.yaml").write_text(model("alias.yaml"))
    result = cli(tree, "models/net.yaml", "-o", "out", "-q")
    assert result.exit_code == 0, result.output


def test_a_package_preset_outside_the_folder_is_read_but_never_shown(tree: Path) -> None:
    """PACKAGE names templates beside the model's folder (cfg/models/X.yaml -> ../losses/cls.yaml),
    so it is not confined; but a line of a file outside the folder never appears in a diagnostic."""
    (tree / "shared" / "creds.yaml").write_text("secret-canary-77: do not show this line\n  - [unbalanced\n")
    (tree / "models" / "parts" / "head.yaml").write_text(head("x", "y"))
    (tree / "models" / "net.yaml").write_text("PACKAGE: {LOSS: ../shared/creds.yaml}\n" + model("parts/head.yaml"))
    result = cli(tree, "models/net.yaml", "-o", "out")
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith(
        "shared/creds.yaml:1:1: error[E0914]: shared/creds.yaml is a preset template"
    )
    assert "secret-canary" not in result.output and "unbalanced" not in result.output
    allowed = cli(tree, "models/net.yaml", "-o", "out", "--allow-cfg-dir", "shared")
    assert allowed.exit_code == 1
    assert "secret-canary" in allowed.output  # a folder the user vouched for: shown
