"""The generated train.py: flags, checkpoints, DDP under torchrun, exact resume, signals, MLflow.

Every run trains ConvNeXtV2-atto (10 classes) on the embedded digits at 32x32 for a few steps,
in a subprocess, exactly as a user runs it: ``python -m <pkg>.train`` or
``torchrun --standalone --nproc_per_node=2 -m <pkg>.train``. CPU only, one thread per process,
deterministic kernels and no data-loading workers, so runs are bit-reproducible.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from scmc.emit.train import FIELDS, TrainContext, render_train
from tests.conftest import build_package
from tests.train_support import children, complete_package, kill_tree, python_env, run_job, run_many

pytest.importorskip("PIL")
pytest.importorskip("sklearn")

PACKAGE = "atto_digits"
ACCUMULATING = "atto_digits_accumulate"
# Small, fast and reproducible: every run below adds its own --epochs/--max-steps.
COMMON = [
    "--image-size",
    "32",
    "--batch-size",
    "32",
    "--workers",
    "0",
    "--threads",
    "1",
    "--deterministic",
    "--ci",
    "--no-mlflow",
    "--log-every",
    "1",
    "--max-val-steps",
    "2",
]
SIGNAL_DEADLINE_S = 30
# Two ranks sum their gradients in another order than one process does: float32 rounding only.
DDP_RELATIVE_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / PACKAGE
    build_package(out, "cfg/models/ConvNeXtV2.yaml", "-p", "backbone=atto", "-p", "num_classes=10", name=PACKAGE)
    return complete_package(out, PACKAGE)


@pytest.fixture(scope="session")
def accumulating_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with a backward that updates every second step (DDP no_sync in between)."""
    out = tmp_path_factory.mktemp("train") / ACCUMULATING
    build_package(
        out,
        "cfg/models/ConvNeXtV2.yaml",
        "-p",
        "backbone=atto",
        "-p",
        "num_classes=10",
        "-p",
        "accumulate_gradients=2",
        name=ACCUMULATING,
    )
    complete_package(out, ACCUMULATING, accumulate=2)
    backward = (out / "src" / ACCUMULATING / "backward.py").read_text()
    assert "accumulate = 2" in backward
    return out


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One unpacked copy of the digits for every run of the session."""
    from scmc_runtime.data import prepare_digits

    cache = tmp_path_factory.mktemp("data")
    prepare_digits(cache / "digits")
    return cache


def train_command(package_dir: Path, *args: str, ranks: int = 0) -> list[str]:
    name = package_dir.name
    if ranks:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    else:
        launcher = [sys.executable]
    return [*launcher, "-m", f"{name}.train", *args]


def train(
    package_dir: Path, out: Path, cache: Path, *args: str, ranks: int = 0, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run train.py to completion and fail the test, with its output, unless it exits 0."""
    command = train_command(package_dir, *COMMON, "--out", str(out), "--cache-dir", str(cache), *args, ranks=ranks)
    result = run_job(command, env=python_env(package_dir), timeout=timeout, cwd=out.parent)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def start(package_dir: Path, out: Path, cache: Path, *args: str, ranks: int = 0) -> subprocess.Popen:
    command = train_command(package_dir, *COMMON, "--out", str(out), "--cache-dir", str(cache), *args, ranks=ranks)
    return subprocess.Popen(
        command,
        env=python_env(package_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=out.parent,
    )


def records(run_dir: Path, event: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == event]


def wait_for(condition, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training exited ({process.returncode}) before {what}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f}s:\n{kill_tree(process)}")
        time.sleep(0.05)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def assert_same_tensors(left: object, right: object, where: str) -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and torch.equal(left, right), where
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            assert_same_tensors(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert left == right, where


# ---------------------------------------------------------------------------------------------
# The generated source


def _context(**changes) -> TrainContext:
    ctx = TrainContext(
        package="pkg",
        scmc_version="0.1.0",
        template="cfg/models/ConvNeXtV2.yaml",
        model_inputs=["image"],
        model_outputs=["cls"],
        model_structured=True,
        label="label",
        loss_inputs=["label", "cls"],
        loss_outputs=["ce_loss"],
        loss_structured=False,
        metric_inputs=["label", "cls"],
        metric_outputs=["acc1", "acc5"],
        metric_structured=False,
        backward_losses=["ce_loss"],
        defaults={"epochs": 6, "batch_size": 32, "image_size": 32},
    )
    return replace(ctx, **changes)


def test_train_py_keeps_the_package_wiring_and_hands_it_to_the_runtime_trainer():
    source = render_train(_context())
    ast.parse(source)
    for visible in (
        "from pkg.model import Model",
        "return model(batch.images)",
        'ce_loss = criterion(label=batch.loss_labels, cls=outputs["cls"])',
        'acc1, acc5 = metric(label=batch.labels, cls=outputs["cls"])',
        'return backward(ce_loss=losses["ce_loss"], last_in_epoch=last_in_epoch)',
        "return Trainer(",
        "data=ImageData(),",
        "make_trainer(cfg).fit()",
    ):
        assert visible in source, visible
    # The generic loop is the runtime's, the same for every package: not repeated in train.py.
    for hidden in ("DistributedDataParallel(", "no_sync()", "GracefulStop(", "for epoch in range("):
        assert hidden not in source, hidden
    assert "epochs: int = flag(6," in source and "image_size: int = flag(32," in source
    assert 'best_metric: str = flag("val_acc1",' in source


def test_the_runtime_trainer_is_where_amp_accumulation_ema_and_ddp_happen():
    import scmc_runtime.trainer

    source = Path(scmc_runtime.trainer.__file__).read_text()
    for visible in (
        "DistributedDataParallel(",
        "self.ddp.no_sync()",
        "with backward.autocast(self.device.type):",
        "self.ema.update(self.net",
        "sync_batchnorm(",
        "torch.compile(",
        "save_checkpoint(",
        "GracefulStop(",
    ):
        assert visible in source, visible


def test_train_py_is_the_same_text_for_the_same_context():
    assert render_train(_context()) == render_train(_context())


def test_train_py_wires_losses_and_metrics_by_name_for_unstructured_models():
    source = render_train(_context(model_structured=False, metric_outputs=["acc1"], metric_inputs=["cls", "label"]))
    assert "ce_loss = criterion(label=batch.loss_labels, cls=outputs)" in source
    assert "acc1 = metric(cls=outputs, label=batch.labels)" in source


def test_a_package_without_metric_picks_best_by_the_first_loss():
    source = render_train(_context(metric_inputs=[], metric_outputs=[]))
    assert "pkg.metric import" not in source and "metric=None," in source
    assert 'best_metric: str = flag("val_ce_loss",' in source and 'best_mode: str = flag("min",' in source


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"defaults": {"epoch": 3}}, "unknown training default(s) epoch"),
        ({"defaults": {"epochs": "many"}}, "default epochs='many' is not an int"),
        ({"loss_inputs": ["label", "logits"]}, "loss input(s) logits are neither the label"),
        ({"backward_losses": ["total"]}, "the backward takes total"),
        ({"model_inputs": ["image", "mask"]}, "there is no data for mask"),
        ({"metric_outputs": ["ce_loss"]}, "ce_loss is both a loss and a metric output"),
        ({"loss_outputs": ["class"]}, "not a Python identifier"),
    ],
)
def test_train_py_refuses_a_context_it_cannot_wire(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render_train(_context(**changes))


# ---------------------------------------------------------------------------------------------
# Running it


def test_help_lists_every_config_field(package: Path):
    result = subprocess.run(
        train_command(package, "--help"), env=python_env(package), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for field in FIELDS:
        flag = "--" + field.name.replace("_", "-")
        assert flag in result.stdout, flag
        if field.type == "bool":
            assert f"--no-{field.name.replace('_', '-')}" in result.stdout
    for documented in ("--resume", "--no-mlflow", "--timm-dataset", "--batch-size", "--ci", "--fresh"):
        assert documented in result.stdout
    text = " ".join(result.stdout.split())
    assert "MLflow experiment (default: the package name)" in text and f"(default: {PACKAGE})" not in text
    assert "(default: )" not in text


def test_a_short_run_writes_last_best_and_metrics_that_load_weights_only_without_prefixes(
    package: Path, digits_cache: Path, tmp_path: Path
):
    out = tmp_path / "runs"
    result = train(package, out, digits_cache, "--epochs", "1", "--max-steps", "3", "--run-name", "short")
    run_dir = out / "short"
    assert {"last.pt", "best.pt", "metrics.jsonl", "config.json"} <= {p.name for p in run_dir.iterdir()}
    assert not (out / "mlflow.db").exists() and not (out / "mlartifacts").exists()  # --no-mlflow

    last, best = load(run_dir / "last.pt"), load(run_dir / "best.pt")
    for state in (last["model"], last["ema"], best["model"], best["ema"]):
        assert not [key for key in state if key.startswith(("module.", "_orig_mod."))]
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (1, 0, 3)
    assert {"backward", "rng", "best", "config"} <= last.keys()

    sys.path.insert(0, str(package / "src"))
    try:
        from atto_digits.model import Model  # noqa: PLC0415
    finally:
        sys.path.remove(str(package / "src"))
    Model().load_state_dict(best["model"])  # strict: every key matches

    [epoch] = records(run_dir, "epoch")
    assert {"train_ce_loss", "val_acc1", "val_ce_loss", "ema_val_acc1"} <= epoch.keys()
    assert len(records(run_dir, "step")) == 3
    [end] = records(run_dir, "end")
    assert end["metric"] == "val_acc1" and end["value"] == epoch["val_acc1"]
    assert f"best val_acc1 {epoch['val_acc1']:.4f}" in result.stdout and str(run_dir / "best.pt") in result.stdout
    # The end of a run says where its records are and what comes next (no MLflow line with --no-mlflow).
    assert result.stdout.endswith(
        f"  metrics:  {run_dir / 'metrics.jsonl'}\n"
        f"  export:   scmc export <package folder> --checkpoint {run_dir / 'best.pt'}\n"
        f"  predict:  python -m {PACKAGE}.predict --onnx <export folder>/model.onnx IMAGE ...\n"
        f"  in python: {PACKAGE}.load_checkpoint({str(run_dir / 'best.pt')!r})  # the EMA weights\n"
    )
    assert stat.S_IMODE((run_dir / "best.pt").stat().st_mode) == 0o666 & ~current_umask()


def test_resume_auto_without_a_checkpoint_starts_fresh_and_new_runs_get_their_own_folder(
    package: Path, digits_cache: Path, tmp_path: Path
):
    out = tmp_path / "runs"
    train(package, out, digits_cache, "--epochs", "1", "--max-steps", "1", "--max-val-steps", "1", "--resume", "auto")
    train(package, out, digits_cache, "--epochs", "1", "--max-steps", "1", "--max-val-steps", "1")
    assert sorted(p.name for p in out.iterdir()) == [PACKAGE, f"{PACKAGE}-2"]


@pytest.mark.slow
def test_two_ranks_under_torchrun_each_read_half_the_data_and_follow_the_single_process_loss_curve(
    accumulating_package: Path, digits_cache: Path, tmp_path: Path
):
    out = tmp_path / "runs"
    args = ["--epochs", "2", "--max-steps", "4"]
    train(accumulating_package, out, digits_cache, *args, "--run-name", "one")
    train(accumulating_package, out, digits_cache, *args, "--run-name", "two", ranks=2)

    [one], [two] = records(out / "one", "start"), records(out / "two", "start")
    assert (one["world_size"], one["batch_per_rank"], one["images_per_rank_per_epoch"]) == (1, 32, 128)
    assert (two["world_size"], two["batch_per_rank"], two["images_per_rank_per_epoch"]) == (2, 16, 64)

    curve_one = [r["train_step_ce_loss"] for r in records(out / "one", "step")]
    curve_two = [r["train_step_ce_loss"] for r in records(out / "two", "step")]
    assert len(curve_one) == len(curve_two) == 8
    assert curve_two == pytest.approx(curve_one, rel=DDP_RELATIVE_TOLERANCE)
    # The weights moved identically too: the last validation of both runs agrees.
    val_one, val_two = records(out / "one", "epoch")[-1], records(out / "two", "epoch")[-1]
    assert val_two["val_ce_loss"] == pytest.approx(val_one["val_ce_loss"], rel=DDP_RELATIVE_TOLERANCE)
    # Accumulation over two steps: 4 steps per epoch are 2 optimizer updates.
    assert load(out / "two" / "last.pt")["backward"]["updates"] == 4


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_ends_with_bitwise_identical_weights(
    package: Path, digits_cache: Path, tmp_path: Path
):
    out = tmp_path / "runs"
    args = ["--epochs", "2", "--max-steps", "6", "--save-every", "2"]
    train(package, out, digits_cache, *args, "--run-name", "straight")

    killed = out / "killed"
    process = start(package, out, digits_cache, *args, "--run-name", "killed")
    seen = {"mtime": 0}

    def mid_epoch_checkpoint() -> bool:
        path = killed / "last.pt"
        if not path.exists() or path.stat().st_mtime_ns == seen["mtime"]:
            return False
        seen["mtime"] = path.stat().st_mtime_ns
        state = load(path)
        return state["epoch"] == 0 and state["step_in_epoch"] > 0

    try:
        wait_for(mid_epoch_checkpoint, 120, process, "a mid-epoch checkpoint")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        kill_tree(process)
    assert process.returncode == -signal.SIGKILL

    train(package, out, digits_cache, *args, "--run-name", "killed", "--resume", "auto")
    resumed = records(killed, "start")[-1]
    assert resumed["resumed_from"] is not None and resumed["start_epoch"] == 0 and resumed["start_step"] > 0

    straight, again = load(out / "straight" / "last.pt"), load(killed / "last.pt")
    for part in ("model", "ema", "backward", "epoch", "step_in_epoch", "global_step", "best"):
        assert_same_tensors(straight[part], again[part], part)
    straight_val = records(out / "straight", "epoch")[-1]
    again_val = records(killed, "epoch")[-1]
    assert again_val["val_ce_loss"] == straight_val["val_ce_loss"]
    # The steps trained again after the kill are recorded once: the records after the checkpoint were dropped.
    assert [r["step"] for r in records(killed, "step")] == list(range(1, 13))
    assert [r["step"] for r in records(killed, "step")] == [r["step"] for r in records(out / "straight", "step")]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(package: Path, digits_cache: Path, tmp_path: Path):
    out = tmp_path / "runs"
    process = start(package, out, digits_cache, "--epochs", "100", "--run-name", "term")
    try:
        wait_for(lambda: len(records(out / "term", "step")) >= 2, 120, process, "two training steps")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=SIGNAL_DEADLINE_S)
    finally:
        kill_tree(process)
    assert process.returncode == 0, output
    assert "stopped by a signal" in output
    state = load(out / "term" / "last.pt")
    assert state["epoch"] == 0 and state["step_in_epoch"] >= 2
    assert state["global_step"] == state["step_in_epoch"]


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_once_and_every_rank_exits_zero(package: Path, digits_cache: Path, tmp_path: Path):
    out = tmp_path / "runs"
    process = start(package, out, digits_cache, "--epochs", "100", "--run-name", "term2", ranks=2)
    try:
        wait_for(lambda: len(records(out / "term2", "step")) >= 2, 180, process, "two training steps")
        workers = children(process.pid)
        assert len(workers) == 2, workers
        for pid in workers:  # as a cluster scheduler does: every rank gets the signal
            os.kill(pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=SIGNAL_DEADLINE_S)
    finally:
        kill_tree(process)
    assert process.returncode == 0, output  # torchrun exits 0 only when every rank did
    assert "stopped by a signal" in output
    state = load(out / "term2" / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["step_in_epoch"] >= 2


@pytest.mark.slow
def test_mlflow_records_params_metrics_and_artifacts_in_the_sqlite_store(
    package: Path, digits_cache: Path, tmp_path: Path
):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "runs"
    result = train(package, out, digits_cache, "--epochs", "1", "--max-steps", "2", "--mlflow", "--run-name", "tracked")
    assert f"  MLflow:   mlflow ui --backend-store-uri sqlite:///{out.resolve() / 'mlflow.db'}\n" in result.stdout

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(PACKAGE)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1" and run.data.params["package"] == PACKAGE
    assert run.data.params["template.backbone"] == "atto" and run.data.params["template.num_classes"] == "10"
    assert {"val_acc1", "ema_val_acc1", "train_ce_loss", "train_step_ce_loss"} <= run.data.metrics.keys()
    assert any(key.startswith("lr_") for key in run.data.metrics)
    # One series per meaning: means over log_every steps, and the epoch's mean, under different keys.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_step_ce_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_ce_loss")] == [2]
    lr_key = next(key for key in run.data.metrics if key.startswith("lr_"))
    assert [m.step for m in client.get_metric_history(run.info.run_id, lr_key)] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "config.json", "best.pt"} <= artifacts


# ---------------------------------------------------------------------------------------------
# Bad input: checked before anything is created, one message, never a traceback

PROG = f"python -m {PACKAGE}.train"
NO_CUDA = not torch.cuda.is_available()
# (flags, the exact message after "<prog>: error: "); each exits 2 and creates nothing.
FLAG_CASES = [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--epochs", "-1"], "--epochs -1: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--image-size", "0"], "--image-size 0: must be at least 1"),
    (["--log-every", "0"], "--log-every 0: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be at least 0"),
    (["--max-steps", "-3"], "--max-steps -3: must be at least 0 (0: all)"),
    (["--device", "tpu"], "--device tpu: must be auto, cpu, cuda or cuda:N"),
    (["--mean", "0.5", "0.5"], "--mean 0.5 0.5: give 3 values, one per RGB channel"),
    (["--std", "0.2", "0", "0.2"], "--std 0.2 0.0 0.2: every value must be positive"),
    (["--ema-decay", "2"], "--ema-decay 2.0: must be in [0, 1), e.g. 0.9998"),
    (["--best-mode", "maximum"], "--best-mode maximum: must be max or min"),
    (
        ["--compile-mode", "fastest"],
        "--compile-mode fastest: must be one of default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs",
    ),
    (
        ["--best-metric", "val_top1"],
        "--best-metric val_top1: must be one of val_ce_loss, val_acc1, val_acc5, ema_val_ce_loss, ema_val_acc1, "
        "ema_val_acc5, train_ce_loss, train_acc1, train_acc5",
    ),
    (["--data", "nowhere"], "--data nowhere: no such folder"),
    (
        ["--data", "nowhere", "--timm-dataset", "torch/cifar10"],
        "2 problems with the flags:\n"
        "  --data and --timm-dataset: pass one data source, not both\n  --data nowhere: no such folder",
    ),
    (
        ["--resume", "missing.pt"],
        "--resume missing.pt: no such checkpoint file (or pass auto: the newest last.pt of the run)",
    ),
    (["--resume", "auto", "--fresh"], "--fresh and --resume auto: --fresh starts a new run, --resume continues one"),
    (["--run-name", "../elsewhere"], "--run-name ../elsewhere: must be a folder name inside --out, without / or .."),
    (
        ["--epochs", "0", "--log-every", "0", "--best-mode", "up"],
        "3 problems with the flags:\n  --epochs 0: must be at least 1\n  --log-every 0: must be at least 1\n"
        "  --best-mode up: must be max or min",
    ),
]
if NO_CUDA:
    FLAG_CASES.append(
        (["--device", "cuda"], "--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    )


@pytest.fixture(scope="session")
def flag_results(package: Path, digits_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    work = tmp_path_factory.mktemp("flags")
    common = [*COMMON, "--out", str(work / "runs"), "--cache-dir", str(digits_cache)]
    return work, run_many(package, [[*common, *flags] for flags, _ in FLAG_CASES], cwd=work)


@pytest.mark.parametrize("index", range(len(FLAG_CASES)), ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_a_bad_flag_is_reported_with_the_allowed_values_and_exit_2_before_anything_is_created(flag_results, index):
    work, results = flag_results
    assert results[index] == {"code": 2, "stderr": f"{PROG}: error: {FLAG_CASES[index][1]}\n"}
    assert not (work / "runs").exists()  # no run folder, no mlflow.db


def test_a_bad_flag_from_the_command_line_exits_2_with_one_message(package: Path, tmp_path: Path):
    command = train_command(package, "--epochs", "0", "--device", "tpu", "--out", str(tmp_path / "runs"))
    result = subprocess.run(command, env=python_env(package), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == (
        f"{PROG}: error: 2 problems with the flags:\n  --epochs 0: must be at least 1\n"
        "  --device tpu: must be auto, cpu, cuda or cuda:N\n"
    )
    assert not (tmp_path / "runs").exists()


def test_an_image_size_the_model_cannot_take_is_a_usage_error(flag_results, package: Path, digits_cache: Path):
    work, _ = flag_results
    [result] = run_many(package, [[*COMMON, "--image-size", "8", "--out", str(work / "runs8")]], cwd=work)
    assert result["code"] == 2
    assert result["stderr"].startswith(f"{PROG}: error: --image-size 8: the model cannot take 8x8 images (")
    assert result["stderr"].endswith("); try a larger size\n") and result["stderr"].count("\n") == 1
    assert not (work / "runs8").exists()


def _write_images(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (8, 8), (index * 20 % 255, 0, 0)).save(folder / f"{index}.png")


def test_bad_data_folders_are_reported_before_a_run_folder_is_created(package: Path, tmp_path: Path):
    empty, no_images, three = tmp_path / "empty", tmp_path / "no_images", tmp_path / "three"
    empty.mkdir()
    (no_images / "train" / "a").mkdir(parents=True)
    (no_images / "val" / "a").mkdir(parents=True)
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            _write_images(three / split / name, 4)
    mismatch = tmp_path / "mismatch"
    _write_images(mismatch / "train" / "a", 2)
    _write_images(mismatch / "val" / "b", 2)
    out = tmp_path / "runs"
    cases = {
        str(empty): f"--data {empty}: no train/ and no val/ folder; it must hold train/ and val/ (or validation/), "
        "each with one sub-folder of images per class (ImageFolder layout)",
        str(no_images): f"--data {no_images}: train/ holds no images (.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, "
        ".webp, .ppm, .pgm)",
        str(mismatch): f"--data {mismatch}: train/ and val/ have different class folders (only in train/: a; "
        "only in val/: b)",
        str(three): "the data has 3 classes but the model's head has 10 outputs; rebuild the package for 3 classes "
        "(e.g. scmc build ... -p num_classes=3), or pass --allow-class-mismatch to train it anyway",
    }
    results = run_many(package, [[*COMMON, "--out", str(out), "--data", data] for data in cases], cwd=tmp_path)
    for result, message in zip(results, cases.values()):
        assert result == {"code": 1, "stderr": f"{PROG}: error: {message}\n"}
    assert not out.exists()


def test_an_unreadable_image_stops_with_its_path_after_saving_or_is_skipped_and_counted(package: Path, tmp_path: Path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            _write_images(data / split / name, 12)
    bad = data / "train" / "c" / "zz-broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    out = tmp_path / "runs"
    small = ["--batch-size", "4", "--data", str(data), "--allow-class-mismatch", "--out", str(out), "--epochs", "1"]
    stopped, skipped = run_many(
        package,
        [[*COMMON, *small, "--run-name", "stops"], [*COMMON, *small, "--run-name", "skips", "--skip-bad-images"]],
        cwd=tmp_path,
    )
    assert stopped["code"] == 1 and stopped["stderr"].count("\n") == 1, stopped
    assert stopped["stderr"].startswith(f"{PROG}: error: {bad}: cannot read the image (")
    saved = load(out / "stops" / "last.pt")
    assert stopped["stderr"].endswith(
        f"; last.pt holds step {saved['global_step']}. Replace or remove the file (or pass --skip-bad-images), "
        "then continue with --resume auto\n"
    )
    assert saved["global_step"] > 0 and saved["step_in_epoch"] == saved["global_step"]
    assert skipped == {"code": 0, "stderr": ""}
    [start] = records(out / "skips", "start")
    assert start["train_images"] == 36 and records(out / "skips", "end")


@pytest.fixture(scope="session")
def finished_run(package: Path, digits_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of one epoch of 2 steps: its last.pt and best.pt."""
    out = tmp_path_factory.mktemp("finished") / "runs"
    train(package, out, digits_cache, "--epochs", "1", "--max-steps", "2", "--run-name", "done")
    return out / "done"


def test_checkpoints_are_checked_before_use_and_a_broken_one_is_never_silently_replaced(
    package: Path, digits_cache: Path, finished_run: Path, tmp_path: Path
):
    import shutil

    from scmc_runtime.checkpoint import model_signature

    out = tmp_path / "runs"
    for name in ("cut", "done"):
        shutil.copytree(finished_run, out / name)
    cut = out / "cut"
    (cut / "last.pt").write_bytes((finished_run / "last.pt").read_bytes()[:4000])
    before = {p.name: p.read_bytes() for p in cut.iterdir()}
    alone = tmp_path / "alone"  # the same broken run found by --resume auto without --run-name
    shutil.copytree(cut, alone / "cut")

    state = load(finished_run / "last.pt")
    other_package = tmp_path / "other_package.pt"
    torch.save({**state, "package": "convnextv2_femto"}, other_package)
    other_model = tmp_path / "other_model.pt"
    weights = dict(state["model"])
    head = next(key for key in weights if key.endswith("weight") and weights[key].ndim == 2 and "head" in key)
    weights[head] = torch.zeros(1000, weights[head].shape[1])
    torch.save({**state, "model": weights}, other_model)
    pickled = tmp_path / "pickled.pt"
    torch.save({**state, "best": torch.nn.Identity()}, pickled)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")

    fix = (
        ". Nothing was changed; to continue from another checkpoint pass --resume PATH, or pass --fresh to start a "
        "new run in a new folder next to it (nothing is overwritten)"
    )
    truncated = "the checkpoint is truncated (an interrupted write or copy)"
    cases = [
        (["--resume", "auto", "--run-name", "cut"], f"{cut / 'last.pt'}: {truncated}{fix}"),
        (["--resume", "auto", "--out", str(alone)], f"{alone / 'cut' / 'last.pt'}: {truncated}{fix}"),
        (
            ["--resume", str(finished_run / "best.pt"), "--run-name", "b"],
            f"{finished_run / 'best.pt'}: the checkpoint has no backward, step_in_epoch, global_step, best, rng "
            f"(best.pt holds weights only: resume from last.pt){fix}",
        ),
        (["--resume", str(text), "--run-name", "t"], f"{text}: not a checkpoint (not a torch.save archive){fix}"),
        (
            ["--resume", str(pickled), "--run-name", "p"],
            f"{pickled}: the checkpoint holds Python objects (torch.nn.modules.linear.Identity); only tensors and "
            f"plain values are loaded (weights_only), so it is refused{fix}",
        ),
        (
            ["--resume", str(other_package), "--run-name", "o"],
            f"{other_package}: a checkpoint of package convnextv2_femto, not of {PACKAGE}{fix}",
        ),
        (
            ["--resume", str(other_model), "--run-name", "m"],
            f"{other_model}: the checkpoint's model does not fit this package's model (signature "
            f"{model_signature(weights)}, expected {model_signature(state['model'])}: {head} is "
            f"[1000, {weights[head].shape[1]}] there, {list(state['model'][head].shape)} here){fix}",
        ),
        (
            ["--resume", "auto", "--run-name", "done", "--epochs", "3", "--batch-size", "16"],
            f"{out / 'done' / 'last.pt'} was trained with --epochs 1 --batch-size 32, not --epochs 3 --batch-size 16: "
            "the learning-rate schedule and the position in the data depend on them, so the run is not re-planned; "
            "resume with --epochs 1 --batch-size 32, or pass --fresh to start a new run in a new folder next to it "
            "(nothing is overwritten)",
        ),
        (
            ["--run-name", "done"],
            f"{out / 'done'} already holds a run (best.pt, last.pt); pass --resume auto to continue it, --fresh to "
            "start a new run next to it, or choose another --run-name",
        ),
        (
            ["--resume", str(finished_run / "last.pt"), "--run-name", "done"],
            f"--run-name done: {out / 'done'} already holds another run's checkpoints (best.pt, last.pt); "
            "choose another --run-name",
        ),
    ]
    argvs = [[*COMMON, "--out", str(out), "--cache-dir", str(digits_cache), "--max-steps", "2", *a] for a, _ in cases]
    results = run_many(package, argvs, cwd=tmp_path)
    for (args, message), result in zip(cases, results):
        assert result == {"code": 1, "stderr": f"{PROG}: error: {message}\n"}, args
    assert {p.name: p.read_bytes() for p in cut.iterdir()} == before  # best.pt byte-identical, nothing added
    assert sorted(p.name for p in out.iterdir()) == ["cut", "done"]  # no folder for the refused runs


def test_fresh_starts_a_new_run_next_to_an_existing_one(package: Path, digits_cache: Path, finished_run: Path):
    out = finished_run.parent
    before = (finished_run / "best.pt").read_bytes()
    train(package, out, digits_cache, "--epochs", "1", "--max-steps", "1", "--run-name", "done", "--fresh")
    assert (out / "done-2" / "best.pt").is_file() and (finished_run / "best.pt").read_bytes() == before


def test_the_package_loads_a_best_pt_with_its_ema_weights(package: Path, finished_run: Path):
    code = (
        f"import torch, {PACKAGE} as p; m = p.load_checkpoint({str(finished_run / 'best.pt')!r}); "
        f"ema = torch.load({str(finished_run / 'best.pt')!r}, weights_only=True)['ema']; "
        "print(type(m).__name__, m.training, all(torch.equal(v, ema[k]) for k, v in m.state_dict().items()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=python_env(package), capture_output=True, text=True, timeout=120
    )
    assert result.stdout == "Model False True\n", result.stderr


def test_an_internal_error_says_so_and_points_to_the_traceback_log(package: Path, tmp_path: Path):
    # Not a user mistake: a cache folder that is a file breaks unpacking the digits.
    (tmp_path / "cache").write_text("")
    [result] = run_many(
        package, [[*COMMON, "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]], cwd=tmp_path
    )
    assert result["code"] == 1 and result["stderr"].count("\n") == 1
    assert result["stderr"].startswith(f"{PROG}: internal error (")
    assert "this is not a mistake in your flags. The traceback is in " in result["stderr"]
    log = Path(result["stderr"].rsplit("The traceback is in ", 1)[1].strip())
    assert "Traceback (most recent call last)" in log.read_text()
    log.unlink()


@pytest.mark.slow
def test_a_bad_image_in_validation_saves_the_trained_epoch_fails_the_mlflow_run_and_resumes_with_validation(
    package: Path, tmp_path: Path
):
    mlflow = pytest.importorskip("mlflow")
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("a", "b"):
            _write_images(data / split / name, 6)
    broken = data / "val" / "b" / "zz-broken.png"
    broken.write_bytes(b"broken")  # found only in validation
    out = tmp_path / "runs"
    args = [*COMMON, "--batch-size", "4", "--data", str(data), "--allow-class-mismatch", "--out", str(out)]
    args += ["--epochs", "1", "--max-val-steps", "0", "--mlflow", "--run-name", "failing"]
    [result] = run_many(package, [args], cwd=tmp_path)
    error = result["stderr"].splitlines(keepends=True)[-1]  # after MLflow's own INFO lines
    assert result["code"] == 1 and error.startswith(f"{PROG}: error: {broken}: cannot read the image (")
    assert error.endswith(
        "; last.pt holds step 3. Replace or remove the file (or pass --skip-bad-images), then continue with "
        "--resume auto\n"
    )
    saved = load(out / "failing" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 3, 3)  # trained, not validated
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(PACKAGE).experiment_id])
    assert run.info.status == "FAILED"

    broken.unlink()
    [again] = run_many(package, [[*args, "--resume", "auto"]], cwd=tmp_path)
    assert again["code"] == 0 and "error" not in again["stderr"], again
    [epoch] = records(out / "failing", "epoch")
    assert epoch["step"] == 3 and "val_acc1" in epoch and (out / "failing" / "best.pt").is_file()
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
