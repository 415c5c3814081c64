"""--strategy fsdp: FSDP2 training, sharded (DCP) checkpoints across world sizes, export from them.

Every run trains ConvNeXtV2-atto (10 classes, 12 Blocks) with gradient accumulation over 2 steps
and gradient clipping (total norm 0.5, computed over the shards under FSDP) on the embedded digits at 32x32, on CPU with gloo under ``torchrun --standalone``, exactly as a
user runs it (see tests/test_train.py, whose helpers these tests use). One thread per process,
deterministic kernels, no data-loading workers.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import build_package, snapshot
from tests.test_train import COMMON, DDP_RELATIVE_TOLERANCE, records, train, train_command
from tests.train_support import complete_package, kill_tree, python_env, run_many

pytest.importorskip("PIL")
pytest.importorskip("sklearn")

PACKAGE = "atto_fsdp"
# Three epochs of 4 steps (2 optimizer updates each): room to stop the run after an epoch's end.
ARGS = ["--epochs", "3", "--max-steps", "4"]
KILL_DEADLINE_S = 240


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / PACKAGE
    build_package(
        out,
        "cfg/models/ConvNeXtV2.yaml",
        "-p",
        "backbone=atto",
        "-p",
        "num_classes=10",
        "-p",
        "accumulate_gradients=2",
        "-p",
        "clip_grad_norm=0.5",
        name=PACKAGE,
    )
    complete_package(out, PACKAGE, accumulate=2)
    backward = (out / "src" / PACKAGE / "backward.py").read_text()
    assert "accumulate = 2" in backward and "clip_grad" in backward  # FSDP: clipping of sharded gradients
    return out


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scmc_runtime.data import prepare_digits

    cache = tmp_path_factory.mktemp("data")
    prepare_digits(cache / "digits")
    return cache


@pytest.fixture(scope="module")
def runs(package: Path, digits_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same 3 epochs trained by DDP and by FSDP on 2 ranks, and an FSDP run killed after an epoch."""
    out = tmp_path_factory.mktemp("runs") / "runs"
    ddp = train(package, out, digits_cache, *ARGS, "--run-name", "ddp", ranks=2)
    fsdp = train(package, out, digits_cache, *ARGS, "--strategy", "fsdp", "--run-name", "fsdp", ranks=2)
    killed = kill_after_an_epoch(package, out, digits_cache)
    return {"out": out, "ddp_output": ddp.stdout + ddp.stderr, "fsdp_output": fsdp.stdout + fsdp.stderr, **killed}


def kill_after_an_epoch(package: Path, out: Path, cache: Path) -> dict:
    """Start a 2-rank FSDP run, SIGKILL every process of it once last.pt holds the end of epoch 1 or 2."""
    command = train_command(
        package, *COMMON, "--out", str(out), "--cache-dir", str(cache), *ARGS, "--strategy", "fsdp", ranks=2
    )
    command += ["--run-name", "killed"]
    process = subprocess.Popen(
        command,
        env=python_env(package),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=out.parent,
        start_new_session=True,  # torchrun and its ranks in one process group, killed together
    )
    last = out / "killed" / "last.pt"
    deadline = time.monotonic() + KILL_DEADLINE_S
    state = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if last.exists():
                try:
                    state = torch.load(last, map_location="cpu", weights_only=True)
                except Exception:  # replaced while read: read it again
                    state = None
                if state is not None and state["step_in_epoch"] == 0 and state["epoch"] in (1, 2):
                    break
            time.sleep(0.02)
        else:
            pytest.fail(f"no end-of-epoch checkpoint before the run ended (exit {process.poll()})")
    finally:
        output = kill_tree(process)
    assert process.returncode == -signal.SIGKILL, output
    return {"killed": out / "killed", "killed_at": state["epoch"]}


def consolidated(path: Path) -> dict:
    from scmc_runtime.fsdp import load_consolidated

    return load_consolidated(path)


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_step_ce_loss"] for r in records(run_dir, "step")}


def assert_close_weights(left: dict, right: dict, rtol: float, atol: float) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.allclose(left[key].float(), right[key].float(), rtol=rtol, atol=atol), key


# ---------------------------------------------------------------------------------------------
# In process: units, EMA, checkpoints on one process


def test_the_default_fsdp_unit_is_the_most_repeated_generated_block(package: Path):
    from scmc_runtime.fsdp import default_unit, unit_candidates
    from tests.conftest import import_package

    model = import_package(package, PACKAGE).Model()
    # DropPath repeats as often as Block but holds no parameters; LayerNorm2d is in the stem and downsamples.
    assert unit_candidates(model) == {"LayerNorm2d": 4, "Stem": 1, "Block": 12, "DownSample": 3, "Backbone": 1}
    assert default_unit(model) == "Block"


def test_activation_checkpointing_per_unit_recomputes_blocks_and_leaves_gradients_and_names_unchanged(package: Path):
    from scmc_runtime.distributed import DistInfo
    from scmc_runtime.fsdp import shard_model
    from tests.conftest import import_package

    module = import_package(package, PACKAGE)
    one = DistInfo(0, 0, 1, torch.device("cpu"), None, True)
    torch.manual_seed(0)
    plain = module.Model()
    checkpointed = module.Model()
    checkpointed.load_state_dict(plain.state_dict())
    sharding = shard_model(module.Model(), one, unit="LayerNorm2d")
    assert (sharding.unit, sharding.units, sharding.sharded) == ("LayerNorm2d", 4, False)
    assert "not sharded" in sharding.describe()
    sharding = shard_model(checkpointed, one, activation_checkpointing=True)
    assert (sharding.unit, sharding.units) == ("Block", 12)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())

    calls = []
    block = checkpointed.backbone.blocks0[0]
    block.conv_dw.register_forward_hook(lambda *_: calls.append(1))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for model in (plain, checkpointed):
        model(images)["cls"].square().mean().backward()
    assert len(calls) == 2  # the block ran again in backward: its activations were not kept
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Backward:
    """The interface of a compiled backward that save_sharded/load_sharded use."""

    def __init__(self, model: nn.Module) -> None:
        from scmc_runtime.optim import Optimization

        self.optimizer = Optimization(torch.optim.AdamW(model.parameters(), lr=0.1))
        self.updates = 0

    @property
    def optimizers(self) -> dict:
        return {"optimizer": self.optimizer}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]


def _step(model: nn.Module, backward: _Backward, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(6, 4, generator=generator)).square().mean()
    loss.backward()
    backward.optimizer.step()
    backward.optimizer.zero_grad()
    backward.updates += 1


def _state(model: nn.Module, ema, step: int) -> dict:
    from scmc_runtime.checkpoint import FORMAT_VERSION, model_signature

    return {
        "format": FORMAT_VERSION,
        "package": "tiny",
        "signature": model_signature(model.state_dict()),
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "backward": None,
        "epoch": 1,
        "step_in_epoch": 0,
        "global_step": step,
        "best": {},
        "rng": [],
    }


def test_a_sharded_checkpoint_on_one_process_round_trips_and_a_crash_mid_save_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import torch.distributed.checkpoint as dcp

    from scmc_runtime.checkpoint import check_checkpoint, load_checkpoint
    from scmc_runtime.fsdp import ShardedEma, load_consolidated, load_sharded, save_sharded

    torch.manual_seed(0)
    model, path = _Tiny(), tmp_path / "last.pt"
    backward, ema = _Backward(model), ShardedEma(_Tiny(), 0.5)
    _step(model, backward, 1)
    ema.update(model, step=1)  # the first update copies the weights
    for name, value in model.state_dict().items():
        assert torch.equal(ema.state_dict()[name], value), name
    state = _state(model, ema, 1)
    state["backward"] = backward.state_dict()
    save_sharded(path, state, model, backward)
    first = load_checkpoint(path)
    assert first["sharded"].startswith("last-shards-00000001-") and "model" not in first
    check_checkpoint(first, path, package="tiny", model=model.state_dict(), require=("model", "backward", "rng"))
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    # A second save that dies inside torch.distributed.checkpoint leaves the first one in place.
    _step(model, backward, 2)
    real_save = dcp.save

    def dying_save(tensors, checkpoint_id, **options):
        real_save({"model": tensors["model"]}, checkpoint_id=checkpoint_id, **options)  # part of it written
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", dying_save)
    state = _state(model, ema, 2)
    state["backward"] = backward.state_dict()
    with pytest.raises(OSError, match="disk full"):
        save_sharded(path, state, model, backward)
    monkeypatch.setattr(dcp, "save", real_save)
    assert load_checkpoint(path)["sharded"] == first["sharded"]
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {"last.pt", first["sharded"]}
    for name, value in load_consolidated(path)["model"].items():
        assert torch.equal(value, saved_weights[name]), name

    # Resume into fresh objects: weights, optimizer state, counters and EMA come back exactly.
    torch.manual_seed(1)
    again, again_ema = _Tiny(), ShardedEma(_Tiny(), 0.5)
    again_backward = _Backward(again)
    load_sharded(path, load_checkpoint(path), again, again_backward, again_ema)
    for name, value in again.state_dict().items():
        assert torch.equal(value, saved_weights[name]), name
        assert torch.equal(again_ema.state_dict()[name], saved_weights[name]), name
    assert again_backward.updates == 1
    exp_avg = {k: v["exp_avg"] for k, v in again_backward.optimizer.optimizer.state.items()}
    assert len(exp_avg) == 6 and all(v.abs().sum() > 0 for v in exp_avg.values())

    # The next complete save replaces the folder and removes what the crash left behind.
    _step(again, again_backward, 3)
    state = _state(again, again_ema, 3)
    state["backward"] = again_backward.state_dict()
    save_sharded(path, state, again, again_backward)
    third = load_checkpoint(path)
    assert {p.name for p in tmp_path.iterdir()} == {"last.pt", third["sharded"]}


def test_the_ema_weights_are_applied_for_evaluation_and_the_model_gets_its_own_back():
    from scmc_runtime.fsdp import ShardedEma

    torch.manual_seed(0)
    model = _Tiny()
    ema = ShardedEma(model, 0.9)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for value in ema.state_dict().values():
            if value.is_floating_point():
                value.add_(1.0)
    with ema.applied(model) as averaged:
        assert averaged is model
        for name, value in model.state_dict().items():
            assert torch.equal(value, ema.state_dict()[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, own[name]), name


def test_a_sharded_checkpoint_without_its_shards_folder_is_one_clear_error(tmp_path: Path):
    from scmc_runtime.checkpoint import CheckpointError, save_checkpoint
    from scmc_runtime.fsdp import load_consolidated

    save_checkpoint(tmp_path / "best.pt", {"format": 1, "sharded": "best-shards-00000000-abcd", "signature": "x"})
    with pytest.raises(CheckpointError, match=r"its shards folder best-shards-00000000-abcd/ is missing.*copy both"):
        load_consolidated(tmp_path / "best.pt")
    save_checkpoint(tmp_path / "bad.pt", {"format": 1, "sharded": "../elsewhere"})
    with pytest.raises(CheckpointError, match="invalid shards folder"):
        load_consolidated(tmp_path / "bad.pt")


def test_fsdp_flags_are_checked_before_anything_is_created(package: Path, digits_cache: Path, tmp_path: Path):
    out = tmp_path / "runs"
    base = ["--out", str(out), "--cache-dir", str(digits_cache), "--image-size", "32", "--no-mlflow", "--epochs", "1"]
    results = run_many(
        package,
        [
            [*base, "--strategy", "zero3"],
            [*base, "--fsdp-unit", "Block"],
            [*base, "--activation-checkpointing"],
            [*base, "--strategy", "fsdp", "--fsdp-unit", "Blocks", "--workers", "0"],
        ],
        cwd=tmp_path,
    )
    assert [r["code"] for r in results] == [2, 2, 2, 2], results
    assert "--strategy zero3: must be one of ddp, fsdp" in results[0]["stderr"]
    assert "--fsdp-unit Block: only with --strategy fsdp" in results[1]["stderr"]
    assert "--activation-checkpointing: only with --strategy fsdp" in results[2]["stderr"]
    assert "--fsdp-unit Blocks: the model has no layer of that class" in results[3]["stderr"]
    assert "Block (12x)" in results[3]["stderr"]
    assert all("Traceback" not in r["stderr"] for r in results)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Under torchrun: 2 ranks


@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_like_ddp_with_the_same_global_batch(runs: dict):
    out = runs["out"]
    assert "FSDP over 2 ranks: 12 units of Block, then the root" in runs["fsdp_output"]
    ddp, fsdp = step_losses(out / "ddp"), step_losses(out / "fsdp")
    assert len(ddp) == len(fsdp) == 12
    assert list(fsdp.values()) == pytest.approx(list(ddp.values()), rel=DDP_RELATIVE_TOLERANCE)
    # Validation of the raw and of the EMA weights agrees, epoch by epoch.
    for a, b in zip(records(out / "ddp", "epoch"), records(out / "fsdp", "epoch")):
        for key in ("train_ce_loss", "val_ce_loss", "val_acc1", "ema_val_ce_loss", "ema_val_acc1"):
            assert b[key] == pytest.approx(a[key], rel=DDP_RELATIVE_TOLERANCE, abs=1e-6), key
    # The sharded checkpoint holds the weights DDP trained (accumulation: 2 updates per epoch).
    plain, sharded = torch.load(out / "ddp" / "last.pt", weights_only=True), consolidated(out / "fsdp" / "last.pt")
    assert sharded["backward"]["updates"] == plain["backward"]["updates"] == 6
    assert_close_weights(sharded["model"], plain["model"], rtol=1e-4, atol=1e-6)
    assert_close_weights(sharded["ema"], plain["ema"], rtol=1e-4, atol=1e-6)
    files = sorted(p.name for p in (out / "fsdp").iterdir())
    assert [f for f in files if "shards" in f] == [
        torch.load(out / "fsdp" / name, weights_only=True)["sharded"] for name in ("best.pt", "last.pt")
    ]


@pytest.mark.slow
def test_a_sharded_checkpoint_of_two_ranks_resumes_on_two_and_on_one(
    package: Path, digits_cache: Path, runs: dict, tmp_path: Path
):
    out, epoch = runs["out"], runs["killed_at"]
    straight = step_losses(out / "fsdp")
    on_two, on_one = out / "on-two", out / "on-one"
    shutil.copytree(runs["killed"], on_two)
    shutil.copytree(runs["killed"], on_one)

    train(package, out, digits_cache, *ARGS, "--strategy", "fsdp", "--run-name", "on-two", "--resume", "auto", ranks=2)
    resumed = records(on_two, "start")[-1]
    assert resumed["resumed_from"] == str(on_two / "last.pt") and resumed["start_epoch"] == epoch
    # Same world size: the run continues exactly where the uninterrupted one was.
    assert step_losses(on_two) == straight
    final, reference = consolidated(on_two / "last.pt"), consolidated(out / "fsdp" / "last.pt")
    for part in ("model", "ema"):
        for key in reference[part]:
            assert torch.equal(final[part][key], reference[part][key]), f"{part}.{key}"

    result = train(package, out, digits_cache, *ARGS, "--strategy", "fsdp", "--run-name", "on-one", "--resume", "auto")
    assert "--strategy fsdp with one process" in result.stdout + result.stderr
    assert records(on_one, "start")[-1]["world_size"] == 1
    # One process, the global batch of two: the same curve up to float rounding.
    after = {step: loss for step, loss in step_losses(on_one).items() if step > 4 * epoch}
    assert list(after) == [s for s in straight if s > 4 * epoch]
    assert list(after.values()) == pytest.approx([straight[s] for s in after], rel=DDP_RELATIVE_TOLERANCE)
    assert_close_weights(consolidated(on_one / "last.pt")["model"], reference["model"], rtol=1e-3, atol=1e-5)

    # The same sharded checkpoint under --strategy ddp: loaded through DCP, the same curve as on one FSDP process.
    as_ddp = out / "as-ddp"
    shutil.copytree(runs["killed"], as_ddp)
    train(package, out, digits_cache, *ARGS, "--run-name", "as-ddp", "--resume", "auto")
    assert step_losses(as_ddp) == step_losses(on_one)
    assert "sharded" not in torch.load(as_ddp / "last.pt", weights_only=True)  # written as a plain checkpoint

    # A DDP checkpoint is not resumed as a sharded one: one message, exit 1, the run folder untouched.
    shutil.copytree(out / "ddp", out / "ddp-copy")
    before = snapshot(out / "ddp-copy")
    command = train_command(
        package, *COMMON, "--out", str(out), "--cache-dir", str(digits_cache), *ARGS, "--strategy", "fsdp"
    )
    refused = subprocess.run(
        [*command, "--run-name", "ddp-copy", "--resume", "auto"],
        env=python_env(package),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out.parent,
    )
    assert refused.returncode == 1, refused.stderr
    assert "was written with --strategy ddp; resume it with --strategy ddp" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert snapshot(out / "ddp-copy") == before


@pytest.mark.slow
def test_scmc_export_reads_a_sharded_checkpoint_and_verifies_it_like_any_other(
    package: Path, runs: dict, tmp_path: Path
):
    import json

    from click.testing import CliRunner

    from scmc.cli import main

    best = runs["out"] / "fsdp" / "best.pt"
    result = CliRunner().invoke(
        main,
        [
            "export",
            str(package),
            "--checkpoint",
            str(best),
            "--format",
            "torchscript",
            "-o",
            str(tmp_path / "x"),
            "--latency-rounds",
            "0",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    assert report["passed"] and report["checkpoint"]["weights"] == "ema"
    assert "parity: ok" in result.output

    # The file without its shards folder: one error naming what is missing.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(best, alone / "best.pt")
    result = CliRunner().invoke(
        main, ["export", str(package), "--checkpoint", str(alone / "best.pt"), "--format", "torchscript"]
    )
    assert result.exit_code != 0 and "E1150" in result.output and "copy both" in result.output
    assert "Traceback" not in result.output
