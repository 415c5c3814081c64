"""Residual sums are added in place only where that is provably the same computation (scmc.passes.inplace)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scmc.build import BuildRequest, Part, plan_package
from tests.test_models import construct_on_meta
from tests.test_resnet import model_source

CONV = "[_obj_, {_addr_: torch.nn.Conv2d}, {_call_: {in_channels: 3, out_channels: 3, kernel_size: 3, padding: 1}}]"
BN = "[_obj_, {_addr_: torch.nn.BatchNorm2d}, {_call_: {num_features: 3}}]"
RELU = "[_obj_, {_addr_: torch.nn.ReLU}, _call_]"


def forward_of(tmp_path: Path, flow: list[str], outputs: str = "[out]", shapes: bool = True) -> str:
    """The generated forward of a one-input layer graph with FLOW."""
    text = "INPUTS: [image]\nOUTPUTS: " + outputs + "\n"
    if shapes:
        text += "INPUT_SHAPES:\n  image: [3, 8, 8]\n"
    text += "FLOW:\n" + "".join(f"  - {step}\n" for step in flow)
    path = tmp_path / "model.yaml"
    path.write_text(text)
    plan = plan_package(BuildRequest(parts=[Part("model", path, "Model")]))
    source = next(t.decode() for p, t in plan.files.items() if p.endswith("/model.py"))
    return source.split("def forward", 1)[1]


def test_resnet_blocks_add_the_shortcut_in_place_as_torchvision_does() -> None:
    source = model_source("resnet50")
    assert "x += shortcut\n        out = self.relu(x)" in source
    assert "x += inp\n        out = self.relu(x)" in source
    assert "self.relu(x + " not in source


def test_resnet_training_gradients_and_statistics_equal_torchvisions() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).train()
    ours = construct_on_meta(model_source("resnet18"), device="cpu").train()
    ours.load_state_dict(dict(zip(ours.state_dict(), reference.state_dict().values())))
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([3, 7])
    for model, out in ((ours, ours(x)["cls"]), (reference, reference(x))):
        torch.nn.functional.cross_entropy(out, target).backward()
        model.outputs = out.detach()
    assert torch.allclose(ours.outputs, reference.outputs, atol=1e-5)
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters()):
        assert mine.grad is not None and theirs.grad is not None, name
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4), name
    for mine, theirs in zip(ours.buffers(), reference.buffers()):
        assert torch.allclose(mine.float(), theirs.float(), atol=1e-6)


def test_the_fresh_operand_is_updated_and_the_input_never(tmp_path: Path) -> None:
    forward = forward_of(
        tmp_path, [f"[image, _, conv, {CONV}]", f"[_, _, bn, {BN}]", f'["eval: image + _", out, act, {RELU}]']
    )
    assert "x += image\n        out = self.act(x)" in forward


def test_a_plain_assignment_step_becomes_the_sum_and_an_assignment(tmp_path: Path) -> None:
    forward = forward_of(tmp_path, [f"[image, _, conv, {CONV}]", '["eval: _ + image", out]'])
    assert "x += image\n        out = x\n" in forward


@pytest.mark.parametrize(
    "flow, why",
    [
        # ReLU's backward reads its output: it must not change
        ([f"[image, _, conv, {CONV}]", f"[_, _, act, {RELU}]", '["eval: _ + image", out]'], "output saved"),
        # the conv output is read again after the sum
        ([f"[image, y, conv, {CONV}]", '["eval: y + image", s]', '["eval: s * y", out]'], "read later"),
        # another step holds it before the sum
        (
            [
                f"[image, y, conv, {CONV}]",
                "[y, z, pool, [_obj_, {_addr_: torch.nn.Identity}, _call_]]",
                '["eval: y + image", s]',
                '["eval: s + z", out]',
            ],
            "aliased",
        ),
        # the other operand broadcasts: y += p would not be y + p's shape
        (
            [
                f"[image, y, conv, {CONV}]",
                "[image, p, pool, [_obj_, {_addr_: torch.nn.AdaptiveAvgPool2d}, {_call_: {output_size: 1}}]]",
                '["eval: p + y", out]',
            ],
            "broadcast",
        ),
        # y is an output of the layer
        ([f"[image, y, conv, {CONV}]", '["eval: y + image", out]'], "an output"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_sum_that_is_not_provably_safe_in_place_stays_as_written(tmp_path: Path, flow: list[str], why: str) -> None:
    outputs = "[out, y]" if why == "an output" else "[out]"
    forward = forward_of(tmp_path, flow, outputs=outputs)
    assert "+=" not in forward, why
    assert " + " in forward


def test_a_graph_without_input_shapes_is_left_as_written(tmp_path: Path) -> None:
    forward = forward_of(
        tmp_path, [f"[image, _, conv, {CONV}]", f"[_, _, bn, {BN}]", '["eval: _ + image", out]'], shapes=False
    )
    assert "out = x + image" in forward
