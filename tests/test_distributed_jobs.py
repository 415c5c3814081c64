"""Jobs past one torchrun: a rank killed outright, two torchrun "nodes", elastic restarts.

The same atto package on the digits as tests/test_train.py (its fixtures and helpers), at 32x32
on CPU with gloo. Every job runs in its own process group, bounded in time, and the whole group
is killed in a ``finally``: a failing test leaves no rank behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from scmc_runtime.elastic import ELASTIC_FILE, elastic_resume, note_elastic_run
from scmc_runtime.signals import deferred_signals
from tests import test_train
from tests.train_support import alive, children, kill_tree, python_env

pytest.importorskip("PIL")
pytest.importorskip("sklearn")

# The session's package and unpacked digits, shared with tests/test_train.py.
package = test_train.package
digits_cache = test_train.digits_cache
load, records, assert_same_tensors = test_train.load, test_train.records, test_train.assert_same_tensors

# Two epochs of 4 steps of 2 x 16 images; last.pt after every second update, so mid-epoch too.
ARGS = ["--epochs", "2", "--max-steps", "4", "--save-every", "2", "--max-val-steps", "1"]
JOB_DEADLINE_S = 240  # one short job on a busy 2-core machine, torch imports included
EXIT_DEADLINE_S = 120  # from a kill to the last process gone (torchrun itself waits 30 s before SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(*options: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "torch.distributed.run", *options]


def job(package_dir: Path, out: Path, cache: Path, launch: list[str], *args: str) -> subprocess.Popen:
    """Start ``<launch> -m <pkg>.train`` in a process group of its own (killed as a whole by ``stop``)."""
    command = [
        *launch,
        "-m",
        f"{package_dir.name}.train",
        *test_train.COMMON,
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        *args,
    ]
    return subprocess.Popen(
        command,
        env=python_env(package_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=out.parent,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    """Kill the launcher and every rank below it; a no-op when they are gone already."""
    kill_tree(process, timeout=EXIT_DEADLINE_S)


def finish(process: subprocess.Popen, timeout: float = JOB_DEADLINE_S) -> str:
    """Wait for the job, fail with its output unless it exits 0; returns the output."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        pytest.fail(f"job still running after {timeout:.0f}s")
    assert process.returncode == 0, output
    return output


def ranks_of(launcher_pid: int) -> dict[int, int]:
    """{global rank: pid} of the workers a torchrun agent started (read from their environment)."""
    ranks = {}
    for pid in children(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in values:
            ranks[int(values[b"RANK"])] = pid
    return ranks


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = JOB_DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job exited ({process.returncode}) before {what}:\n{kill_tree(process)}")
        if time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"no {what} within {timeout:.0f}s")
        time.sleep(0.05)


def mlflow_runs(out: Path) -> list:
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(test_train.PACKAGE)
    return client, client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="session")
def standalone(package: Path, digits_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one torchrun, two processes, ARGS without interruption; its run folder."""
    out = tmp_path_factory.mktemp("standalone") / "runs"
    process = job(
        package, out, digits_cache, launcher("--standalone", "--nproc_per_node=2"), *ARGS, "--run-name", "ref"
    )
    try:
        finish(process)
    finally:
        stop(process)
    return out / "ref"


# ---------------------------------------------------------------------------------------------
# A rank killed outright (issue 10)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1], ids=["rank0", "rank1"])
def test_a_rank_killed_outright_fails_the_job_and_its_mlflow_run_without_a_hang(
    package: Path, digits_cache: Path, tmp_path: Path, victim: int
):
    """Rank 1 killed: rank 0 fails in its next collective and ends the run. Rank 0 killed: rank 1 does."""
    out = tmp_path / "runs"
    launch = launcher("--standalone", "--nproc_per_node=2")
    process = job(package, out, digits_cache, launch, "--epochs", "100", "--mlflow", "--run-name", "killed")
    try:
        wait_until(lambda: len(records(out / "killed", "step")) >= 2, process, "two training steps")
        ranks = ranks_of(process.pid)
        assert sorted(ranks) == [0, 1], ranks
        killed_at = time.monotonic()
        os.kill(ranks[victim], signal.SIGKILL)
        output, _ = process.communicate(timeout=EXIT_DEADLINE_S)
        seconds = time.monotonic() - killed_at
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in ranks.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in ranks.values()), "a rank outlived its launcher"
    finally:
        stop(process)

    assert process.returncode != 0, output
    assert seconds < EXIT_DEADLINE_S
    client, runs = mlflow_runs(out)
    [run] = runs
    assert run.info.status in ("FAILED", "KILLED"), output
    assert run.info.end_time is not None


@pytest.mark.slow
def test_sigterm_to_torchrun_itself_saves_and_ends_the_mlflow_run_but_torchrun_exits_1(
    package: Path, digits_cache: Path, tmp_path: Path
):
    """What README and docs/distributed.md tell a scheduler: signal the ranks, not the launcher."""
    out = tmp_path / "runs"
    launch = launcher("--standalone", "--nproc_per_node=2")
    process = job(package, out, digits_cache, launch, "--epochs", "100", "--mlflow", "--run-name", "term")
    try:
        wait_until(lambda: len(records(out / "term", "step")) >= 2, process, "two training steps")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=EXIT_DEADLINE_S)
    finally:
        stop(process)
    # torchrun forwards the signal; the ranks finish the step, save and exit 0 ...
    assert "stopped by a signal" in output
    state = load(out / "term" / "last.pt")
    assert state["world_size"] == 2 and state["step_in_epoch"] >= 2
    client, runs = mlflow_runs(out)
    assert [run.info.status for run in runs] == ["KILLED"]
    # ... but torchrun raises its own SignalException: the exit status a scheduler sees is 1.
    assert process.returncode == 1 and "SignalException" in output


# ---------------------------------------------------------------------------------------------
# Two torchrun "nodes" (issue 15, item 1)


@pytest.mark.slow
def test_two_torchrun_nodes_on_one_host_train_exactly_as_one_torchrun_with_two_processes(
    package: Path, digits_cache: Path, standalone: Path, tmp_path: Path
):
    out = tmp_path / "runs"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    try:
        for node_rank in (0, 1):
            options = ["--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(node_rank)]
            options += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes"]
            nodes.append(job(package, out, digits_cache, launcher(*options), *ARGS, "--run-name", "nodes"))
        outputs = [finish(node) for node in nodes]
    finally:
        for node in nodes:
            stop(node)

    # One run folder, written by the global rank 0 only: one start record, one checkpoint.
    assert sorted(p.name for p in out.iterdir()) == ["nodes"], outputs
    [start] = records(out / "nodes", "start")
    assert (start["world_size"], start["batch_per_rank"]) == (2, 16)
    curve = [(r["step"], r["train_step_ce_loss"]) for r in records(out / "nodes", "step")]
    reference = [(r["step"], r["train_step_ce_loss"]) for r in records(standalone, "step")]
    assert len(curve) == 8 and curve == reference
    final, expected = load(out / "nodes" / "last.pt"), load(standalone / "last.pt")
    for part in ("model", "ema", "backward", "global_step"):
        assert_same_tensors(final[part], expected[part], part)


# ---------------------------------------------------------------------------------------------
# Elastic restarts (issue 15, item 2)


def mid_epoch_checkpoint(run_dir: Path):
    seen = {"mtime": 0}

    def check() -> bool:
        path = run_dir / "last.pt"
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == seen["mtime"]:
            return False
        seen["mtime"] = mtime
        state = load(path)
        return state["epoch"] == 0 and state["step_in_epoch"] > 0

    return check


@pytest.mark.slow
def test_a_rank_killed_under_max_restarts_restarts_the_job_which_resumes_and_ends_bitwise_equal(
    package: Path, digits_cache: Path, standalone: Path, tmp_path: Path
):
    out = tmp_path / "runs"
    launch = launcher("--standalone", "--nproc_per_node=2", "--max-restarts=1")
    # No --run-name and no --resume: the restarted workers find their run by the job id.
    process = job(package, out, digits_cache, launch, *ARGS, "--mlflow")
    try:
        wait_until(lambda: (out / test_train.PACKAGE).is_dir(), process, "the run folder")
        run_dir = out / test_train.PACKAGE
        wait_until(mid_epoch_checkpoint(run_dir), process, "a mid-epoch checkpoint")
        first = ranks_of(process.pid)
        os.kill(first[1], signal.SIGKILL)
        output = finish(process)
    finally:
        stop(process)

    assert sorted(p.name for p in out.iterdir()) == [test_train.PACKAGE, "mlartifacts", "mlflow.db"], output
    starts = records(run_dir, "start")
    assert len(starts) == 2, output  # the first life and the restarted one
    assert starts[1]["resumed_from"] == str(run_dir / "last.pt") and starts[1]["start_step"] > 0
    final, expected = load(run_dir / "last.pt"), load(standalone / "last.pt")
    for part in ("model", "ema", "backward", "epoch", "step_in_epoch", "global_step", "best"):
        assert_same_tensors(final[part], expected[part], part)
    # metrics.jsonl and MLflow hold every step once, in the one MLflow run the first life opened.
    assert [r["step"] for r in records(run_dir, "step")] == list(range(1, 9))
    client, runs = mlflow_runs(out)
    [run] = runs
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_step_ce_loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_ce_loss")] == [4, 8]


def restarted(monkeypatch: pytest.MonkeyPatch, count: int, job: str = "job-1") -> None:
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(count))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)


def test_the_first_life_and_a_plain_run_keep_their_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "last.pt").write_bytes(b"")
    plain = elastic_resume(str(tmp_path), "", "", True)
    assert (plain.run_name, plain.resume, plain.fresh, plain.restarts) == ("", "", True, 0)
    restarted(monkeypatch, 0)
    first = elastic_resume(str(tmp_path), "x", "", False)
    assert (first.run_name, first.resume, first.restarts) == ("x", "", 0)


def test_a_restart_finds_the_folder_its_job_wrote_even_after_fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    restarted(monkeypatch, 0)
    for name, job in (("x", "job-0"), ("x-2", "job-1")):  # another job's run, then this job's (after --fresh)
        (tmp_path / name).mkdir()
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        note_elastic_run(tmp_path / name, f"mlflow-{name}", is_main=True)
    assert (tmp_path / "x-2" / ELASTIC_FILE).is_file()
    restarted(monkeypatch, 1, "job-1")
    again = elastic_resume(str(tmp_path), "x", "", True)
    assert (again.run_name, again.resume, again.fresh, again.mlflow_run_id) == ("x-2", "auto", False, "mlflow-x-2")
    assert again.restarts == 1


def test_a_restart_resumes_the_runs_own_last_pt_rather_than_the_checkpoint_first_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.pt").write_bytes(b"")
    restarted(monkeypatch, 2)
    given = str(tmp_path / "old" / "last.pt")
    assert elastic_resume(str(tmp_path), "new", given).resume == given  # the run wrote no last.pt yet
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "last.pt").write_bytes(b"")
    assert elastic_resume(str(tmp_path), "new", given).resume == str(tmp_path / "new" / "last.pt")
    assert elastic_resume(str(tmp_path), "new", "auto").resume == "auto"


def test_the_default_rendezvous_id_none_marks_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    restarted(monkeypatch, 0, "none")
    note_elastic_run(tmp_path, "mlflow-run", is_main=True)
    restarted(monkeypatch, 0, "job-1")
    note_elastic_run(tmp_path, "mlflow-run", is_main=False)
    assert not (tmp_path / ELASTIC_FILE).exists()
    restarted(monkeypatch, 1, "none")
    assert elastic_resume(str(tmp_path), "", "").run_name == ""


def test_deferred_signals_hold_sigterm_until_the_block_is_done_then_deliver_it_once():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert received == []
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the handler from before is back
    finally:
        signal.signal(signal.SIGTERM, previous)
