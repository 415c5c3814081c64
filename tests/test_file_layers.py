"""`_file_` layers: a Python file next to the template, trusted explicitly, shipped in the package."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from scmc.cli import main
from tests.conftest import import_package

LAYER_FILE = """
import pathlib
import torch

pathlib.Path(__file__).with_name("loaded.marker").write_text("ran")


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor
"""
TEMPLATE = """
INPUT_SHAPES: {x: [4]}
OUTPUTS: [y]
FLOW:
  - [x, h, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: 3}}]]
  - [h, y, scale, [_obj_, {_addr_: Scale, _file_: blocks.py}, {_call_: {factor: 2.0}}]]
"""


def write_template(tmp_path: Path) -> Path:
    (tmp_path / "blocks.py").write_text(LAYER_FILE)
    (tmp_path / "net.yaml").write_text(TEMPLATE)
    return tmp_path / "net.yaml"


def test_an_untrusted_layer_file_is_never_run(tmp_path: Path) -> None:
    template = write_template(tmp_path)
    result = CliRunner().invoke(main, ["build", str(template), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "error[E0748]" in result.output and "--allow-module blocks" in result.output
    assert not (tmp_path / "loaded.marker").exists()
    assert not (tmp_path / "out").exists()


def test_a_trusted_layer_file_is_copied_into_the_package_and_imported_relatively(tmp_path: Path) -> None:
    template = write_template(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(template), "-o", str(out), "--allow-module", "blocks", "-q"])
    assert result.exit_code == 0, result.output
    source = (out / "src" / "net" / "model.py").read_text()
    assert "from . import blocks" in source and "self.scale = blocks.Scale(factor=2.0)" in source
    assert (out / "src" / "net" / "blocks.py").read_text() == LAYER_FILE
    assert '"allowed_modules": [\n    "blocks"\n  ]' in (out / "src" / "net" / "manifest.json").read_text()
    pkg = import_package(out, "net")
    model = pkg.Model()
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), model.linear(x) * 2.0)
