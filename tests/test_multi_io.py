"""A model with two inputs and two outputs, end to end: build, train, resume, export to ONNX, predict.

cfg/models/TabularFusion.yaml takes an image and a row of tabular features and gives class
logits (`cls`) and regression values (`reg`); cfg/losses/cls_reg.yaml adds cross-entropy and a
weighted SmoothL1; the data is the embedded digits written as an image table (class folders plus
table.csv, scmc_runtime.tabular) with targets that depend on the image and the features.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scmc_runtime.tabular import ImageTableDataset, read_table, write_digits_table
from scmc_runtime.train import TrainError
from tests.conftest import build_package, import_package
from tests.train_support import kill_tree, python_env

ROOT = Path(__file__).resolve().parents[1]
NAME = "tabularfusion"
TRAIN = ["--batch-size", "32", "--max-steps", "12", "--log-every", "4", "--workers", "0", "--threads", "1"]
TRAIN += ["--ci", "--no-mlflow"]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_package(tmp_path_factory.mktemp("multi") / NAME, "cfg/models/TabularFusion.yaml", name=NAME)


def _train(package: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", f"{NAME}.train", *TRAIN, "--out", "runs", "--cache-dir", "data", *args]
    result = subprocess.run(command, env=python_env(package), capture_output=True, text=True, timeout=600, cwd=work)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def trained(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of 12 steps on the embedded digits table straight, and once stopped by SIGTERM and resumed."""
    work = tmp_path_factory.mktemp("multi_run")
    _train(package, work, "--epochs", "2", "--run-name", "straight")
    command = [sys.executable, "-m", f"{NAME}.train", *TRAIN, "--out", "runs", "--cache-dir", "data"]
    command += ["--epochs", "2", "--run-name", "stopped"]
    process = subprocess.Popen(command, env=python_env(package), cwd=work, stdout=subprocess.PIPE, text=True)
    log = work / "runs" / "stopped" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and '"event": "step"' in log.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, kill_tree(process)
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # finishes the step, saves last.pt, exits 0
        assert process.wait(timeout=120) == 0
    finally:
        kill_tree(process)
    _train(package, work, "--epochs", "2", "--run-name", "stopped", "--resume", "auto")
    return work


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_package_has_two_inputs_two_outputs_and_both_losses(package: Path) -> None:
    manifest = json.loads((package / "src" / NAME / "manifest.json").read_text())
    assert list(manifest["input_shapes"]) == ["image", "tabular"]
    assert manifest["input_shapes"]["tabular"]["shape"] == [4]
    assert manifest["outputs"]["model"] == ["cls", "reg"]
    assert manifest["outputs"]["loss"] == ["ce_loss", "reg_loss", "loss"]
    pkg = import_package(package, NAME)
    model = pkg.Model().eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32), torch.randn(3, 4))
    assert out["cls"].shape == (3, 10) and out["reg"].shape == (3, 2)
    count = sum(p.numel() for p in model.parameters())
    readme = (ROOT / "README.md").read_text()
    assert f"| `TabularFusion.yaml` | `scmc build cfg/models/TabularFusion.yaml` | default {count:,} " in readme
    loss = pkg.Loss()(label=torch.tensor([1, 2, 3]), cls=out["cls"], target=torch.zeros(3, 2), reg=out["reg"])
    ce, reg, total = loss
    assert torch.allclose(total, ce + reg)  # reg_weight 1.0
    train_py = (package / "src" / NAME / "train.py").read_text()
    assert "data=TableData(num_features=NUM_FEATURES, num_targets=NUM_TARGETS)" in train_py
    assert "return model(batch.images, batch.features)" in train_py


def test_training_logs_both_losses_they_fall_and_a_stopped_run_resumes_exactly(trained: Path) -> None:
    records = _records(trained / "runs" / "straight" / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == 6  # 24 steps, logged every 4
    for name in ("ce_loss", "reg_loss", "loss"):
        assert all(math.isfinite(r[f"train_step_{name}"]) for r in steps)
    # the weighted sum is what the backward optimizes, and it falls; so does the regression part
    assert steps[-1]["train_step_loss"] < steps[0]["train_step_loss"]
    assert steps[-1]["train_step_reg_loss"] < steps[0]["train_step_reg_loss"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert epochs[-1]["val_reg_loss"] < epochs[0]["val_reg_loss"]
    assert {"val_ce_loss", "val_reg_loss", "val_loss", "val_acc1", "ema_val_reg_loss"} <= set(epochs[-1])

    stopped = _records(trained / "runs" / "stopped" / "metrics.jsonl")
    resumed = [r for r in stopped if r["event"] == "start"][-1]
    assert resumed["resumed_from"].endswith("last.pt")
    assert resumed["start_epoch"] * 12 + resumed["start_step"] > 0
    assert [r["step"] for r in stopped if r["event"] == "step"] == [r["step"] for r in steps]  # each once
    straight = torch.load(trained / "runs" / "straight" / "last.pt", weights_only=True)
    again = torch.load(trained / "runs" / "stopped" / "last.pt", weights_only=True)
    assert straight["global_step"] == again["global_step"] == 24
    assert "bn1.running_mean" in again["model"] and "bn1.running_var" in again["ema"]  # BatchNorm statistics
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            assert torch.equal(value, again[part][key]), (part, key)


def test_export_writes_a_two_input_two_output_onnx_that_matches_eager(package: Path, trained: Path) -> None:
    from click.testing import CliRunner

    from scmc.cli import main

    out = trained / "export"
    best = trained / "runs" / "straight" / "best.pt"
    result = CliRunner().invoke(
        main, ["export", str(package), "--checkpoint", str(best), "-o", str(out), "--format", "onnx"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export_report.json").read_text())
    assert report["outputs"] == ["cls", "reg"]
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "tabular"]
    assert [o.name for o in session.get_outputs()] == ["cls", "reg"]
    pkg = import_package(package, NAME)
    model = pkg.load_checkpoint(str(best)).eval()  # the EMA weights, as export uses
    torch.manual_seed(1)
    image, tabular = torch.randn(5, 3, 32, 32), torch.randn(5, 4)
    with torch.no_grad():
        eager = model(image, tabular)
    cls, reg = session.run(["cls", "reg"], {"image": image.numpy(), "tabular": tabular.numpy()})
    assert torch.allclose(torch.from_numpy(cls), eager["cls"], atol=1e-4, rtol=1e-3)
    assert torch.allclose(torch.from_numpy(reg), eager["reg"], atol=1e-4, rtol=1e-3)

    # predict.py: both inputs given, both outputs printed; the values are the eager model's
    table = trained / "data" / "digits_table_f4_t2" / "val"
    rows = list(read_table(table / "table.csv", 4, 2).items())[:2]
    argv = [sys.executable, "-m", f"{NAME}.predict", "--onnx", str(out / "model.onnx"), "--json", "--topk", "3"]
    for path, _ in rows:
        argv.append(str(table / path))
    for _, (features, _) in rows:
        argv.append("--features=" + ",".join(repr(v) for v in features))
    done = subprocess.run(argv, env=python_env(package), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["image"] for r in results] == [str(table / path) for path, _ in rows]
    dataset = ImageTableDataset(table, 4, 2, transform=_val_transform())
    by_path = {p.relative_to(table).as_posix(): i for i, (p, _) in enumerate(dataset.samples)}
    for result, (path, (features, _)) in zip(results, rows):
        image, feats, _, _ = dataset[by_path[path]]
        with torch.no_grad():
            expected = model(image[None], feats[None])
        assert len(result["topk"]) == 3 and result["topk"][0]["index"] == int(expected["cls"].argmax())
        assert torch.allclose(torch.tensor(result["outputs"]["reg"]), expected["reg"][0], atol=1e-3)
    text = subprocess.run(argv[:-3] + argv[-2:-1] + ["--features=1,2"], env=python_env(package), capture_output=True)
    assert text.returncode == 1 and text.stderr.decode().startswith("error: --features '1,2': give 4")


def _val_transform():
    from scmc_runtime.data import ImageTransform

    return ImageTransform(32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


# --------------------------------------------------------------------------- the table format


def test_the_digits_table_relates_targets_to_images_and_features(tmp_path: Path) -> None:
    root = write_digits_table(tmp_path / "t", num_features=3, num_targets=2)
    table = read_table(root / "train" / "table.csv", 3, 2)
    dataset = ImageTableDataset(root / "train", 3, 2)
    assert len(table) == len(dataset) > 1000
    image, features, label, targets = dataset[0]
    assert features.shape == (3,) and targets.shape == (2,) and 0 <= label < 10
    brightness = float(image.mean())  # scaled to [0, 1], no normalization without a transform
    expected = 0.5 * features[0] - 0.25 * features[1] + 2 * brightness - 1
    assert abs(float(targets[0]) - float(expected)) < 1e-3
    assert abs(float(targets[1]) - (0.5 * features[1] - 0.25 * features[2] + (label - 4.5) / 4.5)) < 1e-3


def test_a_broken_table_is_one_message_naming_the_file_and_line(tmp_path: Path) -> None:
    root = write_digits_table(tmp_path / "t", num_features=2, num_targets=1)
    csv = root / "val" / "table.csv"
    lines = csv.read_text().splitlines()
    with pytest.raises(TrainError, match=r"table.csv:1: the header is path,x0,x1,y0, but .* 3 features"):
        read_table(csv, 3, 1)
    csv.write_text("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",abc", *lines[2:]]) + "\n")
    with pytest.raises(TrainError, match=r"table.csv:2: 'abc' is not a number"):
        read_table(csv, 2, 1)
    csv.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    with pytest.raises(TrainError, match=r"no row for the image " + lines[1].split(",")[0]):
        ImageTableDataset(root / "val", 2, 1)
    csv.write_text("\n".join([*lines, "9/nothing.png,0,0,0"]) + "\n")
    with pytest.raises(TrainError, match=r"1 row\(s\) name no image .* 9/nothing.png"):
        ImageTableDataset(root / "val", 2, 1)


# --------------------------------------------------------------------------- wiring checks (scmc/link.py)

TWO_IN = """\
INPUTS: [image, tabular]
OUTPUTS: [cls, {second}]
STRUCTURED_OUTPUT: true
INPUT_SHAPES: {{image: [3, 8, 8], tabular: [4]}}
FLOW:
  - [image, _, pool, [_obj_, {{_addr_: torch.nn.AdaptiveAvgPool2d}}, {{_call_: {{output_size: 1}}}}]]
  - [_, _, flat, [_obj_, {{_addr_: torch.nn.Flatten}}, _call_]]
  - [_, cls, head, [_obj_, {{_addr_: torch.nn.Linear}}, {{_call_: {{in_features: 3, out_features: 10}}}}]]
  - [tabular, {second}, reg_head, [_obj_, {{_addr_: torch.nn.Linear}}, {{_call_: {{in_features: 4, out_features: 2}}}}]]
"""
ONE_IN = """\
INPUTS: [image]
OUTPUTS: [cls]
STRUCTURED_OUTPUT: true
INPUT_SHAPES: {image: [3, 8, 8]}
FLOW:
  - [image, _, pool, [_obj_, {_addr_: torch.nn.AdaptiveAvgPool2d}, {_call_: {output_size: 1}}]]
  - [_, _, flat, [_obj_, {_addr_: torch.nn.Flatten}, _call_]]
  - [_, cls, head, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 3, out_features: 10}}]]
"""


def _build_errors(tmp_path: Path, model: str, dataset: str, loss: str = "cfg/losses/cls_reg.yaml") -> str:
    from click.testing import CliRunner

    from scmc.cli import main

    (tmp_path / "model.yaml").write_text(model)
    (tmp_path / "data.yaml").write_text(dataset)
    args = ["build", str(tmp_path / "model.yaml"), "--loss", loss, "--dataset", str(tmp_path / "data.yaml")]
    args += ["--backward", "cfg/backwards/TabularFusion.yaml", "-o", str(tmp_path / "out"), "--no-cache"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    return result.output


def test_wiring_mistakes_of_an_image_table_package_are_diagnostics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    loss = tmp_path / "loss.yaml"
    loss.write_text(
        "FLOW:\n  - [{target: label, input: cls}, ce_loss, ce, [_obj_, {_addr_: torch.nn.CrossEntropyLoss}, _call_]]\n"
        "  - [{target: tgt, input: reg}, reg_loss, mse, [_obj_, {_addr_: torch.nn.MSELoss}, _call_]]\n"
        '  - ["eval: ce_loss + reg_loss", loss]\n'
    )
    out = _build_errors(
        tmp_path,
        TWO_IN.format(second="reg"),
        "kind: image_table\nnum_classes: 10\nnum_features: 5\nnum_targets: 2\ntargets: soft\n",
        str(loss),
    )
    assert "error[E1212]: the model's second input `tabular` has shape [4], but the dataset preset's rows have 5" in out
    assert "error[E1214]: loss input `tgt` is not a model output" in out
    assert "error[E1218]: `targets: soft` is for class-label datasets" in out

    out = _build_errors(tmp_path, TWO_IN.format(second="reg"), "kind: image_table\nnum_classes: 10\nnum_targets: 3\n")
    assert "error[E1216]: a `kind: image_table` preset needs `num_features`" in out
    assert "error[E1213]: loss: `reg` is compared with the regression targets (3 per sample" in out

    out = _build_errors(tmp_path, ONE_IN, "kind: image_table\nnum_classes: 10\nnum_features: 4\nnum_targets: 2\n")
    assert "error[E1211]: the dataset preset" in out and "but the model takes 1 (`image`)" in out

    model = TWO_IN.format(second="target")
    out = _build_errors(tmp_path, model, "kind: image_table\nnum_classes: 10\nnum_features: 4\nnum_targets: 2\n")
    assert "error[E1217]: the model's output `target` has the name under which the image_table dataset" in out


def test_train_py_refuses_a_timm_dataset_and_a_broken_table_in_one_line(package: Path, tmp_path: Path) -> None:
    from tests.train_support import run_many

    root = write_digits_table(tmp_path / "table", num_features=4, num_targets=2)
    csv = root / "train" / "table.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0], lines[1] + ",7", *lines[2:]]) + "\n")
    common = ["--out", str(tmp_path / "runs"), "--no-mlflow", "--ci", "--workers", "0", "--epochs", "1"]
    results = run_many(
        package, [["--timm-dataset", "torch/cifar10", *common], ["--data", str(root), *common]], cwd=tmp_path
    )
    assert results[0]["code"] == 2 and "--timm-dataset: this package's model takes an image and a row" in (
        results[0]["stderr"]
    )
    assert results[1]["code"] == 1
    assert f"{csv}:2: 8 values, the header has 7" in results[1]["stderr"]
    assert all(len(r["stderr"].strip().splitlines()) == 1 and "Traceback" not in r["stderr"] for r in results)
    assert not (tmp_path / "runs").exists()  # checked before a run folder is made


def test_the_emitters_refuse_an_image_table_context_without_its_sizes() -> None:
    from dataclasses import replace

    from scmc.emit.predict import render_predict
    from scmc.emit.train import TrainContext, render_train

    ctx = TrainContext(
        package="pkg",
        scmc_version="0",
        template="t.yaml",
        model_inputs=["image", "tabular"],
        model_outputs=["cls", "reg"],
        model_structured=True,
        label="label",
        loss_inputs=["label", "cls", "target", "reg"],
        loss_outputs=["loss"],
        loss_structured=False,
        metric_inputs=[],
        metric_outputs=[],
        metric_structured=False,
        backward_losses=["loss"],
        target="target",
        num_features=4,
        num_targets=2,
    )
    source = render_train(ctx)
    assert "    loss = criterion(\n" in source
    assert 'label=batch.loss_labels, cls=outputs["cls"], target=batch.targets, reg=outputs["reg"]\n' in source
    with pytest.raises(ValueError, match="two model inputs"):
        render_train(replace(ctx, num_features=0))
    with pytest.raises(ValueError, match="there is no data for tabular"):
        render_train(replace(ctx, target=""))
    with pytest.raises(ValueError, match="features input name"):
        render_predict("pkg", "image", 32, [0.5], [0.5], None, 5, features_name="tabular", num_features=0)
