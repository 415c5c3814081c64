"""The helpers under a generated train.py: flags from a dataclass, run folders, data, evaluation."""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn

from scmc_runtime.checkpoint import save_checkpoint
from scmc_runtime.distributed import DistInfo
from scmc_runtime.train import (
    TrainError,
    UsageError,
    build_datasets,
    config_parser,
    evaluate,
    flag,
    format_metrics,
    has_batchnorm,
    parse_config,
    resolve_run,
)

DIST = DistInfo(0, 0, 1, torch.device("cpu"), None, True)


@dataclass
class Config:
    epochs: int = flag(6, "passes over the data")
    lr_scale: float = flag(1.0, "scale")
    ema: bool = flag(True, "keep an EMA")
    ci: bool = flag(False, "plain lines")
    mean: tuple[float, ...] = flag((0.5, 0.5, 0.5), "mean")
    run_name: str = flag("", "run folder")
    limit: Optional[int] = flag(None, "optional limit")


def test_every_dataclass_field_becomes_a_flag_with_its_help_and_default():
    text = config_parser(Config).format_help()
    for flag_name in ("--epochs", "--lr-scale", "--ema", "--no-ema", "--ci", "--no-ci", "--mean", "--run-name"):
        assert flag_name in text
    assert "passes over the data (default: 6)" in " ".join(text.split())


def test_flags_parse_into_the_dataclass_with_its_types():
    assert parse_config(Config, []) == Config()
    cfg = parse_config(
        Config,
        [
            "--epochs",
            "2",
            "--no-ema",
            "--ci",
            "--mean",
            "0.1",
            "0.2",
            "0.3",
            "--lr-scale",
            "0.5",
            "--run-name",
            "x",
            "--limit",
            "none",
        ],
    )
    assert cfg == Config(epochs=2, lr_scale=0.5, ema=False, ci=True, mean=(0.1, 0.2, 0.3), run_name="x", limit=None)
    assert parse_config(Config, ["--limit", "3"]).limit == 3


def test_a_bad_flag_value_is_a_usage_error():
    with pytest.raises(SystemExit):
        parse_config(Config, ["--epochs", "two"])


def test_new_runs_are_named_after_the_package_and_numbered(tmp_path):
    first, none = resolve_run(DIST, out=str(tmp_path), run_name="", package="pkg", resume="")
    assert (first, none) == (tmp_path / "pkg", None)
    # An empty folder (a run that failed before writing anything) is reused.
    assert resolve_run(DIST, out=str(tmp_path), run_name="", package="pkg", resume="")[0] == first
    (first / "metrics.jsonl").write_text("{}\n")
    second, _ = resolve_run(DIST, out=str(tmp_path), run_name="", package="pkg", resume="")
    assert second == tmp_path / "pkg-2" and second.is_dir()


def test_a_named_run_with_a_checkpoint_is_not_overwritten_without_resume(tmp_path):
    save_checkpoint(tmp_path / "exp" / "last.pt", {"epoch": 1})
    with pytest.raises(TrainError) as caught:
        resolve_run(DIST, out=str(tmp_path), run_name="exp", package="pkg", resume="")
    assert str(caught.value) == (
        f"{tmp_path / 'exp'} already holds a run (last.pt); pass --resume auto to continue it, --fresh to start a "
        "new run next to it, or choose another --run-name"
    )
    assert resolve_run(DIST, out=str(tmp_path), run_name="exp", package="pkg", resume="auto") == (
        tmp_path / "exp",
        tmp_path / "exp" / "last.pt",
    )


def test_resume_auto_continues_the_newest_run_of_the_package(tmp_path):
    import os

    save_checkpoint(tmp_path / "pkg" / "last.pt", {"epoch": 1})
    save_checkpoint(tmp_path / "pkg-2" / "last.pt", {"epoch": 2})
    save_checkpoint(tmp_path / "other" / "last.pt", {"epoch": 3})
    os.utime(tmp_path / "pkg" / "last.pt", ns=(1, 1))
    assert resolve_run(DIST, out=str(tmp_path), run_name="", package="pkg", resume="auto") == (
        tmp_path / "pkg-2",
        tmp_path / "pkg-2" / "last.pt",
    )


def test_resume_from_a_path_continues_in_its_folder(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "last.pt", {"epoch": 1})
    assert resolve_run(DIST, out=str(tmp_path), run_name="", package="pkg", resume=str(path)) == (path.parent, path)
    with pytest.raises(UsageError, match="no such checkpoint file"):
        resolve_run(DIST, out=str(tmp_path), run_name="", package="pkg", resume=str(tmp_path / "missing.pt"))


def test_the_default_data_is_the_digits_as_an_image_folder(tmp_path):
    pytest.importorskip("PIL")
    pytest.importorskip("sklearn")
    train, val, classes = build_datasets(DIST, cache_dir=str(tmp_path), image_size=16, translate=2)
    assert classes == [str(i) for i in range(10)]
    assert len(train) + len(val) == 1797
    image, label = train[0]
    assert image.shape == (3, 16, 16) and 0 <= label < 10


def test_an_image_folder_without_a_val_split_is_refused(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(TrainError) as caught:
        build_datasets(DIST, data=str(tmp_path))
    assert str(caught.value) == (
        f"--data {tmp_path}: no val/ folder; it must hold train/ and val/ (or validation/), each with one "
        "sub-folder of images per class (ImageFolder layout)"
    )


def test_evaluate_weights_batches_by_size_and_restores_training_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model.train()
    batches = [
        (torch.ones(3, 4), torch.zeros(3, dtype=torch.long)),
        (torch.ones(1, 4), torch.ones(1, dtype=torch.long)),
    ]
    seen_modes = []

    def score(outputs, labels):
        seen_modes.append(model.training)
        return {"label_mean": labels.float().mean()}

    result = evaluate(model, batches, score, device=torch.device("cpu"))
    assert result == {"label_mean": pytest.approx(0.25)}
    assert seen_modes == [False, False] and model.training
    assert evaluate(model, batches, score, device=torch.device("cpu"), max_steps=1) == {"label_mean": 0.0}


def test_has_batchnorm_finds_nested_batch_norms():
    assert has_batchnorm(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sequential(nn.BatchNorm2d(1))))
    assert not has_batchnorm(nn.Sequential(nn.Conv2d(1, 1, 1), nn.LayerNorm(1)))


def test_format_metrics_rounds_floats_only():
    assert format_metrics({"epoch": 3, "val_acc1": 0.972222, "name": "x"}) == "epoch=3 val_acc1=0.9722 name=x"


def test_a_broken_last_pt_is_returned_for_resume_and_never_skipped(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "last.pt").write_bytes(b"PK\x03\x04 cut")
    save_checkpoint(tmp_path / "exp" / "best.pt", {"epoch": 1})
    assert resolve_run(DIST, out=str(tmp_path), run_name="exp", package="pkg", resume="auto") == (
        tmp_path / "exp",
        tmp_path / "exp" / "last.pt",
    )
    with pytest.raises(TrainError, match=r"already holds a run \(best.pt, last.pt\)"):
        resolve_run(DIST, out=str(tmp_path), run_name="exp", package="pkg", resume="")
    fresh = resolve_run(DIST, out=str(tmp_path), run_name="exp", package="pkg", resume="", fresh=True)
    assert fresh == (tmp_path / "exp-2", None)


def test_a_run_folder_with_best_pt_but_no_last_pt_is_not_resumed_from_scratch(tmp_path):
    save_checkpoint(tmp_path / "exp" / "best.pt", {"epoch": 1})
    with pytest.raises(TrainError) as caught:
        resolve_run(DIST, out=str(tmp_path), run_name="exp", package="pkg", resume="auto")
    assert str(caught.value) == (
        f"{tmp_path / 'exp'} holds best.pt but no last.pt to resume; pass --fresh to start a new run in a new "
        "folder next to it (nothing is overwritten), or pass --resume with one of them"
    )


def test_resume_auto_finds_the_newest_run_of_the_package_whatever_its_folder_name(tmp_path):
    import os

    for name, package in (("pkg", "pkg"), ("renamed", "pkg"), ("theirs", "other")):
        resolve_run(DIST, out=str(tmp_path), run_name=name, package=package, resume="")
        save_checkpoint(tmp_path / name / "last.pt", {"epoch": 1})
    os.utime(tmp_path / "pkg" / "last.pt", ns=(1, 1))
    assert resolve_run(DIST, out=str(tmp_path), run_name="", package="pkg", resume="auto") == (
        tmp_path / "renamed",
        tmp_path / "renamed" / "last.pt",
    )
    assert (tmp_path / "renamed" / "run.json").read_text() == '{"package": "pkg"}\n'


def test_help_shows_each_default_once():
    @dataclass
    class Named:
        experiment: str = flag("pkg", "MLflow experiment (default: the package name)")

    text = " ".join(config_parser(Named).format_help().split())
    assert "MLflow experiment (default: the package name)" in text and "(default: pkg)" not in text
