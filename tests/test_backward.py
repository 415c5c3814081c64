"""Compiled backward classes do the spec's step sequence, checked with real training steps."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import build_package, import_package

MODEL = """
OUTPUTS: [y]
FLOW:
  - [x, h, a, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 4, out_features: 8}}]]
  - [h, h, act, [_obj_, {_addr_: torch.nn.Tanh}, _call_]]
  - [h, y, b, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 8, out_features: 2}}]]
"""
LOSS = """
FLOW:
  - [[y, target], mse, [_obj_, {_addr_: torch.nn.functional.mse_loss}]]
"""
SGD = "[_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: 0.1}}]"


def backward_template(
    *, mixed: str | None = None, clip: float | None = None, accumulate: int | None = None, two_optimizers: bool = False
) -> str:
    lines = []
    if mixed:
        lines += ["MIXED_PRECISION: {init_scale: 1024.0}", f"MIXED_PRECISION_TYPE: {mixed}"]
    lines.append(f"ACCUMULATE_GRADIENTS: {accumulate if accumulate else 'null'}")
    clip_pattern = (
        "null"
        if clip is None
        else f"[_obj_, {{_addr_: torch.nn.utils.clip_grad_norm_}}, {{_bind_: {{max_norm: {clip}}}}}]"
    )
    lines.append("BACKWARDS:")
    lines.append("  - LOSS: mse")
    lines.append("    OPTIMIZERS:")
    if two_optimizers:
        lines.append(f"      - {{NAME: first, OPTIMIZER: {SGD}, LAYERS: [model.a], CLIP: {clip_pattern}}}")
        lines.append(
            f"      - {{NAME: second, OPTIMIZER: [_obj_, {{_addr_: torch.optim.AdamW}}, {{_bind_: {{lr: 0.01}}}}], "
            f"LAYERS: [model.b], CLIP: {clip_pattern}}}"
        )
    else:
        lines.append(f"      - {{OPTIMIZER: {SGD}, LAYERS: model, CLIP: {clip_pattern}}}")
    return "\n".join(lines) + "\n"


def build_tiny(tmp_path: Path, name: str, backward: str):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.yaml").write_text(MODEL)
    (folder / "loss.yaml").write_text(LOSS)
    (folder / "backward.yaml").write_text(backward)
    out = build_package(
        folder / "pkg",
        str(folder / "model.yaml"),
        "--loss",
        str(folder / "loss.yaml"),
        "--backward",
        str(folder / "backward.yaml"),
        name=name,
    )
    return import_package(out, name)


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def train_steps(pkg, model, backward, data, epoch_end_at: int | None = None) -> list[bool]:
    loss = pkg.Loss()
    updated = []
    for i, (x, target) in enumerate(data):
        with backward.autocast("cpu"):
            value = loss(model(x), target)
        updated.append(backward(value.float(), last_in_epoch=epoch_end_at is not None and i + 1 == epoch_end_at))
    return updated


COMBOS = list(itertools.product([None, "bfloat16", "float16"], [None, 0.5], [None, 3]))


@pytest.mark.parametrize("mixed,clip,accumulate", COMBOS)
def test_every_backward_combination_updates_the_weights_on_update_steps_only(tmp_path, mixed, clip, accumulate) -> None:
    name = f"bw_{mixed or 'fp32'}_{'clip' if clip else 'noclip'}_{accumulate or 1}"
    pkg = build_tiny(tmp_path, name, backward_template(mixed=mixed, clip=clip, accumulate=accumulate))
    torch.manual_seed(0)
    model = pkg.Model()
    backward = pkg.Backward(model, updates_per_epoch=2)
    before = [p.detach().clone() for p in model.parameters()]
    n = accumulate or 1
    updated = train_steps(pkg, model, backward, batches(n), epoch_end_at=None)
    assert updated == [False] * (n - 1) + [True]
    assert backward.updates == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()), "zero_grad(set_to_none=True) after the update"
    assert bool(backward.grad_scalers) == (mixed == "float16"), "a GradScaler exists for float16 only"


def test_two_optimizers_each_update_their_own_layers(tmp_path) -> None:
    pkg = build_tiny(tmp_path, "bw_two", backward_template(two_optimizers=True))
    model = pkg.Model()
    backward = pkg.Backward(model, updates_per_epoch=1)
    assert set(backward.optimizers) == {"first", "second"}
    first = {id(p) for g in backward.optimizers["first"].param_groups for p in g["params"]}
    second = {id(p) for g in backward.optimizers["second"].param_groups for p in g["params"]}
    assert first == {id(p) for p in model.a.parameters()} and second == {id(p) for p in model.b.parameters()}
    names = [n for g in backward.param_groups["first"] for n in g.get("param_names", [])]
    a_before, b_before = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    train_steps(pkg, model, backward, batches(1))
    assert not torch.equal(a_before, model.a.weight) and not torch.equal(b_before, model.b.weight)
    assert isinstance(backward.optimizers["second"].optimizer, torch.optim.AdamW)
    del names


def test_accumulation_updates_at_multiples_of_n_and_flushes_a_partial_window_as_an_average(tmp_path) -> None:
    pkg = build_tiny(tmp_path, "bw_acc", backward_template(accumulate=3))
    torch.manual_seed(0)
    model = pkg.Model()
    reference = pkg.Model()
    reference.load_state_dict(model.state_dict())
    backward = pkg.Backward(model, updates_per_epoch=3)
    data = batches(8)
    updated = train_steps(pkg, model, backward, data, epoch_end_at=8)
    assert updated == [False, False, True, False, False, True, False, True]
    assert backward.updates == 3 and backward.pending == 0
    # the same three updates by hand: mean gradient of each window, SGD lr 0.1
    loss = pkg.Loss()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for window in (data[0:3], data[3:6], data[6:8]):
        opt.zero_grad()
        total = sum(loss(reference(x), t) for x, t in window) / len(window)
        total.backward()
        opt.step()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_clipping_limits_the_gradient_norm_to_the_configured_value(tmp_path) -> None:
    pkg = build_tiny(tmp_path, "bw_clip", backward_template(clip=0.01))
    torch.manual_seed(0)
    model = pkg.Model()
    backward = pkg.Backward(model, updates_per_epoch=1)
    before = [p.detach().clone() for p in model.parameters()]
    x, target = batches(1)[0]
    x = x * 100  # a large gradient, far above the clip value
    with backward.autocast("cpu"):
        value = pkg.Loss()(model(x), target)
    backward(value)
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, model.parameters())))
    assert step.item() == pytest.approx(0.1 * 0.01, rel=1e-3), "SGD lr 0.1 x clipped norm 0.01"


def test_float16_scaler_uses_the_configured_arguments_and_is_checkpointed(tmp_path) -> None:
    pkg = build_tiny(tmp_path, "bw_fp16", backward_template(mixed="float16"))
    model = pkg.Model()
    backward = pkg.Backward(model, updates_per_epoch=1)
    assert pkg.Backward.autocast_dtype is torch.float16
    assert backward.scaler.get_scale() == 1024.0
    train_steps(pkg, model, backward, batches(2))
    state = backward.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    restored = pkg.Backward(pkg.Model(), updates_per_epoch=1)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.updates == 2 and restored.scaler.get_scale() == backward.scaler.get_scale()


def test_bfloat16_autocast_runs_the_forward_in_bfloat16_without_a_scaler(tmp_path) -> None:
    pkg = build_tiny(tmp_path, "bw_bf16", backward_template(mixed="bfloat16"))
    model = pkg.Model()
    backward = pkg.Backward(model, updates_per_epoch=1)
    with backward.autocast("cpu"):
        assert model(torch.randn(2, 4)).dtype is torch.bfloat16
    assert backward.grad_scalers == {} and not backward.scaler.is_enabled(), "the GradScaler passes through"


@pytest.fixture(scope="module")
def convnext_backward(tmp_path_factory):
    out = build_package(
        tmp_path_factory.mktemp("cnx") / "pkg",
        "cfg/models/ConvNeXtV2.yaml",
        "-p",
        "backbone=atto",
        "-p",
        "layer_decay_type=group",
        "-p",
        "num_classes=10",
        "-p",
        "warmup_epochs=1",
        "-p",
        "epochs=4",
        name="convnext_layer_decay",
    )
    return import_package(out, "convnext_layer_decay")


def test_layer_decay_groups_have_the_expected_lr_scales(convnext_backward) -> None:
    pkg = convnext_backward
    model = pkg.Model()
    backward = pkg.Backward(model, updates_per_epoch=5, epochs=4)
    groups = backward.param_groups["optimizer"]
    # atto depths [2, 2, 6, 2] in groups of 2: stem + 6 block groups = 7 layer groups, then the head
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert scales == [round(0.9**k, 6) for k in range(7, -1, -1)]
    stem = next(g for g in groups if any(n.startswith("backbone.stem.") for n in g["param_names"]))
    head = next(g for g in groups if "head.weight" in g["param_names"])
    assert stem["lr_scale"] == pytest.approx(0.9**7) and head["lr_scale"] == 1.0
    for g in groups:
        no_decay = all(
            n.endswith(".bias") or n.endswith("norm.weight") or ".grn." in n or "weight" not in n
            for n in g["param_names"]
        )
        if g["weight_decay"] == 0.0:
            assert all(not n.endswith("conv.weight") and not n.endswith("fc1.weight") for n in g["param_names"])
        del no_decay


def test_cosine_schedule_warms_up_per_update_then_decays(convnext_backward) -> None:
    pkg = convnext_backward
    model = pkg.Model()
    backward = pkg.Backward(model, updates_per_epoch=5, epochs=4)
    head_lr = lambda: next(
        g["lr"]
        for g in backward.optimizers["optimizer"].param_groups  # noqa: E731
        if "head.weight" in g["param_names"]
    )
    lrs = [head_lr()]
    x, label = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    loss = pkg.Loss()
    for epoch in range(4):
        for step in range(5):
            value = loss(label, model(x)["cls"])
            backward(value, last_in_epoch=step == 4)
            lrs.append(head_lr())
        backward.end_epoch(epoch, {"ce_loss": value.item()})
    warmup, decay = lrs[:6], lrs[6:]
    assert lrs[0] == pytest.approx(1e-5) and warmup == sorted(warmup)
    # warmup_prefix false: the cosine is already at t=5 of 20 when warmup ends (timm's convention)
    assert max(lrs) == pytest.approx(2e-3 * (1 + math.cos(math.pi * 5 / 20)) / 2, rel=0.02)
    assert decay == sorted(decay, reverse=True) and decay[-1] < 2e-4
    assert not math.isnan(sum(lrs))


def test_a_catastrophic_no_weight_decay_regex_is_refused_at_build_time(tmp_path: Path, monkeypatch) -> None:
    """`^(\\w+)*bias$` would hang training in re's backtracking; the build refuses it at its line."""
    from click.testing import CliRunner

    from scmc.cli import main

    (tmp_path / "bw.yaml").write_text(
        "BACKWARDS:\n  - LOSS: loss\n    OPTIMIZERS:\n      - LAYERS: model\n        OPTIMIZER:\n"
        "          - _obj_\n          - _addr_: structcast_model.torch.optimizers.create_with_scheduler\n"
        "          - _bind_:\n              optimizer_kwargs:\n                opt: adamw\n"
        "                no_weight_decay_regexes: ['^(?:\\w+\\.)*norm$', '^(\\w+)*bias$']\n"
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["torch", "create", "backward", "bw.yaml", "-o", "bw.py"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[0] == (
        "bw.yaml:11:63: error[E1009]: `no_weight_decay_regexes` pattern '^(\\\\w+)*bias$' is refused: "
        "it repeats a repetition (like `(a+)+`), which can take exponential time"
    )
    assert "set SCMC_MAX_REGEX_LENGTH to raise it" in result.output
    assert not (tmp_path / "bw.py").exists()
