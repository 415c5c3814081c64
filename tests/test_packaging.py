"""The generated package as a distribution: its pyproject's formatter settings, `scmc wheel`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from click.testing import CliRunner

from scmc.cli import main


def black_check(package: Path) -> subprocess.CompletedProcess:
    """`black --check .` inside the package: black reads the package's own pyproject.toml."""
    return subprocess.run(
        [sys.executable, "-m", "black", "--check", "."], cwd=package, capture_output=True, text=True, check=False
    )


def test_a_built_package_passes_black_check_with_its_own_pyproject(femto_package: Path) -> None:
    pyproject = tomllib.loads((femto_package / "pyproject.toml").read_text())
    assert pyproject["tool"]["black"] == {"line-length": 100}
    assert pyproject["tool"]["ruff"] == {"line-length": 100}
    result = black_check(femto_package)
    assert result.returncode == 0, result.stderr
    assert "would be left unchanged" in result.stderr


def test_black_check_of_a_package_skips_file_layers_kept_as_their_author_wrote_them(tmp_path: Path) -> None:
    (tmp_path / "blocks.py").write_text(
        "import torch\nclass Scale(torch.nn.Module):\n    def forward(self,x):\n        return x*2\n"
    )
    (tmp_path / "net.yaml").write_text(
        "INPUT_SHAPES: {x: [4]}\nOUTPUTS: [y]\nFLOW:\n"
        "  - [x, y, scale, [_obj_, {_addr_: Scale, _file_: blocks.py}, {_call_}]]\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["build", str(tmp_path / "net.yaml"), "--allow-module", "blocks", "-o", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    name = next((out / "src").iterdir()).name
    assert (out / "src" / name / "blocks.py").read_text() == (tmp_path / "blocks.py").read_text()
    pyproject = tomllib.loads((out / "pyproject.toml").read_text())
    assert pyproject["tool"]["ruff"]["extend-exclude"] == [f"src/{name}/blocks.py"]
    result = black_check(out)
    assert result.returncode == 0, result.stderr
    # the exclusion is exact: the same file under a generated name would be checked
    (out / "src" / name / "model_copy.py").write_text((tmp_path / "blocks.py").read_text())
    assert black_check(out).returncode == 1
