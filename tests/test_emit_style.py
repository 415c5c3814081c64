"""The generated model.py reads like hand-written PyTorch (timm's convnext.py side by side):
operators and tensor methods for stateless steps, `nn.Identity` for a zero drop rate, ..."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scmc.build import BuildRequest, Part, plan_package

GOLDEN = Path(__file__).parent / "golden" / "convnextv2_femto" / "src" / "convnextv2_femto" / "model.py"


def compiled(tmp_path: Path, text: str) -> str:
    """model.py compiled from the template TEXT (written to tmp_path/t.yaml)."""
    path = tmp_path / "t.yaml"
    path.write_text(text)
    request = BuildRequest(parts=[Part("model", path, "Model")], params=[], presets=False)
    plan = plan_package(request)
    return next(data.decode() for name, data in plan.files.items() if name.endswith("/model.py"))


def run(source: str, where: Path, training: bool = False) -> torch.nn.Module:
    """Model() of SOURCE, imported from a file in WHERE (TorchScript reads the source back)."""
    import importlib.util

    path = where / f"generated_{abs(hash(source))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # our own output under test
    return module.Model().train(training)


def layer(name: str, kwargs: str = "") -> str:
    call = f"{{_call_: {{{kwargs}}}}}" if kwargs else "_call_"
    return f"[_obj_, {{_addr_: structcast_model.torch.layers.{name}}}, {call}]"


OPS = f"""
INPUTS: [a, b]
OUTPUTS: [out]
INPUT_SHAPES: {{a: [2, 3, 4], b: [2, 3, 4]}}
FLOW:
  - [[[a, b]], s, add, {layer("Add")}]
  - [[[s, b, a]], p, mul, {layer("Multiply")}]
  - [p, q, to_last, {layer("ToChannelLast")}]
  - [[[q, q]], c, cat, {layer("Concatenate", "dim: 1")}]
  - [c, out, to_first, {layer("ToChannelFirst")}]
"""


def test_stateless_steps_are_operators_and_tensor_methods_without_attributes(tmp_path: Path) -> None:
    source = compiled(tmp_path, OPS)
    assert "s = a + b" in source
    assert "p = s * b * a" in source
    assert "q = p.permute(0, 2, 3, 1)" in source
    assert "c = torch.cat([q, q], dim=1)" in source
    assert "out = c.permute(0, 3, 1, 2)" in source
    assert "scmc_runtime" not in source  # no layer object left, so no import of the runtime layers
    a, b = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    model = run(source, tmp_path)
    assert list(model.state_dict()) == [] and list(model.children()) == []
    q = ((a + b) * b * a).permute(0, 2, 3, 1)
    assert torch.equal(model(a, b), torch.cat([q, q], dim=1).permute(0, 3, 1, 2))
    assert torch.equal(torch.jit.script(model)(a, b), model(a, b))


def test_a_list_value_or_an_expression_operand_keeps_the_meaning(tmp_path: Path) -> None:
    text = f"""
INPUTS: [a, b]
OUTPUTS: [out, t]
INPUT_SHAPES: {{a: [4], b: [4]}}
FLOW:
  - [[[a, b]], pair]
  - [[pair], s, add, {layer("Add")}]
  - [[["eval: a - b", b]], t, mul, {layer("Multiply")}]
  - [[[s, t]], out, add]
"""
    source = compiled(tmp_path, text)
    # a list held in a name: the layer stays (called twice, so both calls keep it)
    assert "self.add = scmc_runtime.layers.Add()" in source
    assert "s = self.add(pair)" in source and "out = self.add([s, t])" in source
    assert "t = (a - b) * b" in source
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    out, t = run(source, tmp_path)(a, b)
    assert torch.equal(t, (a - b) * b) and torch.equal(out, a + b + t)


def test_the_femto_golden_has_no_operator_layers_and_timms_state_dict_keys(tmp_path: Path) -> None:
    source = GOLDEN.read_text()
    assert "out = inp + residual" in source and "x = x.permute(0, 2, 3, 1)" in source
    assert "Permute(" not in source and "Add(" not in source and "scmc_runtime" not in source
    model = run(source, tmp_path)
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        reference = timm.create_model("convnextv2_femto", pretrained=False, num_classes=10)
    assert len(model.state_dict()) == len(reference.state_dict())


def drop(rate: float) -> str:
    return f"[_obj_, {{_addr_: timm.layers.DropPath}}, {{_call_: {{drop_prob: {rate}}}}}]"


PATH_DROP = drop("{{ rate }}")  # a Jinja expression: the rate is the layer's PARAM
DROPS = f"""
INPUTS: [x]
OUTPUTS: [out]
INPUT_SHAPES: {{x: [4]}}
FLOW:
  - [x, a, path0, {{TYPE: Path, PARAM: {{DEFAULT: {{rate: 0.0}}}}}}]
  - [a, b, dropout, [_obj_, {{_addr_: torch.nn.Dropout}}, {{_call_: {{p: 0.0}}}}]]
  - [b, c, kept, [_obj_, {{_addr_: torch.nn.Dropout}}, {{_call_: {{p: 0.5}}}}]]
  - [c, out, fc, [_obj_, {{_addr_: torch.nn.Linear}}, {{_call_: {{in_features: 4, out_features: 4}}}}]]

# stochastic depth while training; the identity at inference
Path:
  _jinja_yaml_: |-
    FLOW: [[inp, out, drop, {PATH_DROP}]]
  INFERENCE_FLOW: [[inp, out]]
"""


def test_a_zero_rate_dropout_is_an_identity_and_a_layer_that_does_nothing_goes(tmp_path: Path) -> None:
    source = compiled(tmp_path, DROPS)
    assert "self.path0 = torch.nn.Identity()" in source
    assert "self.dropout = torch.nn.Identity()" in source
    assert "self.kept = torch.nn.Dropout(p=0.5)" in source
    assert "class Path" not in source  # the wrapper only dropped with rate 0: nothing left to define
    model = run(source, tmp_path)
    assert list(model.state_dict()) == ["fc.weight", "fc.bias"]
    x = torch.randn(3, 4)
    assert torch.equal(model(x), model.fc(x))


def test_a_nonzero_rate_keeps_the_drop_path_layer(tmp_path: Path) -> None:
    source = compiled(tmp_path, DROPS.replace("rate: 0.0", "rate: 0.25"))
    assert "class Path(torch.nn.Module):" in source
    assert "timm.layers.DropPath(drop_prob=0.25)" in source and "self.path0 = Path()" in source


def test_a_class_with_nothing_to_construct_has_no_init_and_annotations_are_builtin_generics(tmp_path: Path) -> None:
    source = compiled(tmp_path, OPS.replace("OUTPUTS: [out]", "OUTPUTS: [out, s]\nSTRUCTURED_OUTPUT: true"))
    assert "def __init__" not in source and "super()" not in source
    assert "-> dict[str, torch.Tensor]:" in source
    assert "typing" not in source and "Dict" not in source


def test_the_femto_golden_reads_like_timms_convnext() -> None:
    source = GOLDEN.read_text()
    assert "self.drop_path = torch.nn.Identity()" in source and "class DropPath" not in source
    assert "import timm.layers\nimport timm.layers.grn\n" in source  # each module as the code spells it
    assert "from typing" not in source and "-> dict[str, torch.Tensor]:" in source
    body = source.split("class ")[1:]
    assert all("def __init__(self) -> None:\n        super().__init__()\n\n" not in c for c in body)


COMMENTED = """# A two-layer perceptron.
#
# Build it with `scmc build t.yaml`.
INPUTS: [x]
OUTPUTS: [out]
INPUT_SHAPES: {x: [4]}
FLOW:
  # the hidden layer, with "quotes" and a backslash \\
  - [x, h, hidden, {TYPE: Hidden}]
  - [h, out, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 8, out_features: 2}}]]

# Linear then GELU:
#   the hidden representation.
Hidden:
  OUTPUTS: [out]
  FLOW:
    - [inp, _, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 8}}]]
    # a smooth activation
    - [_, out, act, [_obj_, {_addr_: torch.nn.GELU}, _call_]]
"""


def test_template_comments_open_the_docstrings_and_annotate_the_steps(tmp_path: Path) -> None:
    source = compiled(tmp_path, COMMENTED)
    assert '    """Linear then GELU:\n      the hidden representation.\n\n    User layer `Hidden` of `' in source
    assert '    """A two-layer perceptron.\n\n    The root layer graph of `' in source  # the first paragraph only
    assert "scmc build t.yaml" not in source
    assert '        # the hidden layer, with "quotes" and a backslash \\\n        h = self.hidden(x)\n' in source
    assert "        # a smooth activation\n        out = self.act(x)\n" in source
    model = run(source, tmp_path)
    assert "Linear then GELU" in type(model.hidden).__doc__


def test_a_comment_on_a_jinja_block_is_not_carried() -> None:
    source = GOLDEN.read_text()
    # cfg/models/ConvNeXtV2.yaml: "# The outer pass picks the parameter group; ..." sits on a Jinja block
    assert "outer pass" not in source
    assert '"""LayerNorm over the channels of an NCHW tensor.\n\n    User layer `LayerNorm2d` of' in source


def test_a_do_nothing_layer_called_by_keyword_stays_a_class(tmp_path: Path) -> None:
    text = DROPS.replace("  - [x, a, path0,", "  - [{inp: x}, a, path0,")
    source = compiled(tmp_path, text)
    assert "class Path(torch.nn.Module):" in source and "a = self.path0(inp=x)" in source
    assert "self.drop = torch.nn.Identity()" in source  # its zero-rate drop is still an identity
    x = torch.randn(3, 4)
    model = run(source, tmp_path)
    assert torch.equal(model(x), model.fc(x))
