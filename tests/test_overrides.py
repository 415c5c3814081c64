"""Run-time control of what backward.py was compiled with: --lr, --weight-decay, --warmup-epochs,
--clip-grad, --grad-accum-steps, --precision (and --val-every, --matmul-precision), without a rebuild."""

from __future__ import annotations

import json

import pytest
import torch

from scmc_runtime.overrides import step_metrics
from scmc_runtime.train import FRESH_HINT, config_parser
from tests.conftest import ROOT, import_package
from tests.train_support import run_many
from tests.tune_support import PACKAGE, import_model, mlflow_run, records, train_args, tuned_run

FEMTO = ROOT / "tests" / "golden" / "convnextv2_femto"  # AdamW lr 0.002, wd 0.05, cosine, warmup 1 epoch


@pytest.fixture(scope="module")
def femto():
    return import_package(FEMTO, "convnextv2_femto")


def make(femto, **overrides):
    torch.manual_seed(0)
    model = femto.Model()
    return model, femto.Backward(model, updates_per_epoch=10, epochs=4, overrides=overrides)


def step_once(model, backward) -> float:
    """One training step with a large loss; returns the gradient norm the optimizer stepped with."""
    inner = backward.optimizer.optimizer
    seen = []
    original = inner.step

    def step(*args, **kwargs):
        grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.nn.utils.get_total_norm(grads).item())
        return original(*args, **kwargs)

    inner.step = step
    torch.manual_seed(1)
    with backward.autocast("cpu"):
        out = model(torch.randn(2, 3, 32, 32))
    loss = (out[next(iter(out))] if isinstance(out, dict) else out).square().sum() * 1e3
    backward(loss, last_in_epoch=True)
    return seen[0]


def test_lr_weight_decay_and_warmup_reach_the_optimizer_groups_and_the_schedule(femto) -> None:
    _, compiled = make(femto)
    _, changed = make(femto, lr=0.01, weight_decay=0.1, warmup_epochs=2.0)
    assert femto.Backward.compiled["lr"] == 0.002 and femto.Backward.compiled["warmup_epochs"] == 1.0
    assert [g["initial_lr"] for g in compiled.optimizer.param_groups] == [0.002, 0.002]
    assert [g["initial_lr"] for g in changed.optimizer.param_groups] == [0.01, 0.01]
    assert sorted(g["weight_decay"] for g in compiled.optimizer.param_groups) == [0.0, 0.05]  # biases: none
    assert sorted(g["weight_decay"] for g in changed.optimizer.param_groups) == [0.0, 0.1]
    assert compiled.optimizer.scheduler.warmup_t == 10 and changed.optimizer.scheduler.warmup_t == 20  # updates
    changed.optimizer.step_update(10)  # half-way through the warmup from warmup_lr 1e-5 to the new lr
    assert changed.optimizer.lrs() == pytest.approx([1e-5 + 10 * (0.01 - 1e-5) / 20] * 2)


def test_clip_grad_clips_the_gradient_norm_and_the_norm_before_clipping_is_logged(femto) -> None:
    model, plain = make(femto)
    unclipped = step_once(model, plain)
    assert unclipped > 1.0 and step_metrics(plain)["grad_norm"] == pytest.approx(unclipped, rel=1e-5)
    model, clipped = make(femto, clip_grad=0.5)
    assert step_once(model, clipped) == pytest.approx(0.5, rel=1e-4)
    assert step_metrics(clipped)["grad_norm"] == pytest.approx(unclipped, rel=1e-5)  # before clipping


def test_grad_accum_steps_sets_the_accumulation_window(femto) -> None:
    model, backward = make(femto, grad_accum_steps=3)
    assert backward.accumulate == 3 and femto.Backward.accumulate == 1  # the class keeps the compiled value
    steps = []
    for _ in range(4):
        loss = model(torch.randn(1, 3, 32, 32))
        loss = (loss[next(iter(loss))] if isinstance(loss, dict) else loss).sum()
        steps.append(backward(loss))
    assert steps == [False, False, True, False] and backward.updates == 1 and backward.pending == 1


def test_precision_sets_autocast_and_the_grad_scaler(femto) -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    _, compiled = make(femto)
    with compiled.autocast("cpu"):
        assert torch.mm(a, b).dtype is torch.float32
    assert compiled.grad_scalers == {} and "amp_scale" not in step_metrics(compiled)
    _, bf16 = make(femto, precision="bfloat16")
    with bf16.autocast("cpu"):
        assert torch.mm(a, b).dtype is torch.bfloat16
    assert bf16.grad_scalers == {}
    _, fp16 = make(femto, precision="float16")
    with fp16.autocast("cpu"):
        assert torch.mm(a, b).dtype is torch.float16
    assert list(fp16.grad_scalers) == ["scaler"] and step_metrics(fp16)["amp_scale"] == 65536.0
    assert fp16.state_dict()["scaler"]["scale"] == 65536.0  # checkpointed with the optimizer


def test_bad_override_values_are_refused_by_the_backward(femto) -> None:
    with pytest.raises(ValueError, match=r"^--precision float64: must be one of float32, bfloat16, float16$"):
        make(femto, precision="float64")
    with pytest.raises(ValueError, match=r"^--grad-accum-steps 0: must be at least 1 \(1: update every step\)$"):
        make(femto, grad_accum_steps=0)
    with pytest.raises(TypeError, match="unknown backward override"):
        make(femto, momentum=0.5)


def test_help_shows_the_compiled_values(tmp_path_factory) -> None:
    run = tuned_run(tmp_path_factory)
    pkg = import_model(run.package)
    import importlib

    train = importlib.import_module(f"{PACKAGE}.train")
    text = " ".join(config_parser(train.TrainConfig).format_help().split())
    assert pkg.Backward.compiled["lr"] == 0.002
    assert "--lr LR base learning rate of every optimizer (default: 0.002, as compiled into backward.py)" in text
    assert "--clip-grad CLIP_GRAD clip gradients to this norm (none: no clipping) (default: none, as compiled" in text
    assert (
        "--precision PRECISION float32, bfloat16 or float16 autocast (float16 adds a GradScaler) (default: float32"
        in text
    )


def test_the_run_records_the_overrides_and_logs_the_gradient_norm(tmp_path_factory) -> None:
    run = tuned_run(tmp_path_factory)
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["lr"] == 0.0 and config["warmup_epochs"] == 0.0 and config["clip_grad"] == 1.0
    assert config["grad_accum_steps"] == 1 and config["precision"] == "float32"
    assert config["matmul_precision"] == "high" and config["val_every"] == 2
    client, found = mlflow_run(run)
    params = found.data.params
    assert params["lr"] == "0.0" and params["clip_grad"] == "1.0" and params["matmul_precision"] == "high"
    assert "grad_norm" in found.data.metrics
    logged = records(run)
    steps = [r for r in logged if r["event"] == "step"]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 for r in steps)
    first, second = [r for r in logged if r["event"] == "epoch"]
    # --val-every 2: no validation after epoch 1, then after epoch 2 (also the last one)
    assert not any(k.startswith("val_") for k in first) and "val_ce_loss" in second


def test_a_resume_with_a_changed_override_is_refused_with_the_exact_message(tmp_path_factory) -> None:
    run = tuned_run(tmp_path_factory)
    same = ["--run-name", "tuned", "--resume", "auto", "--warmup-epochs", "0", "--clip-grad", "1.0", "--no-ema"]
    cases = [
        train_args(run.out, run.cache, *same, "--lr", "0.01"),
        train_args(run.out, run.cache, *same, "--lr", "0", "--precision", "bfloat16", "--grad-accum-steps", "2"),
        train_args(run.out, run.cache, "--precision", "fp16"),
        train_args(run.out, run.cache, "--val-every", "0", "--matmul-precision", "low", "--clip-grad", "-1"),
    ]
    before = (run.run_dir / "last.pt").read_bytes()
    lr, two, precision, several = run_many(run.package, cases, cwd=run.out.parent)
    prog = f"python -m {PACKAGE}.train"
    last = run.run_dir / "last.pt"
    assert lr == {
        "code": 1,
        "stderr": f"{prog}: error: {last} was trained with --lr 0.0, not --lr 0.01: a resumed run continues exactly, "
        f"and this would change the learning-rate schedule; resume with --lr 0.0, or {FRESH_HINT}\n",
    }
    assert two == {
        "code": 1,
        "stderr": f"{prog}: error: {last} was trained with --grad-accum-steps 1 --precision float32, not "
        "--grad-accum-steps 2 --precision bfloat16: a resumed run continues exactly, and this would change the "
        "update count and the position of every update, the forward's numerics and the GradScaler's state; "
        f"resume with --grad-accum-steps 1 --precision float32, or {FRESH_HINT}\n",
    }
    assert precision == {
        "code": 2,
        "stderr": f"{prog}: error: --precision fp16: must be one of float32, bfloat16, float16\n",
    }
    assert several["code"] == 2 and several["stderr"] == (
        f"{prog}: error: 3 problems with the flags:\n"
        "  --clip-grad -1.0: must be a positive max gradient norm (or none: no clipping)\n"
        "  --val-every 0: must be at least 1 (1: every epoch)\n"
        "  --matmul-precision low: must be one of highest, high, medium\n"
    )
    assert (run.run_dir / "last.pt").read_bytes() == before  # nothing was written
