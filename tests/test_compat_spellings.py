"""structcast-model's other spellings compile to what the canonical spelling compiles to.

The mapping form of an object pattern, ``{_obj_: [[_addr_, X], [_call_, {...}]]}``, wherever a
pattern may stand: a LAYER, a class-valued argument, a backward template's OPTIMIZER and CLIP.
A whole layer graph rendered by one top-level ``_jinja_yaml_`` block. The structured (dict)
output of ``scmc torch create model`` by default. (Tuple forms of backward templates:
tests/test_compat_backward.py.)
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

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
    # template names that occur nowhere else in a package (the comparison replaces them by TEMPLATE)
    canonical = built(tmp_path, "spelling_a", CANONICAL)
    assert "act_layer=torch.nn.ReLU" in canonical["src/net/model.py"].decode()
    assert built(tmp_path, "spelling_b", MAPPING) == canonical


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
    # the CLIP pattern (timm's dispatch_clip_grad) becomes the runtime's clip_gradients, which --clip-grad can change
    assert "clip_gradients" in sources["canonical"] and "create_with_scheduler" in sources["canonical"]
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


# --------------------------------------------------------------------------- a whole graph made by Jinja

LOOP_MLP = """\
PARAMETERS:
  DEFAULT: {widths: [4, 16, 16, 2]}
_jinja_yaml_: |-
  INPUTS: [x]
  OUTPUTS: [y]
  INPUT_SHAPES: {x: [{{ widths[0] }}]}
  FLOW:
  {% for i in range(widths | length - 1) %}
    - [{{ "x" if loop.first else "_" }}, {{ "y" if loop.last else "_" }}, fc{{ i }}, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: {{ widths[i] }}, out_features: {{ widths[i + 1] }}}}]]
  {% if not loop.last %}
    - [_, _, act{{ i }}, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]
  {% endif %}
  {% endfor %}
"""
WRITTEN_MLP = """\
PARAMETERS:
  DEFAULT: {widths: [4, 16, 16, 2]}
INPUTS: [x]
OUTPUTS: [y]
INPUT_SHAPES: {x: [4]}
FLOW:
  - [x, _, fc0, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 16}}]]
  - [_, _, act0, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]
  - [_, _, fc1, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 16, out_features: 16}}]]
  - [_, _, act1, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]
  - [_, y, fc2, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 16, out_features: 2}}]]
"""
# the block also makes the layers: one user layer per width (PARAM from the loop), the head's
# class chosen by a parameter, STRUCTURED_OUTPUT rendered too
BLOCK = """\
Block:
  PARAMETERS:
    DEFAULT: {width: 4}
  _jinja_yaml_: |-
    INPUTS: [x]
    OUTPUTS: [h]
    FLOW:
      - [x, h, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ width }}}}]]
      - [h, h, act, [_obj_, {_addr_: torch.nn.GELU}, _call_]]
"""
LOOP_BLOCKS = """\
PARAMETERS:
  DEFAULT: {widths: [8, 16], num_classes: 3, head: LazyLinear}
_jinja_yaml_: |-
  INPUTS: [x]
  OUTPUTS: [logits]
  STRUCTURED_OUTPUT: true
  INPUT_SHAPES: {x: [4]}
  FLOW:
  {% for w in widths %}
    - [{{ "x" if loop.first else "_" }}, _, stage{{ loop.index0 }}, {TYPE: Block, PARAM: {DEFAULT: {width: {{ w }}}}}]
  {% endfor %}
    - [_, logits, classifier, [_obj_, {_addr_: torch.nn.{{ head }}}, {_call_: {out_features: {{ num_classes }}}}]]
""" + BLOCK
WRITTEN_BLOCKS = """\
PARAMETERS:
  DEFAULT: {widths: [8, 16], num_classes: 3, head: LazyLinear}
INPUTS: [x]
OUTPUTS: [logits]
STRUCTURED_OUTPUT: true
INPUT_SHAPES: {x: [4]}
FLOW:
  - [x, _, stage0, {TYPE: Block, PARAM: {DEFAULT: {width: 8}}}]
  - [_, _, stage1, {TYPE: Block, PARAM: {DEFAULT: {width: 16}}}]
  - [_, logits, classifier, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: 3}}]]
""" + BLOCK


@pytest.mark.parametrize("rendered, written", [(LOOP_MLP, WRITTEN_MLP), (LOOP_BLOCKS, WRITTEN_BLOCKS)])
def test_a_graph_rendered_by_one_jinja_block_is_the_graph_written_out(
    tmp_path: Path, rendered: str, written: str
) -> None:
    expected = built(tmp_path, "spelled_out", written)
    assert built(tmp_path, "by_jinja", rendered) == expected
    assert "class Model(torch.nn.Module)" in expected["src/net/model.py"].decode()


def test_overrides_reach_a_graph_rendered_by_jinja(tmp_path: Path) -> None:
    shorter = WRITTEN_MLP.replace("widths: [4, 16, 16, 2]", "widths: [4, 8, 2]")
    shorter = shorter.split("FLOW:\n")[0] + (
        "FLOW:\n"
        "  - [x, _, fc0, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 8}}]]\n"
        "  - [_, _, act0, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]\n"
        "  - [_, y, fc1, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 8, out_features: 2}}]]\n"
    )
    expected = built(tmp_path, "spelled_out", shorter)
    overridden = built(tmp_path, "by_jinja", LOOP_MLP, "-p", "widths=[4, 8, 2]")
    source = overridden["src/net/model.py"].decode()
    assert "# Parameters: widths=[4, 8, 2]\n" in source  # the header names the -p value
    assert source.replace("widths=[4, 8, 2]", "(template defaults)") == expected["src/net/model.py"].decode()


def test_a_mistake_in_a_rendered_graph_points_into_the_jinja_block(tmp_path: Path) -> None:
    text = LOOP_MLP.replace("torch.nn.ReLU", "torch.nn.ReLUU")
    (tmp_path / "net.yaml").write_text(text)
    result = run_scmc(tmp_path, "build", "net.yaml", "-o", "out")
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        "net.yaml:3:1: error[E0406]: `torch.nn` has no attribute `ReLUU` (in the output of this Jinja block)"
    ), result.output
    assert "did you mean `ReLU`?" in result.output
    assert not (tmp_path / "out").exists()


def test_a_block_that_renders_a_preset_is_still_a_preset(tmp_path: Path) -> None:
    """cfg/others/ema.yaml is PARAMETERS plus one block on purpose: an EMA preset, not a graph."""
    ema = ROOT / "cfg" / "others" / "ema.yaml"
    assert "_jinja_yaml_" in ema.read_text() and "FLOW" not in ema.read_text()
    (tmp_path / "ema.yaml").write_text(ema.read_text())
    refused = run_scmc(tmp_path, "build", "ema.yaml", "-o", "out")
    assert refused.exit_code == 1
    assert refused.output.splitlines()[0] == (
        "ema.yaml:1:1: error[E0914]: ema.yaml is a preset template, but it was given as the model"
    )
    built(tmp_path, "net", "PACKAGE: {EMA: ema.yaml}\n" + LOOP_MLP)
    presets = json.loads((tmp_path / "net" / "src" / "net" / "manifest.json").read_text())["presets"]
    assert presets == {
        "ema": {
            "decay": 0.998,
            "min_decay": 0.0,
            "update_after_step": 0,
            "use_warmup": True,
            "warmup_gamma": 1.0,
            "warmup_power": 0.6666666666666666,
            "foreach": True,
            "exclude_buffers": False,
        }
    }
    # and a graph made by a block is no preset
    (tmp_path / "as_ema.yaml").write_text(LOOP_MLP)
    (tmp_path / "wrong.yaml").write_text("PACKAGE: {EMA: as_ema.yaml}\n" + LOOP_MLP)
    wrong = run_scmc(tmp_path, "build", "wrong.yaml", "-o", "out2")
    assert wrong.exit_code == 1
    assert "as_ema.yaml:1:1: error[E0914]: as_ema.yaml is a layer graph template, but it was given as the ema" in (
        wrong.output
    )


# --------------------------------------------------------------------------- torch create model: dict output

ONE_STEP = "INPUTS: [x]\nINPUT_SHAPES: {x: [4]}\nFLOW:\n  - [x, y, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 3}}]]\n"
TWO_OUTPUTS = (
    "INPUTS: [x]\nOUTPUTS: [a, b]\nINPUT_SHAPES: {x: [4]}\nFLOW:\n"
    "  - [x, a, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 3}}]]\n"
    "  - [a, b, act, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]\n"
)


def created_module(tmp_path: Path, template: Path, *flags: str):
    out = tmp_path / f"{template.stem}_{len(flags)}.py"
    result = run_scmc(tmp_path, "torch", "create", "model", str(template), "-o", out.name, "-q", *flags)
    assert result.exit_code == 0, result.output
    spec = importlib.util.spec_from_file_location(out.stem, out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, outputs", [(ONE_STEP, {"y"}), (TWO_OUTPUTS, {"a", "b"})])
def test_torch_create_model_returns_a_dict_unless_told_not_to(tmp_path: Path, text: str, outputs: set) -> None:
    (tmp_path / "net.yaml").write_text(text)
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    structured = created_module(tmp_path, tmp_path / "net.yaml").Model()
    out = structured(x)
    assert isinstance(out, dict) and set(out) == outputs
    plain_model = created_module(tmp_path, tmp_path / "net.yaml", "--no-structured-output").Model()
    plain_model.load_state_dict(structured.state_dict())
    values = plain_model(x)
    if len(outputs) == 1:
        assert isinstance(values, torch.Tensor) and torch.equal(values, out["y"])
    else:
        assert isinstance(values, tuple) and torch.equal(values[0], out["a"]) and torch.equal(values[1], out["b"])
    # `scmc build` keeps the template's STRUCTURED_OUTPUT (false when unset)
    assert "Dict" not in built(tmp_path, "pkg", text)["src/net/model.py"].decode()


def test_torch_create_model_returns_a_dict_for_the_loss_and_metric_templates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cls, label = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = created_module(tmp_path, ROOT / "cfg" / "losses" / "cls.yaml", "-c", "Loss").Loss()
    value = loss(label=label, cls=cls)
    assert isinstance(value, dict) and set(value) == {"ce_loss"} and value["ce_loss"].ndim == 0
    bare = created_module(tmp_path, ROOT / "cfg" / "losses" / "cls.yaml", "-c", "Loss", "--no-structured-output")
    assert isinstance(bare.Loss()(label=label, cls=cls), torch.Tensor)
    metric = created_module(tmp_path, ROOT / "cfg" / "metrics" / "topk.yaml", "-c", "Metric").Metric()
    scores = metric(label=label, cls=cls)
    assert isinstance(scores, dict) and set(scores) == {"acc1", "acc5"}
    assert 0.0 <= float(scores["acc1"]) <= float(scores["acc5"]) <= 100.0


def test_with_sublayer_the_layers_own_structured_output_decides_unless_a_flag_is_given(tmp_path: Path) -> None:
    text = (
        "INPUTS: [x]\nINPUT_SHAPES: {x: [4]}\nFLOW:\n  - [x, y, body, {TYPE: Body}]\n"
        "Body:\n  INPUTS: [x]\n  FLOW:\n"
        "    - [x, h, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 3}}]]\n"
    )
    (tmp_path / "net.yaml").write_text(text)
    x = torch.randn(2, 4)
    body = created_module(tmp_path, tmp_path / "net.yaml", "--sublayer", "Body", "--shape", "x=4").Model()
    assert isinstance(body(x), torch.Tensor)  # Body leaves STRUCTURED_OUTPUT unset: false, as upstream
    forced = created_module(
        tmp_path, tmp_path / "net.yaml", "--sublayer", "Body", "--shape", "x=4", "-c", "B", "--structured-output"
    )
    assert set(forced.B()(x)) == {"h"}
