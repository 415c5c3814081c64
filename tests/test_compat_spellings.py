"""structcast-model's other spellings compile to what the canonical spelling compiles to.

The mapping form of an object pattern, ``{_obj_: [[_addr_, X], [_call_, {...}]]}``, wherever a
pattern may stand: a LAYER, a class-valued argument, a backward template's OPTIMIZER and CLIP.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_scmc, tree_bytes

CANONICAL = """\
INPUTS: [x]
OUTPUTS: [y]
INPUT_SHAPES: {x: [4]}
FLOW:
  - [x, _, ident, [_obj_, {_addr_: torch.nn.Identity}, _call_]]
  - [_, _, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 8}}]]
  - [_, _, mlp, [_obj_, {_addr_: timm.layers.Mlp}, {_call_: {in_features: 8, act_layer: [_obj_, {_addr_: torch.nn.ReLU}]}}]]
  - [_, y, head, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 8, out_features: 2}}]]
"""
MAPPING = """\
INPUTS: [x]
OUTPUTS: [y]
INPUT_SHAPES: {x: [4]}
FLOW:
  - [x, _, ident, {_obj_: [[_addr_, torch.nn.Identity], _call_]}]
  - [_, _, fc, {_obj_: [[_addr_, torch.nn.Linear], [_call_, {in_features: 4, out_features: 8}]]}]
  - INPUTS: _
    OUTPUTS: _
    NAME: mlp
    LAYER:
      _obj_:
        - [_addr_, timm.layers.Mlp]
        - [_call_, {in_features: 8, act_layer: {_obj_: [[_addr_, torch.nn.ReLU]]}}]
  - [_, y, head, {_obj_: [[_addr_, torch.nn.Linear], [_call_, {in_features: 8, out_features: 2}]]}]
"""


def built(tmp_path: Path, name: str, text: str, *args: str) -> dict[str, bytes]:
    (tmp_path / f"{name}.yaml").write_text(text)
    result = run_scmc(tmp_path, "build", f"{name}.yaml", "-o", name, "--name", "net", "-q", *args)
    assert result.exit_code == 0, result.output
    # the same package but for the template's own name and digest
    return {
        rel: re.sub(rb'"sha256": "[0-9a-f]+"', b"", data.replace(name.encode(), b"TEMPLATE"))
        for rel, data in tree_bytes(tmp_path / name).items()
    }


def test_the_mapping_form_of_a_pattern_gives_the_same_package_as_the_list_form(tmp_path: Path) -> None:
    canonical = built(tmp_path, "canonical", CANONICAL)
    assert "act_layer=torch.nn.ReLU" in canonical["src/net/model.py"].decode()
    assert built(tmp_path, "mapping", MAPPING) == canonical


def test_a_backward_template_may_spell_optimizer_and_clip_in_the_mapping_form(tmp_path: Path) -> None:
    text = (ROOT / "cfg" / "backwards" / "ConvNeXtV2.yaml").read_text()
    optimizer = (
        "        OPTIMIZER:\n"
        "          - _obj_\n"
        "          - _addr_: structcast_model.torch.optimizers.create_with_scheduler\n"
        "          - _bind_:\n"
    )
    clip = (
        "          CLIP:\n"
        "            - _obj_\n"
        "            - _addr_: timm.utils.clip_grad.dispatch_clip_grad\n"
        "            - _bind_: {value: {{ clip_grad_norm }}, mode: norm, norm_type: 2.0}\n"
    )
    assert optimizer in text and clip in text
    mapping = text.replace(
        optimizer,
        "        OPTIMIZER:\n"
        "          _obj_:\n"
        "          - [_addr_, structcast_model.torch.optimizers.create_with_scheduler]\n"
        "          - - _bind_\n"
        "            -\n",
    ).replace(
        clip,
        "          CLIP:\n"
        "            _obj_:\n"
        "            - [_addr_, timm.utils.clip_grad.dispatch_clip_grad]\n"
        "            - [_bind_, {value: {{ clip_grad_norm }}, mode: norm, norm_type: 2.0}]\n",
    )
    # the _bind_ mapping moves two levels deeper: indent its block to stay inside the pair
    lines, inside = [], False
    for line in mapping.splitlines():
        if line == "            -":
            inside = True
            lines.append(line)
            continue
        if inside and line.startswith("              ") and not line.startswith("        _jinja_yaml_"):
            lines.append("  " + line)
            continue
        inside = inside and not line.startswith("        _jinja_yaml_")
        lines.append(line)
    (tmp_path / "backwards").mkdir()
    (tmp_path / "backwards" / "mapping.yaml").write_text("\n".join(lines) + "\n")
    (tmp_path / "backwards" / "canonical.yaml").write_text(text)
    model = str(ROOT / "cfg" / "models" / "ConvNeXtV2.yaml")
    sources = {}
    for name in ("canonical", "mapping"):
        result = run_scmc(
            tmp_path,
            "build",
            model,
            "-p",
            "backbone=atto",
            "-p",
            "num_classes=10",
            "-p",
            "clip_grad_norm=1.0",
            "--backward",
            f"backwards/{name}.yaml",
            "-o",
            name,
            "--name",
            "net",
            "-q",
            "--allow-cfg-dir",
            str(ROOT),
        )
        assert result.exit_code == 0, result.output
        sources[name] = (tmp_path / name / "src" / "net" / "backward.py").read_text().replace(name, "TEMPLATE")
    assert "dispatch_clip_grad" in sources["canonical"] and "create_with_scheduler" in sources["canonical"]
    assert sources["mapping"] == sources["canonical"]


@pytest.mark.parametrize(
    "step, shown",
    [("[_addr_, torch.nn.ReLU, 3]", "['_addr_', 'torch.nn.ReLU', 3]"), ("7", "7"), ("{_addr_: x}", "{'_addr_': 'x'}")],
)
def test_a_malformed_step_of_the_mapping_form_is_located(tmp_path: Path, step: str, shown: str) -> None:
    (tmp_path / "net.yaml").write_text(f"INPUTS: [x]\nOUTPUTS: [y]\nFLOW:\n  - [x, y, act, {{_obj_: [{step}]}}]\n")
    result = run_scmc(tmp_path, "build", "net.yaml", "-o", "out")
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("net.yaml:4:")
    assert f"error[E0108]: a step of the mapping form of `_obj_` must be [KEY, VALUE] or a bare key, not {shown}" in (
        result.output
    )
    assert not (tmp_path / "out").exists()
