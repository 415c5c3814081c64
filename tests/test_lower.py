"""scmc.lower: every FLOW step form, input and output form of the spec becomes the expected IR."""

from __future__ import annotations

from pathlib import Path

import pytest

from scmc.diagnostics import CompileError, Diagnostics
from scmc.ir import ChildInst, Instance, dump
from scmc.load import Parameters, read_template
from scmc.lower import Lowerer, Options
from scmc.passes.dedup import deduplicate
from scmc.passes.materialize import materialize


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, _in_repo_root: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates are written to tmp_path and shown relative to it."""
    monkeypatch.chdir(tmp_path)


def lower(text: str, *, files: dict[str, str] | None = None, structured: bool | None = None) -> Instance:
    for name, content in (files or {}).items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(content)
    Path("t.yaml").write_text(text)
    source = read_template(Path("t.yaml"))
    diags = Diagnostics()
    params = Parameters.from_raw(source.data.get("PARAMETERS"), source.data.span, diags)
    lowerer = Lowerer(Options(structured=structured), diags)
    try:
        root = lowerer.lower_root(source, params, "Model")
    except CompileError as exc:
        diags.extend(exc.diagnostics)
    diags.raise_if_any()
    return root


def ir(text: str, **kwargs) -> str:
    """The dumped program, without its two header lines (program root, module Model)."""
    root = lower(text, **kwargs)
    materialize(root, Options().allow)
    return dump(deduplicate(root, "Model"))


def model(text: str, **kwargs) -> list[str]:
    """The root module's dump lines (children, signature, flow), stripped."""
    lines = ir(text, **kwargs).splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("module Model("))
    return [line.strip() for line in lines[start + 1 :]]


def errors(text: str, **kwargs) -> list[tuple[str, int]]:
    with pytest.raises(CompileError) as exc:
        lower(text, **kwargs)
    return [(d.code, d.span.line if d.span else 0) for d in exc.value.diagnostics]


def child(inst: Instance, attr: str) -> ChildInst:
    (found,) = [c for c in inst.children if c.attr == attr]
    return found


LINEAR = "[_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 8, out_features: 8}}]"
RELU = "[_obj_, {_addr_: torch.nn.ReLU}, _call_]"


# --------------------------------------------------------------------------- step forms


def test_a_two_element_step_assigns_its_input_to_its_output() -> None:
    assert model("INPUTS: [x]\nFLOW:\n  - [x, y]\n") == ["inputs x -> outputs y", "flow:", "y <- =(x)"]


def test_a_four_element_step_defines_a_named_layer_and_calls_it() -> None:
    assert model(f"FLOW:\n  - [x, y, fc, {LINEAR}]\n") == [
        "child fc [module] = torch.nn.Linear(in_features=8, out_features=8)",
        "inputs x -> outputs y",
        "flow:",
        "y <- fc(x)",
    ]


def test_a_three_element_step_with_a_name_calls_the_same_layer_again_sharing_weights() -> None:
    assert model(f"FLOW:\n  - [x, a, fc, {LINEAR}]\n  - [a, b, fc]\n") == [
        "child fc [module] = torch.nn.Linear(in_features=8, out_features=8)",
        "inputs x -> outputs a, b",
        "flow:",
        "a <- fc(x)",
        "b <- fc(a)",
    ]


def test_a_three_element_step_with_a_layer_is_auto_named_from_its_class() -> None:
    lines = model(
        f"FLOW:\n  - [x, _, {RELU}]\n  - [_, _, {RELU}]\n"
        "  - [_, y, [_obj_, {_addr_: torch.nn.Conv2d}, {_call_: [3, 3, 1]}]]\n"
    )
    assert lines[:3] == [
        "child relu [module] = torch.nn.ReLU()",
        "child relu_1 [module] = torch.nn.ReLU()",
        "child conv2d [module] = torch.nn.Conv2d(3, 3, 1)",
    ]


def test_a_lazy_layer_is_auto_named_without_the_lazy_prefix_and_materialized() -> None:
    text = "INPUT_SHAPES: {x: [6]}\nFLOW:\n  - [x, y, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: 2}}]]\n"
    assert model(text)[0] == "child linear [module] = torch.nn.Linear(in_features=6, out_features=2, bias=True)"


def test_a_step_mapping_is_the_same_as_the_list_form() -> None:
    mapping = f"FLOW:\n  - INPUTS: x\n    OUTPUTS: y\n    NAME: fc\n    LAYER: {LINEAR}\n"
    assert ir(mapping) == ir(f"FLOW:\n  - [x, y, fc, {LINEAR}]\n")


def test_a_step_mapping_without_inputs_and_outputs_only_defines_a_layer() -> None:
    text = f"FLOW:\n  - NAME: fc\n    LAYER: {LINEAR}\n  - [x, y, fc]\n"
    assert model(text) == [
        "child fc [module] = torch.nn.Linear(in_features=8, out_features=8)",
        "inputs x -> outputs y",
        "flow:",
        "y <- fc(x)",
    ]


def test_a_function_pattern_without_call_is_called_in_forward_with_its_bound_arguments() -> None:
    text = "FLOW:\n  - [x, [a, b], split, [_obj_, {_addr_: torch.chunk}, {_bind_: {chunks: 2}}]]\n"
    assert model(text) == [
        "child split [function] = torch.chunk(chunks=2)",
        "inputs x -> outputs a, b",
        "flow:",
        "(a, b) <- split(x)",
    ]


# --------------------------------------------------------------------------- inputs


def flow_of(text: str) -> list[str]:
    lines = model(text)
    return lines[lines.index("flow:") + 1 :]


def test_a_list_of_names_is_several_positional_arguments() -> None:
    text = "FLOW:\n  - [[a, b], c, add, [_obj_, {_addr_: operator.add}]]\n"
    assert flow_of(text) == ["c <- add(a, b)"]


def test_a_nested_list_is_one_argument_that_is_a_python_list() -> None:
    text = "FLOW:\n  - [[[a, b]], c, add, [_obj_, {_addr_: structcast_model.torch.layers.Add}, _call_]]\n"
    assert flow_of(text) == ["c <- add([a, b])"]


def test_a_mapping_input_is_keyword_arguments() -> None:
    text = (
        "FLOW:\n  - [{target: label, input: cls}, loss, ce, " "[_obj_, {_addr_: torch.nn.CrossEntropyLoss}, _call_]]\n"
    )
    lines = model(text)
    assert lines[1] == "inputs label, cls -> outputs loss"
    assert lines[-1] == "loss <- ce(target=label, input=cls)"


def test_dotted_names_index_into_values() -> None:
    assert flow_of("FLOW:\n  - [a.0, b]\n  - [a.key, c]\n  - [a.-1, d]\n") == [
        "b <- =(a[0])",
        "c <- =(a['key'])",
        "d <- =(a[-1])",
    ]


def test_eval_inputs_become_expressions_over_flow_names_and_imports() -> None:
    text = "IMPORTS: {torch: [cat]}\nINPUTS: [a, b]\nFLOW:\n  - ['eval: cat([a, b * 2], 1)', c]\n"
    assert flow_of(text) == ["c <- =((torch.cat([a, b * 2], 1)))"]


def test_constant_inputs_are_literals() -> None:
    text = (
        "FLOW:\n  - [x, _, relu, " + RELU + "]\n  - [[_, 'constant: 0.5'], y, mul, [_obj_, {_addr_: operator.mul}]]\n"
    )
    assert flow_of(text)[-1] == "y <- mul(_, 0.5)"


# --------------------------------------------------------------------------- outputs


def test_a_list_of_outputs_unpacks_a_tuple() -> None:
    text = "FLOW:\n  - [x, [a, b], [_obj_, {_addr_: torch.chunk}, {_bind_: {chunks: 2}}]]\n"
    assert flow_of(text) == ["(a, b) <- chunk(x)"]


def test_a_mapping_output_binds_names_to_keys_of_the_result() -> None:
    text = "FLOW:\n  - [x, {feature: feat4, first: 0}, " + RELU + "]\n"
    assert flow_of(text) == ["{feature<-['feat4'], first<-[0]} <- relu(x)"]


# --------------------------------------------------------------------------- INPUTS / OUTPUTS / STRUCTURED_OUTPUT


def test_inputs_default_to_the_names_read_before_any_step_writes_them() -> None:
    text = f"FLOW:\n  - [b, h, fc, {LINEAR}]\n  - [[[h, a]], s, add, [_obj_, {{_addr_: operator.add}}]]\n  - [[h, b], out]\n"
    root = lower(text.replace("  - [[h, b], out]\n", "  - [h, out]\n"))
    assert root.inputs == ["b", "a"]


def test_outputs_default_to_every_name_written() -> None:
    root = lower(f"FLOW:\n  - [x, _, fc, {LINEAR}]\n  - [_, y]\n  - [y, _]\n")
    assert root.outputs == ["_", "y"]


def test_declared_inputs_and_outputs_are_kept_in_their_order() -> None:
    root = lower(f"INPUTS: [b, a]\nOUTPUTS: [y]\nFLOW:\n  - [a, y]\n  - [b, z]\n")
    assert (root.inputs, root.outputs) == (["b", "a"], ["y"])


def test_a_single_name_is_accepted_for_inputs_and_outputs() -> None:
    root = lower("INPUTS: x\nOUTPUTS: y\nFLOW:\n  - [x, y]\n")
    assert (root.inputs, root.outputs) == (["x"], ["y"])


def test_structured_output_is_false_unless_set() -> None:
    assert lower("FLOW:\n  - [x, y]\n").structured is False
    assert lower("STRUCTURED_OUTPUT: true\nFLOW:\n  - [x, y]\n").structured is True


def test_no_structured_output_overrides_the_root_template() -> None:
    assert lower("STRUCTURED_OUTPUT: true\nFLOW:\n  - [x, y]\n", structured=False).structured is False


def test_inference_flow_gives_other_steps_for_evaluation() -> None:
    text = (
        "FLOW:\n  - [x, y, drop, [_obj_, {_addr_: torch.nn.Dropout}, {_call_: {p: 0.5}}]]\n"
        "INFERENCE_FLOW:\n  - [x, y]\n"
    )
    assert model(text) == [
        "child drop [module] = torch.nn.Dropout(p=0.5)",
        "inputs x -> outputs y",
        "flow:",
        "y <- drop(x)",
        "inference:",
        "y <- =(x)",
    ]


def test_inference_flow_must_write_the_outputs_too() -> None:
    text = f"OUTPUTS: [y, z]\nFLOW:\n  - [x, y]\n  - [x, z]\nINFERENCE_FLOW:\n  - [x, y]\n"
    assert errors(text) == [("E0712", 1)]


def test_input_shapes_are_read_for_the_root() -> None:
    root = lower("INPUTS: [image]\nINPUT_SHAPES: {image: [3, 8, 8]}\nFLOW:\n  - [image, y]\n")
    assert root.input_shapes == {"image": {"shape": [3, 8, 8], "dtype": "float32"}}


# --------------------------------------------------------------------------- layer arguments


def test_eval_layer_arguments_fold_to_constants() -> None:
    text = (
        "FLOW:\n  - [x, y, conv, [_obj_, {_addr_: torch.nn.Conv2d}, "
        "{_call_: {in_channels: 4, out_channels: 'eval: 48 * 4', kernel_size: 7, padding: 'eval: 7 // 2'}}]]\n"
    )
    assert (
        model(text)[0]
        == "child conv [module] = torch.nn.Conv2d(in_channels=4, out_channels=192, kernel_size=7, padding=3)"
    )


def test_eval_layer_arguments_can_use_imports() -> None:
    text = (
        "IMPORTS: [math]\nFLOW:\n  - [x, y, fc, [_obj_, {_addr_: torch.nn.Linear}, "
        "{_call_: {in_features: 'eval: math.isqrt(64)', out_features: 2}}]]\n"
    )
    assert model(text)[0] == "child fc [module] = torch.nn.Linear(in_features=8, out_features=2)"


def test_an_allow_listed_object_can_be_an_argument() -> None:
    text = (
        "FLOW:\n  - [x, y, fc, [_obj_, {_addr_: torch.nn.Linear}, "
        "{_call_: {in_features: 2, out_features: 2, dtype: 'eval: torch.float64'}}]]\n"
    ).replace("FLOW", "IMPORTS: [torch]\nFLOW", 1)
    assert model(text)[0] == "child fc [module] = torch.nn.Linear(in_features=2, out_features=2, dtype=torch.float64)"


def test_the_upstream_layer_address_maps_to_the_runtime_layer() -> None:
    text = "FLOW:\n  - [[[a, b]], c, add, [_obj_, {_addr_: structcast_model.torch.layers.Add}, _call_]]\n"
    assert model(text)[0] == "child add [module] = scmc_runtime.layers.Add()"


def test_the_upstream_metric_function_maps_to_the_runtime_function() -> None:
    text = (
        "FLOW:\n  - [{y_true: label, y_pred: cls, k: 'constant: 5'}, acc5, "
        "[_obj_, {_addr_: structcast_model.torch.layers.sparse_top_k_categorical_accuracy}]]\n"
    )
    lines = model(text)
    assert (
        lines[0]
        == "child sparse_top_k_categorical_accuracy [function] = scmc_runtime.layers.sparse_top_k_categorical_accuracy()"
    )
    assert lines[-1] == "acc5 <- sparse_top_k_categorical_accuracy(y_true=label, y_pred=cls, k=5)"


# --------------------------------------------------------------------------- user layers

BLOCK = """\
Block:
  PARAMETERS:
    DEFAULT: {width: 2, depth: 3}
  OUTPUTS: [out]
  FLOW:
    - _jinja_yaml_: |-
        - [inp, _, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: {{ width }}, out_features: {{ width * depth }}}}]]
        - [_, out, act, [_obj_, {_addr_: "torch.nn.{{ act }}"}, _call_]]
"""


def test_a_user_layer_renders_with_param_over_the_parents_parameters_over_its_own_defaults() -> None:
    text = (
        "PARAMETERS:\n  DEFAULT: {width: 8, act: GELU}\nFLOW:\n"
        "  - [x, a, plain, {TYPE: Block}]\n"
        "  - [a, b, wide, {TYPE: Block, PARAM: {DEFAULT: {width: 16, act: ReLU}}}]\n" + BLOCK
    )
    root = lower(text)
    plain_block, wide_block = child(root, "plain").instance, child(root, "wide").instance
    # width: the parent's 8 beats the block's default 2; depth: the block's default 3
    assert dict(child(plain_block, "fc").ctor.kwargs) == {"in_features": 8, "out_features": 24}
    assert child(plain_block, "act").ctor.address == "torch.nn.GELU"
    # PARAM beats the parent
    assert dict(child(wide_block, "fc").ctor.kwargs) == {"in_features": 16, "out_features": 48}
    assert child(wide_block, "act").ctor.address == "torch.nn.ReLU"
    assert wide_block.params == {"width": 16, "act": "ReLU"}
    assert (wide_block.inputs, wide_block.outputs) == (["inp"], ["out"])


def test_a_user_layer_becomes_a_class_used_by_the_parent() -> None:
    dumped = ir("PARAMETERS:\n  DEFAULT: {width: 8, act: ReLU}\nFLOW:\n  - [x, y, block, {TYPE: Block}]\n" + BLOCK)
    assert dumped == (
        "program root=Model\n"
        "module Block() template='Block' structured=False\n"
        "  child fc [module] = torch.nn.Linear(in_features=8, out_features=24)\n"
        "  child act [module] = torch.nn.ReLU()\n"
        "  inputs inp -> outputs out\n"
        "  flow:\n"
        "    _ <- fc(inp)\n"
        "    out <- act(_)\n"
        "module Model() template='t.yaml' structured=False\n"
        "  child block [user] = Block()\n"
        "  inputs x -> outputs y\n"
        "  flow:\n"
        "    y <- block(x)\n"
    )


def test_a_dotted_type_names_a_user_layer_nested_in_another() -> None:
    text = """\
FLOW:
  - [x, y, inner, {TYPE: Outer.Inner}]
Outer:
  FLOW:
    - [inp, out, inner, {TYPE: Inner}]
  Inner:
    FLOW:
      - [inp, out, scale, [_obj_, {_addr_: structcast_model.torch.layers.ScaleIdentity}, {_call_: {scale: 2.0}}]]
"""
    inner = child(lower(text), "inner").instance
    assert inner.template == "Outer.Inner"
    assert inner.class_hint == "Inner"
    assert child(inner, "scale").ctor.address == "scmc_runtime.layers.ScaleIdentity"


def test_a_nested_user_layer_sees_the_layers_of_the_file_and_of_its_parent() -> None:
    text = """\
FLOW:
  - [x, y, outer, {TYPE: Outer}]
Outer:
  FLOW:
    - [inp, _, inner, {TYPE: Inner}]
    - [_, out, leaf, {TYPE: Leaf}]
  Inner:
    FLOW:
      - [inp, out, act, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]
Leaf:
  FLOW:
    - [inp, out, act, [_obj_, {_addr_: torch.nn.GELU}, _call_]]
"""
    outer = child(lower(text), "outer").instance
    assert [c.instance.class_hint for c in outer.children] == ["Inner", "Leaf"]


def test_cfg_takes_a_layer_graph_from_another_file_with_its_parameters() -> None:
    head = """\
PARAMETERS:
  DEFAULT: {classes: 10}
INPUTS: [feat]
FLOW:
  - _jinja_yaml_: |-
      - [feat, logits, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: {{ width }}, out_features: {{ classes }}}}]]
"""
    text = (
        "PARAMETERS:\n  DEFAULT: {width: 8}\nFLOW:\n"
        "  - [x, y, head, {CFG: parts/head.yaml}]\n"
        "  - [x, z, head5, {CFG: parts/head.yaml, PARAM: {DEFAULT: {classes: 5}}}]\n"
    )
    root = lower(text, files={"parts/head.yaml": head})
    head10, head5 = child(root, "head").instance, child(root, "head5").instance
    assert head10.template == "parts/head.yaml"
    assert head10.class_hint == "Head"
    assert dict(child(head10, "fc").ctor.kwargs) == {"in_features": 8, "out_features": 10}
    assert dict(child(head5, "fc").ctor.kwargs) == {"in_features": 8, "out_features": 5}


def test_cfg_with_type_takes_a_user_layer_from_another_file() -> None:
    other = "FLOW: []\nStem:\n  FLOW:\n    - [inp, out, act, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]\n"
    root = lower("FLOW:\n  - [x, y, stem, {CFG: blocks.yaml, TYPE: Stem}]\n", files={"blocks.yaml": other})
    stem = child(root, "stem").instance
    assert stem.class_hint == "BlocksStem"
    assert child(stem, "act").ctor.address == "torch.nn.ReLU"


def test_a_type_cycle_is_an_error_naming_the_cycle() -> None:
    text = (
        "FLOW:\n  - [x, y, a, {TYPE: A}]\n"
        "A:\n  FLOW:\n    - [inp, out, b, {TYPE: B}]\n"
        "B:\n  FLOW:\n    - [inp, out, a, {TYPE: A}]\n"
    )
    with pytest.raises(CompileError) as exc:
        lower(text)
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.span.line) == ("E0701", 8)
    assert diag.message == "user layer TYPE cycle: A -> B -> A"


def test_a_user_layer_that_uses_itself_is_a_cycle() -> None:
    assert errors("FLOW:\n  - [x, y, a, {TYPE: A}]\nA:\n  FLOW:\n    - [inp, out, a, {TYPE: A}]\n") == [("E0701", 5)]


def test_using_the_same_user_layer_twice_is_not_a_cycle() -> None:
    text = (
        "FLOW:\n  - [x, a, one, {TYPE: Pair}]\n  - [a, b, two, {TYPE: Pair}]\n"
        "Pair:\n  FLOW:\n    - [inp, _, first, {TYPE: Leaf}]\n    - [_, out, second, {TYPE: Leaf}]\n"
        "Leaf:\n  FLOW:\n    - [inp, out, act, [_obj_, {_addr_: torch.nn.ReLU}, _call_]]\n"
    )
    assert len(lower(text).children) == 2


# --------------------------------------------------------------------------- diagnostics from lowering


def test_a_broken_layer_definition_is_reported_once_not_again_at_each_use() -> None:
    text = f"FLOW:\n  - [x, a, fc-1, {LINEAR}]\n  - [a, b, fc-1]\n  - INPUTS: x\n    NAME: g\n    LAYER: {RELU}\n  - [x, c, g]\n"
    assert errors(text) == [("E0727", 2), ("E0727", 3), ("E0724", 4)]


def test_independent_mistakes_in_different_steps_are_all_reported() -> None:
    text = f"FLOW:\n  - [x, a, fc, {LINEAR}, 5]\n  - [x, b, nope]\n  - [x, c, [_obj_, {{_addr_: os.getcwd}}]]\n"
    assert errors(text) == [("E0722", 2), ("E0729", 3), ("E0402", 4)]


def test_a_layer_name_that_would_shadow_a_module_attribute_is_refused() -> None:
    assert errors(f"FLOW:\n  - [x, y, forward, {LINEAR}]\n") == [("E0728", 2)]


def test_an_assignment_with_several_inputs_is_refused_with_a_hint_to_nest_the_list() -> None:
    with pytest.raises(CompileError) as exc:
        lower("FLOW:\n  - [[a, b], c]\n")
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0731"
    assert "[[[a, b]], out]" in diag.hint


def test_an_unknown_keyword_argument_names_the_closest_parameter() -> None:
    with pytest.raises(CompileError) as exc:
        lower("FLOW:\n  - [x, y, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_feature: 8, out_features: 8}}]]\n")
    (diag,) = exc.value.diagnostics
    assert diag.message == "`torch.nn.Linear` has no parameter `in_feature`"
    assert diag.hint == "did you mean `in_features`?"


def test_a_missing_required_argument_says_which_to_give() -> None:
    with pytest.raises(CompileError) as exc:
        lower("FLOW:\n  - [x, y, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 8}}]]\n")
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0745"
    assert "missing a required argument: 'out_features'" in diag.message
    assert diag.hint == "give `out_features` in `_call_` (or `_bind_`)"


def test_a_layer_that_cannot_be_built_with_its_arguments_is_an_error_at_its_step() -> None:
    with pytest.raises(CompileError) as exc:
        lower(
            "FLOW:\n  - [x, y]\n  - [y, z, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 'eval: 8 / 2'}}]]\n"
        )
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.span.line) == ("E0753", 3)
    assert diag.message.startswith("constructing `torch.nn.Linear` failed: TypeError: ")
    assert diag.hint == "`out_features` must be an integer, not 4.0 (in `eval:`, `//` divides to an integer)"


def test_a_constant_input_that_is_not_yaml_is_an_error_at_its_step() -> None:
    with pytest.raises(CompileError) as exc:
        lower("FLOW:\n  - [x, y]\n  - ['constant: [1, 2', z]\n")
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.span.line) == ("E0736", 3)


def test_a_step_that_only_names_a_layer_is_reported_once() -> None:
    assert errors("FLOW:\n  - NAME: fc\n  - [x, y, fc]\n  - [y, z, fc]\n") == [("E0725", 2)]


# --------------------------------------------------------------------------- capabilities


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("torch.nn.Conv2d", "layer"),
        ("timm.layers.LayerNorm", "layer"),
        ("timm.loss.SoftTargetCrossEntropy", "layer"),
        ("torchvision.ops.StochasticDepth", "layer"),
        ("scmc_runtime.layers.Add", "layer"),
        ("torch.cat", "function"),
        ("torch.nn.functional.gelu", "function"),
        ("torch.linalg.norm", "function"),
        ("torch.Tensor.view", "function"),
        ("math.isqrt", "function"),
        ("operator.add", "function"),
        ("scmc_runtime.layers.sparse_categorical_accuracy", "function"),
        ("torch.ones", "factory"),
        ("torch.arange", "factory"),
        ("torch.optim.AdamW", "optimizer"),
        ("torch.optim.lr_scheduler.OneCycleLR", "scheduler"),
        ("scmc_runtime.optim.create_with_scheduler", "training"),
        ("torch.nn.utils.clip_grad_norm_", "training"),
        ("torch.float64", "value"),
        ("math.pi", "value"),
    ],
)
def test_what_a_template_may_name_is_decided_by_what_the_object_is(address: str, kind: str) -> None:
    from scmc.addresses import AllowList, check_address, classify, resolve

    allow = AllowList()
    obj = resolve(address, allow)
    assert classify(obj, check_address(address, allow), check_address(address, allow), allow) == kind


@pytest.mark.parametrize(
    ("address", "message"),
    [
        (
            "torch.utils.collect_env.run",
            "`torch.utils.collect_env.run` is refused: it is a function, not a layer class or one of the reviewed "
            "pure tensor functions",
        ),
        (
            "torch.UntypedStorage.from_file",
            "`torch.UntypedStorage.from_file` is refused: it is a function (`StorageBase.from_file`), not a layer "
            "class or one of the reviewed pure tensor functions",
        ),
        (
            "torch.nn.functional.torch.load",
            "`torch.nn.functional.torch.load` leads to `torch.load`, which is refused: it is a function "
            "(`torch.serialization.load`), not a layer class or one of the reviewed pure tensor functions",
        ),
        (
            "torch.Tensor",
            "`torch.Tensor` is refused: it is the class `torch.Tensor`, which is not a torch.nn.Module",
        ),
        ("torch.utils", "`torch.utils` is refused: it is a module"),
        (
            "torch.nn.parallel.DistributedDataParallel",
            "`torch.nn.parallel.DistributedDataParallel` is refused: it is a wrapper for multi-process training",
        ),
        (
            "torch.ao.nn.quantized.Linear",
            "`torch.ao.nn.quantized.Linear` is refused: it is a torch.nn.Module defined in "
            "`torch.ao.nn.quantized.modules.linear`, which is not one of the layer libraries",
        ),
        ("torch.Tensor.numpy", None),
        ("torch.Tensor.tolist", None),
        ("torch.Tensor.data_ptr", None),
        ("torch.Tensor.untyped_storage", None),
        ("torch.Tensor.share_memory_", None),
        ("torch.save", None),
        ("torch.from_file", None),
        ("torch.set_default_device", None),
        ("torch.manual_seed", None),
        ("torch.distributed.init_process_group", None),
        ("torch.cuda.synchronize", None),
        ("torch.compile", None),
        ("operator.attrgetter", None),
        ("operator.methodcaller", None),
        ("torch.float32.is_floating_point", None),
    ],
)
def test_everything_else_is_refused_naming_the_address_and_what_it_is(address: str, message: str | None) -> None:
    from scmc.addresses import AddressError, AllowList, resolve

    with pytest.raises(AddressError) as exc:
        resolve(address, AllowList())
    assert exc.value.code == "E0403"
    assert exc.value.message == (message or exc.value.message) and f"`{address}`" in exc.value.message


def test_a_module_is_a_namespace_only_in_imports() -> None:
    from scmc.addresses import AllowList, resolve

    assert resolve("torch.utils.collect_env", AllowList(), namespace=True).__name__ == "torch.utils.collect_env"


def test_allow_module_widens_to_what_that_module_defines() -> None:
    from scmc.addresses import AllowList, check_address, classify, resolve

    allow = AllowList(extra=("torch.utils.collect_env",))
    obj = resolve("torch.utils.collect_env.run", allow)
    assert classify(obj, "torch.utils.collect_env.run", "torch.utils.collect_env.run", allow) == "trusted"
    with pytest.raises(Exception) as exc:  # what it imports is not widened with it
        resolve("torch.utils.collect_env.subprocess.run", allow)
    assert getattr(exc.value, "code", None) == "E0402"


def test_refused_addresses_are_reported_at_the_step_for_every_spelling() -> None:
    head = "IMPORTS: [torch]\nINPUTS: [x]\nFLOW:\n"
    spellings = [
        "  - [x, y, r, [_obj_, {_addr_: torch.utils.collect_env.run}]]\n",
        "  - [x, y, r, [_obj_, {_addr_: torch.utils}, {_attr_: collect_env}, {_attr_: run}]]\n",
        "  - [x, y, r, [_obj_, {_addr_: torch.save}, {_bind_: {f: out.pt}}]]\n",
        "  - ['eval: torch.utils.collect_env.run(x)', y]\n",
        "  - ['eval: torch.Tensor.numpy(x)', y]\n",
        "  - [x, y, m, [_obj_, {_addr_: timm.layers.Mlp}, {_call_: {in_features: 4, act_layer: [_obj_, {_addr_: torch.Tensor}]}}]]\n",
        "  - [x, y, m, [_obj_, {_addr_: timm.layers.Mlp}, {_call_: {in_features: 4, act_layer: 'eval: torch.save'}}]]\n",
    ]
    for step in spellings:
        assert errors(head + step) == [("E0403", 4)], step


def test_imports_of_a_refused_function_are_refused_at_the_imports_entry() -> None:
    assert errors("IMPORTS: {torch.utils.collect_env: [run]}\nINPUTS: [x]\nFLOW:\n  - ['eval: run(x)', y]\n") == [
        ("E0403", 1)
    ]


def test_tensor_methods_and_attributes_in_eval_are_checked_at_build_time() -> None:
    text = (
        "IMPORTS: [torch]\nINPUTS: [tokens]\nINPUT_SHAPES: {tokens: [5, 3]}\nFLOW:\n"
        "  - ['eval: tokens.view(tokens.shape[0], 5, -1).softmax(-1) + torch.arange(tokens.shape[2], device=tokens.device)', y]\n"
    )
    assert flow_of(text) == [
        "y <- =((tokens.view(tokens.shape[0], 5, -1).softmax(-1) + torch.arange(tokens.shape[2], device=tokens.device)))"
    ]


def test_an_explicit_device_stays_on_the_meta_device_while_the_build_runs_the_graph() -> None:
    """Without the override, the CPU tensor would not add to the meta input (and would take memory)."""
    text = (
        "IMPORTS: [torch]\nINPUTS: [x]\nINPUT_SHAPES: {x: [4]}\nFLOW:\n"
        "  - [x, h, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 4, device: cpu}}]]\n"
        "  - [\"eval: h + torch.ones(4, device='cpu')\", y]\n"
    )
    assert flow_of(text)[-1] == "y <- =((h + torch.ones(4, device='cpu')))"


def test_a_layer_built_at_build_time_gets_the_meta_device_whatever_device_the_template_gives() -> None:
    import torch

    import scmc.expr as X

    with torch.device("meta"):
        linear = X.call_checked(torch.nn.Linear, [4, 4, True, "cpu"], {})
        ones = X.call_checked(torch.ones, [3], {"device": "cpu"})
    assert linear.weight.device.type == "meta" and ones.device.type == "meta"
    assert X.call_checked(torch.ones, [3], {"device": "cpu"}).device.type == "cpu"  # not while building


def test_a_function_layer_that_would_build_a_huge_value_during_shape_inference_is_refused_at_its_step() -> None:
    text = (
        "INPUTS: [x]\nINPUT_SHAPES: {x: [4]}\nFLOW:\n"
        "  - [['constant: [0]', 'constant: 100000000'], big, rep, [_obj_, {_addr_: operator.mul}]]\n"
        "  - [x, y]\n"
    )
    root = lower(text)
    with pytest.raises(CompileError) as exc:
        materialize(root, Options().allow)
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.span.line, diag.message) == ("E0505", 4, "expression builds a value longer than 10000")


def test_eval_bounds_are_located_diagnostics() -> None:
    head = "IMPORTS: [torch, math]\nINPUTS: [x]\nFLOW:\n"
    assert errors(head + "  - ['eval: x + " + "-" * 300 + "1', y]\n") == [("E0508", 4)]
    assert errors(head + "  - [\"eval: x + torch.ones(400000000, device='cpu')\", y]\n") == [("E0505", 4)]
    drop = "  - [x, y, d, [_obj_, {_addr_: torch.nn.Dropout}, {_call_: {p: 'eval: %s'}}]]\n"
    assert errors(head + drop % "math.factorial(10 ** 6) * 0") == [("E0505", 4)]
    assert errors(head + drop % "len([[0] * 10000] * 3000) * 0") == [("E0505", 4)]


def test_a_constant_input_nested_too_deeply_is_refused_at_its_step() -> None:
    deep = "[" * 65 + "]" * 65
    with pytest.raises(CompileError) as exc:
        lower(f"INPUTS: [x]\nFLOW:\n  - [[x, 'constant: {deep}'], y, g, [_obj_, {{_addr_: operator.getitem}}]]\n")
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.span.line, diag.message) == (
        "E0736",
        3,
        "the value after `constant:` nests more than 64 levels deep",
    )
    assert flow_of("INPUTS: [x]\nFLOW:\n  - [[x, 'constant: [[1]]'], y, g, [_obj_, {_addr_: operator.getitem}]]\n")
