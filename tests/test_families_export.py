"""`scmc export` of the other families: ResNet-18 and ViT-Tiny to ONNX, verified against eager PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import build_package, import_package

pytest.importorskip("onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize(
    "template, group, name",
    [("cfg/models/ResNet.yaml", "resnet18", "resnet18_export"), ("cfg/models/ViT.yaml", "tiny", "vit_tiny_export")],
)
def test_export_to_onnx_matches_eager(tmp_path: Path, template: str, group: str, name: str) -> None:
    from scmc.cli import main

    package = build_package(tmp_path / name, template, "-p", f"backbone={group}", "-p", "num_classes=10", name=name)
    torch.manual_seed(0)
    checkpoint = tmp_path / "weights.pt"
    torch.save(import_package(package, name).Model().state_dict(), checkpoint)
    out = tmp_path / "exported"
    result = CliRunner().invoke(
        main,
        ["export", str(package), "--checkpoint", str(checkpoint), "--format", "onnx", "-o", str(out)]
        + ["--latency-rounds", "1"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"]
    [artifact] = report["artifacts"]
    assert artifact["format"] == "onnx" and artifact["verification"]["passed"]
    assert [case["input_shapes"]["image"][0] for case in artifact["verification"]["cases"]][:3] == [1, 2, 7]
    assert all(case["outputs"]["cls"]["max_abs"] < 1e-4 for case in artifact["verification"]["cases"])
