"""AugMix splits end to end: a preset's `aug_splits` builds into train.py, trains on real files, resumes bitwise.

The package is the tiny linear model of tests/test_recipe.py built from the structcast-model-style
presets of cfg/ with `aug_splits: 3` and `resplit: true` (and label smoothing off, so its loss is
cfg/losses/cls.yaml's plain cross-entropy); the data an ImageFolder of PNG and JPEG files.
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import import_package
from tests.test_errors import diagnostic_lines
from tests.test_link import build
from tests.test_recipe import (
    ROOT,
    assert_same,
    golden,
    load,
    preset_files,
    records,
    run,
    run_many,
    train_defaults,
)
from tests.train_support import python_env

pytest.importorskip("timm")
pytest.importorskip("PIL")
pytest.importorskip("sklearn")

from scmc_runtime.augmix import split_losses  # noqa: E402
from scmc_runtime.errors import TrainError  # noqa: E402
from scmc_runtime.trainer import Batch  # noqa: E402
from timm.loss import JsdCrossEntropy  # noqa: E402

NAME = "augmix_presets"
AUGMIX = ["--aug-splits", "3", "--auto-augment", "augmix-m3-w3-d1"]


def split_files(images: Path, **changes: str) -> dict[str, str]:
    """The cfg/ presets with `aug_splits: 3`, `resplit: true` and the cross-entropy of cfg/losses/cls.yaml."""
    files = preset_files(images)
    dataset = files["dataset_yaml"]
    for default, value in (("  aug_splits: 0\n", "  aug_splits: 3\n"), ("  resplit: false\n", "  resplit: true\n")):
        assert default in dataset
        dataset = dataset.replace(default, value)
    files["dataset_yaml"] = dataset
    files["loss_yaml"] = (ROOT / "cfg/losses/cls.yaml").read_text()
    return {**files, **changes}


@pytest.fixture(scope="module")
def package(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("augmix")
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = build(
            where,
            monkeypatch,
            "--name",
            NAME,
            *("-p", "image_size=32", "-p", "batch_size=8", "-p", "label_smoothing=0"),
            *("-p", "auto_augment=augmix-m3-w3-d1"),
            **split_files(images),
        )
    assert result.exit_code == 0, result.output
    package = where / NAME
    (where / "out").rename(package)
    return package


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_recipe import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("images"))


def train_module(package: Path):
    import_package(package, package.name)
    return importlib.import_module(f"{package.name}.train")


def test_a_presets_aug_splits_become_train_py_defaults_and_help(package: Path, tmp_path: Path) -> None:
    source = (package / "src" / NAME / "train.py").read_text()
    defaults = train_defaults(source)
    expected = {"aug_splits": 3, "resplit": True, "jsd_alpha": 12.0, "auto_augment": "augmix-m3-w3-d1"}
    assert {k: defaults[k] for k in expected} == expected and defaults["data_pipeline"] == "timm"
    assert 'jsd=JsdWiring(logits=jsd_logits, loss="ce_loss")' in source and 'return outputs["cls"]' in source
    shown = subprocess.run(
        [sys.executable, "-m", f"{NAME}.train", "--help"],
        env=python_env(package),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    shown_flag = text.split("--aug-splits AUG_SPLITS AugMix splits:", 1)[1][:300]
    assert "(0: off, else at least 2) (default: 3)" in shown_flag


def test_the_packages_loss_on_split_logits_is_timms_jsd_cross_entropy(package: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3 * 4, 10, generator=generator) * 2
    labels = torch.randint(0, 10, (4,), generator=generator)
    batch = Batch(torch.zeros(12, 3, 32, 32), labels, labels)
    # cfg/losses/cls.yaml built with label_smoothing=0, then the golden convnextv2_femto (label_smoothing 0.1):
    # torch's CrossEntropyLoss(label_smoothing=s) is the math of timm's LabelSmoothingCrossEntropy(s).
    femto = golden("convnextv2_femto", package.parent / "femto")
    for train, smoothing in ((train_module(package), 0.0), (train_module(femto), 0.1)):
        losses, _, clean, term = split_losses(
            train.compute_losses,
            train.Loss(),
            {"cls": logits},
            batch,
            jsd=train.make_trainer(train.TrainConfig()).jsd,
            num_splits=3,
            alpha=12.0,
        )
        expected = JsdCrossEntropy(num_splits=3, alpha=12, smoothing=smoothing)(logits, labels.repeat(3))
        assert abs(float(losses["ce_loss"]) - float(expected)) < 1e-6 and clean.images.shape[0] == 4


def test_a_short_augmix_run_trains_on_image_files_through_both_collates(
    package: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    args = [*AUGMIX, "--data", str(images), "--epochs", "1", "--max-steps", "3", "--device", "cpu"]
    # the preset's prefetcher path (uint8, fast_collate, erasing on the device), then float batches in 2 workers
    for name, extra in (("uint8", ["--workers", "0"]), ("float", ["--no-use-prefetcher", "--workers", "2"])):
        trained = run(package, out, *args, *extra, "--run-name", name)
        assert trained.returncode == 0, trained.stderr
        epoch = [r for r in records(out / name) if r["event"] == "epoch"][-1]
        assert math.isfinite(epoch["train_ce_loss"]) and math.isfinite(epoch["val_ce_loss"])
        assert epoch["train_jsd_consistency"] > 0 and "val_jsd_consistency" not in epoch
        assert [r["steps_per_epoch"] for r in records(out / name) if r["event"] == "start"] == [3]


def test_an_augmix_run_stopped_mid_epoch_resumes_bitwise(
    package: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    train = train_module(package)
    common = dict(
        data=str(images),
        epochs=2,
        max_steps=3,
        workers=0,
        threads=1,
        max_val_steps=1,
        ci=True,
        mlflow=False,
        device="cpu",
        out=str(tmp_path / "runs"),
        reprob=0.5,
    )
    straight = train.make_trainer(train.TrainConfig(run_name="straight", **common)).fit()
    assert straight.global_step == 6 and not straight.stopped

    # SIGTERM during the fifth training step: the step finishes, last.pt is saved, the run stops.
    calls = {"train": 0}
    plain = train.forward

    def forward(model: torch.nn.Module, batch: Batch):
        if model.training:
            calls["train"] += 1
            assert batch.images.shape[0] == 3 * len(batch)  # split-major: clean + 2 augmented views
            if calls["train"] == 5:
                os.kill(os.getpid(), signal.SIGTERM)
        return plain(model, batch)

    monkeypatch.setattr(train, "forward", forward)
    stopped = train.make_trainer(train.TrainConfig(run_name="stopped", **common)).fit()
    assert stopped.stopped and stopped.global_step == 5
    assert load(stopped.run_dir / "last.pt")["step_in_epoch"] == 2
    monkeypatch.setattr(train, "forward", plain)
    # Another split count or JSD weight would continue another run: refused, the checkpoint untouched.
    before = (stopped.run_dir / "last.pt").read_bytes()
    for changed, flag in ((dict(aug_splits=2), "--aug-splits 3"), (dict(jsd_alpha=6.0), "--jsd-alpha 12.0")):
        with pytest.raises(TrainError, match=f"trained with {flag}, not"):
            train.make_trainer(train.TrainConfig(run_name="stopped", resume="auto", **common, **changed)).fit()
    assert (stopped.run_dir / "last.pt").read_bytes() == before
    resumed = train.make_trainer(train.TrainConfig(run_name="stopped", resume="auto", **common)).fit()
    assert resumed.global_step == 6
    one, two = load(straight.run_dir / "last.pt"), load(resumed.run_dir / "last.pt")
    for part in ("model", "ema", "backward", "epoch", "step_in_epoch", "global_step", "best"):
        assert_same(one[part], two[part], part)
    epochs = [r for r in records(straight.run_dir) if r["event"] == "epoch"]
    assert len(epochs) == 2 and all(math.isfinite(r["train_ce_loss"]) for r in epochs)


def test_aug_splits_that_cannot_work_are_refused_at_start_up(package: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    common = ["--out", str(out), "--data", str(images), "--image-size", "32", "--no-mlflow", "--device", "cpu"]
    table = golden("tabularfusion", tmp_path)
    mixed, one, basic = run_many(
        package,
        [
            [*common, "--mixup", "0.8"],
            [*common, "--aug-splits", "1"],
            [*common, "--data-pipeline", "basic", "--mixup", "0", "--label-smoothing", "0"],
        ],
        tmp_path,
    )
    assert mixed["code"] == 2 and "Traceback" not in mixed["stderr"]
    assert "--aug-splits 3: cannot be combined with --mixup / --cutmix" in mixed["stderr"]
    assert one["code"] == 2 and "--aug-splits 1: 0 (off) or at least 2" in one["stderr"]
    assert basic["code"] == 2 and "--aug-splits, --resplit: timm's recipe flags need --data-pipeline timm" in (
        basic["stderr"]
    )
    (tabular,) = run_many(table, [[*common, "--aug-splits", "2"]], tmp_path)
    assert tabular["code"] == 2 and "--aug-splits 2: an image-table package has no AugMix splits" in tabular["stderr"]
    assert not out.exists()


TWO_HEADS = """\
PARAMETERS:
  DEFAULT: {num_classes: 10}
INPUTS: [image]
OUTPUTS: [cls, aux]
STRUCTURED_OUTPUT: true
INPUT_SHAPES:
  image: [3, 32, 32]
PACKAGE:
  LOSS: loss.yaml
  BACKWARD: backward.yaml
  DATASET: dataset.yaml
FLOW:
  - [image, x, flatten, [_obj_, {_addr_: torch.nn.Flatten}, _call_]]
  - _jinja_yaml_: |-
      - [x, cls, head, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ num_classes }}}}]]
      - [x, aux, aux_head, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ num_classes }}}}]]
"""
TWO_HEAD_LOSS = """\
FLOW:
  - [{target: label, input: cls}, main, ce, [_obj_, {_addr_: torch.nn.CrossEntropyLoss}, _call_]]
  - [{target: label, input: aux}, side, aux_ce, [_obj_, {_addr_: torch.nn.CrossEntropyLoss}, _call_]]
  - ["eval: main + side", ce_loss]
"""


def test_aug_splits_in_a_preset_that_cannot_work_are_located_diagnostics(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    files = split_files(images)
    files["dataset_yaml"] = files["dataset_yaml"].replace("  aug_splits: 3\n", "  aug_splits: 1\n")
    result = build(tmp_path / "a", monkeypatch, **files)
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "dataset.yaml:24:1: error[E1203]: `aug_splits`: Value error, 1 split is the clean images alone; give 0 (off) "
        "or at least 2 (clean + augmented) (in the output of this Jinja block)"
    ]
    result = build(tmp_path / "b", monkeypatch, "-p", "mixup=0.8", **split_files(images))
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "dataset.yaml:24:1: error[E1223]: `aug_splits: 3` cannot be combined with `mixup`: the JSD loss compares the "
        "views of one image, mixing pairs different images (timm refuses it too) (in the output of this Jinja block)"
    ]
    files = split_files(images, model_yaml=TWO_HEADS, loss_yaml=TWO_HEAD_LOSS)
    result = build(tmp_path / "c", monkeypatch, **files)
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "dataset.yaml:24:1: error[E1223]: `aug_splits: 3`: the JSD consistency term needs the model's classification "
        "logits, but the loss compares the labels (`label`) with several model outputs (`cls`, `aux`) (in the output "
        "of this Jinja block)"
    ]
