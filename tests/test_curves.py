"""The picture of a run: curves.png in the run folder and in MLflow, drawn from metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from scmc_runtime.curves import CURVES_FILE, FIGURE_PIXELS, RunCurves, plot_run, read_series
from tests.tune_support import mlflow_run, tuned_run

pytest.importorskip("matplotlib")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header, after checking the signature and the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def test_a_run_writes_a_valid_curves_png_of_the_expected_size_and_logs_it_to_mlflow(tmp_path_factory) -> None:
    run = tuned_run(tmp_path_factory)
    picture = run.run_dir / CURVES_FILE
    assert png_size(picture) == FIGURE_PIXELS
    from matplotlib.image import imread

    pixels = imread(picture)  # decodes the whole image
    assert pixels.shape[:2] == (FIGURE_PIXELS[1], FIGURE_PIXELS[0]) and pixels.std() > 0.01  # not blank
    client, found = mlflow_run(run)
    assert CURVES_FILE in {a.path for a in client.list_artifacts(found.info.run_id)}
    logged = Path(client.download_artifacts(found.info.run_id, CURVES_FILE, str(tmp_path_factory.mktemp("dl"))))
    assert logged.read_bytes() == picture.read_bytes()  # the end-of-run picture replaced the epoch ones
    assert not [p for p in run.run_dir.iterdir() if p.name.startswith(".curves-")]  # no temporary left


def test_series_come_from_step_and_epoch_records_and_broken_lines_are_skipped(tmp_path: Path) -> None:
    lines = [
        {"event": "start", "world_size": 1},
        {"event": "step", "epoch": 1, "step": 1, "train_step_loss": 2.0, "lr_opt/0": 0.1, "grad_norm": 3.0},
        {"event": "step", "epoch": 1, "step": 2, "train_step_loss": 1.5, "lr_opt/0": 0.2},
        {"event": "epoch", "epoch": 1, "step": 2, "train_loss": 1.7, "val_loss": 1.6, "ema_val_loss": 1.8},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"event": "step", "ste'  # a killed writer
    (tmp_path / "metrics.jsonl").write_text(text)
    series = read_series(tmp_path / "metrics.jsonl")
    assert series["train_step_loss"] == ([1, 2], [2.0, 1.5]) and series["lr_opt/0"] == ([1, 2], [0.1, 0.2])
    assert series["val_loss"] == ([2], [1.6]) and series["ema_val_loss"] == ([2], [1.8])
    assert "world_size" not in series and "epoch" not in series
    path = plot_run(tmp_path, losses=["loss"], metrics=[])
    assert path == tmp_path / CURVES_FILE and png_size(path) == FIGURE_PIXELS


def test_without_matplotlib_training_goes_on_with_one_warning(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    warnings: list[str] = []
    curves = RunCurves(tmp_path, losses=["loss"], metrics=[], title="t", enabled=True, warn=warnings.append)
    assert curves.draw() is None and curves.draw() is None
    assert warnings == [
        "no run curves (curves.png): matplotlib is not installed; pip install matplotlib (or install the "
        "package with its [plot] extra, which brings scmc-runtime[plot])"
    ]
    assert not (tmp_path / CURVES_FILE).exists()
