"""Progress output, metrics.jsonl and MLflow logging, all silent off rank 0."""

import io
import json
import math

import pytest
import torch

from scmc_runtime.logging import MetricsFile, MlflowLogger, Progress, get_logger


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_ci_mode_prints_plain_lines_every_n_steps_with_metrics():
    stream = io.StringIO()
    with Progress(5, "epoch 1", ci=True, log_every=2, stream=stream) as progress:
        for step in range(5):
            progress.step({"loss": torch.tensor(0.5 + step)})
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["epoch 1 2/5", "epoch 1 4/5", "epoch 1 5/5"]
    assert lines[-1].endswith("loss=4.5")


def test_a_terminal_gets_a_tqdm_bar_unless_in_ci_mode():
    pytest.importorskip("tqdm")
    terminal = _Terminal()
    with Progress(3, "train", stream=terminal) as bar:
        assert bar._bar is not None
        for _ in range(3):
            bar.step({"loss": 1.0})
    assert "3/3" in terminal.getvalue()
    with Progress(3, "train", ci=True, stream=_Terminal()) as plain:
        assert plain._bar is None


def test_a_disabled_progress_prints_nothing():
    stream = _Terminal()
    with Progress(3, "train", enabled=False, log_every=1, stream=stream) as progress:
        progress.step({"loss": 1.0})
    assert stream.getvalue() == ""


def test_get_logger_is_quiet_off_rank_zero():
    assert get_logger("scmc.test", is_main=True).isEnabledFor(20)
    assert not get_logger("scmc.test", is_main=False).isEnabledFor(20)


def test_metrics_file_appends_one_json_object_per_line(tmp_path):
    metrics = MetricsFile(tmp_path / "runs" / "digits")
    metrics.write({"epoch": 0, "loss": torch.tensor(0.25)})
    metrics.write({"epoch": 1, "loss": 0.125, "val_top1": float("nan")})
    lines = (tmp_path / "runs" / "digits" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"epoch": 0, "loss": 0.25},
        {"epoch": 1, "loss": 0.125, "val_top1": "nan"},
    ]


def test_a_disabled_metrics_file_writes_nothing(tmp_path):
    MetricsFile(tmp_path / "run", enabled=False).write({"epoch": 0})
    assert not (tmp_path / "run").exists()


def test_disabled_mlflow_logger_is_a_no_op(tmp_path):
    with MlflowLogger(tmp_path / "run", enabled=False) as logger:
        logger.log_params({"lr": 0.1})
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.log_artifact(tmp_path / "missing.txt")
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside mlflow's sqlalchemy store
def test_mlflow_logger_records_params_metrics_and_artifacts_in_the_run_directory(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "digits"
    artifact = tmp_path / "model_card.md"
    artifact.write_text("# card\n")
    with MlflowLogger(run_dir, experiment="test", run_name="digits") as logger:
        logger.log_params({"lr": 0.1, "model": {"depth": 2}})
        logger.log_metrics({"loss": torch.tensor(0.5)}, step=1)
        logger.log_metrics({"loss": 0.25}, step=2)
        logger.log_artifact(artifact)
        run_id = logger.run_id
    assert logger.tracking_uri == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=logger.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "model.depth": "2"}
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    assert run.info.status == "FINISHED" and run.info.run_name == "digits"
    assert [a.path for a in client.list_artifacts(run_id)] == ["model_card.md"]
    assert (run_dir / "mlartifacts").is_dir()


def test_a_resumed_run_drops_the_records_of_the_steps_it_trains_again(tmp_path):
    metrics = MetricsFile(tmp_path)
    metrics.write({"event": "start"})
    for step in (1, 2, 3, 4):
        metrics.write({"event": "step", "step": step, "loss": 1.0 / step})
    (tmp_path / "metrics.jsonl").open("a").write('{"event": "step", "st')  # cut short by a kill
    metrics.drop_after(2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"event": "start"},
        {"event": "step", "step": 1, "loss": 1.0},
        {"event": "step", "step": 2, "loss": 0.5},
    ]


def test_a_resumed_mlflow_run_records_each_step_once(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    first = MlflowLogger(tmp_path, experiment="test", run_name="r")
    for step in (1, 2, 3):
        first.log_metrics({"train_step_loss": 1.0 / step}, step=step)
    run_id = first.run_id  # killed here: never closed
    again = MlflowLogger(tmp_path, experiment="test", run_name="r", run_id=run_id)
    assert again.resumed and again.recorded_through == 3
    for step in (2, 3, 4):  # the checkpoint was at step 1
        again.log_metrics({"train_step_loss": 1.0 / step}, step=step)
    again.close("FINISHED")
    history = MlflowClient(tracking_uri=again.tracking_uri).get_metric_history(run_id, "train_step_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
