"""structcast-model's tuple forms of BACKWARDS and OPTIMIZERS items compile to what the mapping form compiles to.

Each case is a backward template written twice, once in scmc's canonical mapping spelling and
once in a tuple spelling; `scmc torch create backward` must write the same backward.py for both
(but for the template's name), and the optimizers the generated class builds hold the same
parameter groups. Malformed tuples are diagnostics at the item (also in tests/errors/).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import run_scmc

SGD = "[_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: 0.01, momentum: 0.9}}]"
ADAMW = "[_obj_, {_addr_: torch.optim.AdamW}, {_bind_: {lr: 0.001, weight_decay: 0.05}}]"
CLIP = "[_obj_, {_addr_: torch.nn.utils.clip_grad_norm_}, {_bind_: {max_norm: 1.0}}]"

CASES = {
    # [LOSS, OPTIMIZERS] holding [OPTIMIZER, LAYERS]
    "loss_optimizers": (
        f"""\
BACKWARDS:
  - LOSS: ce_loss
    OPTIMIZERS:
      - OPTIMIZER: {ADAMW}
        LAYERS: [model]
""",
        f"""\
BACKWARDS:
  - [ce_loss, [[{ADAMW}, [model]]]]
""",
    ),
    # [NAME, LOSS, OPTIMIZERS] holding [OPTIMIZER, LAYERS, CLIP] and [NAME, OPTIMIZER, LAYERS]
    "named_with_clip": (
        f"""\
BACKWARDS:
  - NAME: main
    LOSS: total
    OPTIMIZERS:
      - OPTIMIZER: {ADAMW}
        LAYERS: [model.head]
        CLIP: {CLIP}
      - NAME: body_sgd
        OPTIMIZER: {SGD}
        LAYERS: [model.body]
""",
        f"""\
BACKWARDS:
  - - main
    - total
    - - [{ADAMW}, [model.head], {CLIP}]
      - [body_sgd, {SGD}, [model.body]]
""",
    ),
    # [NAME, OPTIMIZER, LAYERS, CLIP], a null CLIP and NAME, the mapping form of patterns inside a
    # tuple, backward() arguments after OPTIMIZERS, two BACKWARDS items of different spellings
    "four_elements_and_kwargs": (
        f"""\
MIXED_PRECISION: {{init_scale: 1024.0}}
MIXED_PRECISION_TYPE: float16
ACCUMULATE_GRADIENTS: 2
BACKWARDS:
  - NAME: first
    LOSS: aux_loss
    retain_graph: true
    OPTIMIZERS:
      - NAME: head_opt
        OPTIMIZER: {ADAMW}
        LAYERS: [model.head]
        CLIP: {CLIP}
  - LOSS: total
    OPTIMIZERS:
      - OPTIMIZER: {SGD}
        LAYERS: [model.body]
        CLIP: null
""",
        """\
MIXED_PRECISION: {init_scale: 1024.0}
MIXED_PRECISION_TYPE: float16
ACCUMULATE_GRADIENTS: 2
BACKWARDS:
  - - first
    - aux_loss
    - - - head_opt
        - {_obj_: [[_addr_, torch.optim.AdamW], [_bind_, {lr: 0.001, weight_decay: 0.05}]]}
        - [model.head]
        - {_obj_: [[_addr_, torch.nn.utils.clip_grad_norm_], [_bind_, {max_norm: 1.0}]]}
    - {retain_graph: true}
  - [total, [[null, [_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: 0.01, momentum: 0.9}}], [model.body]]]]
""",
    ),
    # the tuples rendered by Jinja: one optimizer per submodule, made by a loop
    "rendered_by_jinja": (
        """\
PARAMETERS:
  DEFAULT: {parts: [body, head], base_lr: 0.01}
BACKWARDS:
  - LOSS: total
    OPTIMIZERS:
      - NAME: body
        OPTIMIZER: [_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: 0.01}}]
        LAYERS: [model.body]
      - NAME: head
        OPTIMIZER: [_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: 0.02}}]
        LAYERS: [model.head]
""",
        """\
PARAMETERS:
  DEFAULT: {parts: [body, head], base_lr: 0.01}
BACKWARDS:
  - _jinja_yaml_: |-
      - [total, [
        {% for part in parts %}
        [{{ part }}, [_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: {{ base_lr * loop.index }}}}], [model.{{ part }}]],
        {% endfor %}
        ]]
""",
    ),
    # the whole template rendered by one top-level block, BACKWARDS in the tuple form
    "whole_template_rendered": (
        f"""\
ACCUMULATE_GRADIENTS: 4
BACKWARDS:
  - LOSS: ce_loss
    OPTIMIZERS:
      - NAME: adamw
        OPTIMIZER: {ADAMW}
        LAYERS: [model]
""",
        """\
PARAMETERS:
  DEFAULT: {steps: 4, loss: ce_loss}
_jinja_yaml_: |-
  ACCUMULATE_GRADIENTS: {{ steps }}
  BACKWARDS:
    - [{{ loss }}, [[adamw, [_obj_, {_addr_: torch.optim.AdamW}, {_bind_: {lr: 0.001, weight_decay: 0.05}}], [model]]]]
""",
    ),
}


def created(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / f"{name}.yaml").write_text(text)
    result = run_scmc(tmp_path, "torch", "create", "backward", f"{name}.yaml", "-o", f"{name}.py", "-q")
    assert result.exit_code == 0, result.output
    return (tmp_path / f"{name}.py").read_text().replace(name, "TEMPLATE")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tuple_form_gives_the_same_backward_as_the_mapping_form(tmp_path: Path, case: str) -> None:
    canonical, tuple_form = CASES[case]
    expected = created(tmp_path, "canonical", canonical)
    assert created(tmp_path, "tuples", tuple_form) == expected


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 2)


def optimizer_groups(path: Path) -> dict[str, list[dict]]:
    """The parameter groups of every optimizer the generated Backward builds for one Net: the
    parameters by name, the other settings as they are."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = Net()
    names = {id(p): n for n, p in model.named_parameters()}
    backward = module.Backward(model, updates_per_epoch=10)
    out = {}
    for name, optimization in backward.optimizers.items():
        groups = (
            optimization.optimizer.param_groups if hasattr(optimization, "optimizer") else optimization.param_groups
        )
        out[name] = [
            {k: ([names[id(p)] for p in v] if k == "params" else v) for k, v in group.items()} for group in groups
        ]
    return out


def test_the_tuple_form_builds_optimizers_with_the_same_parameter_groups(tmp_path: Path) -> None:
    canonical, tuple_form = CASES["named_with_clip"]
    created(tmp_path, "canonical", canonical)
    created(tmp_path, "tuples", tuple_form)
    groups = optimizer_groups(tmp_path / "canonical.py")
    assert sorted(groups) == ["body_sgd", "optimizer"]
    assert [g["params"] for g in groups["optimizer"]] == [["head.weight", "head.bias"]]
    assert groups["body_sgd"][0]["momentum"] == 0.9
    assert optimizer_groups(tmp_path / "tuples.py") == groups


@pytest.mark.parametrize(
    "item, code, message",
    [
        (
            f"[ce_loss, [[{ADAMW}]]]",
            "E1021",
            "an OPTIMIZERS item written as a list must have 2, 3 or 4 elements, not 1",
        ),
        (
            f"[ce_loss, [[adamw, {ADAMW}, [model], null, 5]]]",
            "E1021",
            "an OPTIMIZERS item written as a list must have 2, 3 or 4 elements, not 5",
        ),
        (
            "[ce_loss]",
            "E1020",
            "a BACKWARDS item written as a list must be [LOSS, OPTIMIZERS] or [NAME, LOSS, OPTIMIZERS], "
            "not a list of 1 element",
        ),
        (
            f"[main, ce_loss, [[{ADAMW}, [model]]], true]",
            "E1020",
            "not a list of 4 elements without a mapping of backward() arguments last",
        ),
        (
            f"[a, b, c, [[{ADAMW}, [model]]], {{retain_graph: true}}]",
            "E1020",
            "not a list of 5 elements",
        ),
    ],
)
def test_a_tuple_of_the_wrong_length_is_an_error_at_its_line(
    tmp_path: Path, item: str, code: str, message: str
) -> None:
    (tmp_path / "bad.yaml").write_text(f"# a backward template\nBACKWARDS:\n  - {item}\n")
    result = run_scmc(tmp_path, "torch", "create", "backward", "bad.yaml", "-o", "bad.py")
    assert result.exit_code == 1
    first = result.output.splitlines()[0]
    assert first.startswith(f"bad.yaml:3:") and f"error[{code}]: " in first and message in first, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "bad.py").exists()


def test_a_tuple_item_with_a_wrong_value_is_located_at_that_element(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        f"BACKWARDS:\n  - - ce_loss\n    - - [{ADAMW}, [model]]\n      - [sgd, {SGD}, [model.1x]]\n"
    )
    result = run_scmc(tmp_path, "torch", "create", "backward", "bad.yaml", "-o", "bad.py")
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        "bad.yaml:4:88: error[E1003]: LAYERS entry `model.1x` must be a model name or model.submodule"
    ), result.output
