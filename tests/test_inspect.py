"""`scmc inspect` and `scmc diff`: layers, parameters, FLOPs and memory of a template or a package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scmc.inspection import inspect_target
from tests.conftest import ROOT, build_package, run_scmc

CONVNEXT = ROOT / "cfg" / "models" / "ConvNeXtV2.yaml"


def invoke(*args: str, cwd: Path = ROOT):
    return run_scmc(cwd, *args)


@pytest.fixture(scope="module")
def femto():
    return inspect_target(CONVNEXT, params=["backbone=femto"], batch_size=4)


def test_femto_at_224_has_timms_parameter_count_and_about_079_gmacs(femto) -> None:
    assert femto.params == femto.trainable == 5_233_240
    assert femto.input_shapes == {"image": {"shape": [3, 224, 224], "dtype": "float32"}}
    # timm publishes 0.79 GMACs for convnextv2_femto at 224; the two counters agree within 10 %
    assert 0.77e9 < femto.macs_ptflops < 0.80e9
    assert 0.77e9 < femto.macs_flop_counter < 0.80e9
    assert not femto.flops_disagree


def test_rows_name_every_layer_to_the_depth_with_shapes_and_parameters(femto) -> None:
    rows = {r.name: r for r in femto.rows}
    assert rows[""].kind == "Model" and rows[""].output_shape == "cls: 1x1000"
    assert rows["backbone.stem"].output_shape == "1x48x56x56"
    assert rows["head"].kind == "Linear" and rows["head"].params == 384 * 1000 + 1000
    assert rows["head"].flops == 2 * 384 * 1000
    assert all(r.name.count(".") < 2 for r in femto.rows)  # depth 2: backbone.block0, not deeper
    assert sum(r.params for r in femto.rows if r.name.count(".") == 0 and r.name) == femto.params


def test_memory_counts_adamw_state_gradients_and_activations_that_grow_with_the_batch(femto) -> None:
    memory = femto.memory
    assert memory.parameters == memory.gradients == 5_233_240 * 4
    assert memory.optimizer_state == 2 * 5_233_240 * 4  # AdamW: exp_avg and exp_avg_sq
    assert "AdamW" in memory.optimizer
    bigger = inspect_target(CONVNEXT, params=["backbone=femto"], batch_size=8, depth=0).memory
    assert bigger.activations == pytest.approx(2 * memory.activations, rel=0.01)
    assert memory.total == memory.parameters + memory.gradients + memory.optimizer_state + memory.activations


def test_a_template_is_inspected_without_writing_anything(tmp_path: Path) -> None:
    before = sorted(p.name for p in ROOT.iterdir())
    result = invoke("inspect", str(CONVNEXT), "-p", "backbone=atto", "--depth", "1", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "3,708,400" in result.output and "(ptflops)" in result.output and "(FlopCounterMode)" in result.output
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in ROOT.iterdir()) == before


def test_a_built_package_gives_the_same_figures_as_its_template(tmp_path: Path) -> None:
    package = build_package(tmp_path / "atto", "cfg/models/ConvNeXtV2.yaml", "-p", "backbone=atto", name="atto_i")
    from_package = inspect_target(package, depth=1)
    from_template = inspect_target(CONVNEXT, params=["backbone=atto"], depth=1)
    assert from_package.params == from_template.params == 3_708_400
    assert from_package.macs_flop_counter == from_template.macs_flop_counter
    assert [r.output_shape for r in from_package.rows] == [r.output_shape for r in from_template.rows]
    result = invoke("inspect", str(package), "--json", "--depth", "0")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params"] == 3_708_400 and data["rows"][0]["kind"] == "Model" and data["flops_disagree"] is False


def test_latency_is_a_median_of_real_forwards() -> None:
    report = inspect_target(CONVNEXT, params=["backbone=atto"], depth=0, latency=True, rounds=3, shapes={})
    assert report.latency_ms["rounds"] == 3 and 0 < report.latency_ms["min_ms"] <= report.latency_ms["median_ms"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "no/such.yaml"], "error: no/such.yaml: no such template or package directory"),
        (["inspect", "docs"], "error: docs: not a package built by scmc (no src/<name>/manifest.json)"),
        (["inspect", str(CONVNEXT), "--depth", "-1"], "error: --depth must be 0 or more, not -1"),
        (["inspect", str(CONVNEXT), "--batch-size", "0"], "error: --batch-size must be at least 1, not 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_a_template_mistake_is_a_located_diagnostic(tmp_path: Path) -> None:
    result = invoke("inspect", str(CONVNEXT), "-p", "backbone=zepto")
    assert result.exit_code == 1 and "ConvNeXtV2.yaml:" in result.output and "Traceback" not in result.output


def test_diff_of_two_parameter_sets_lists_parameters_layers_and_totals() -> None:
    result = invoke("diff", str(CONVNEXT), "--pa", "backbone=atto", "--pb", "backbone=femto", "--json", "--depth", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["left"]["params"] == 3_708_400 and data["right"]["params"] == 5_233_240
    assert data["parameters"]["backbone"] == ["atto", "femto"]
    changed = {c["left"]["name"]: c for c in data["changed"]}
    assert changed["backbone"]["left"]["output_shape"].startswith("feat1: 1x40x56x56")
    assert changed["backbone"]["right"]["output_shape"].startswith("feat1: 1x48x56x56")
    assert data["added"] == [] and data["removed"] == []


def test_diff_of_two_templates_shows_added_and_removed_layers(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(ROOT / "cfg", tmp_path / "cfg")
    norm_step = (
        "          - [_, _, norm, [_obj_, {_addr_: timm.layers.LayerNorm}, {_call_: {num_channels: {{ dims[-1] }}, "
        "eps: {{ norm_eps }}}}]]\n"
    )
    text = CONVNEXT.read_text()
    assert norm_step in text
    (tmp_path / "cfg" / "models" / "NoNorm.yaml").write_text(text.replace(norm_step, ""))
    result = invoke("diff", "cfg/models/ConvNeXtV2.yaml", "cfg/models/NoNorm.yaml", "--depth", "1", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "layers removed:\n  norm (LayerNorm, 1x320, 640)" in result.output
    assert re.search(r"parameters +3,708,400 +3,707,760 +-640\n", result.output)


def test_the_model_card_states_the_models_macs(femto_package: Path) -> None:
    card = (femto_package / "README.md").read_text()
    assert "| compute | 0.78 GMACs per sample at the input shapes below (torch `FlopCounterMode`, inference;" in card
