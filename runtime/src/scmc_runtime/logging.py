"""What a run reports: a progress bar or log lines, a metrics.jsonl file, and MLflow.

Everything here is silent on ranks other than 0. tqdm and mlflow are optional and imported
only when used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, TextIO, Union

from scmc_runtime._optional import require

__all__ = ["get_logger", "Progress", "MetricsFile", "MlflowLogger"]

PathLike = Union[str, "os.PathLike[str]"]


def get_logger(name: str = "scmc", is_main: bool = True) -> logging.Logger:
    """A logger printing ``time message`` lines to stdout on rank 0, and only warnings elsewhere."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    return logger


def _as_float(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


def _format(metrics: Mapping[str, Any]) -> str:
    return " ".join(f"{name}={_as_float(value):.4g}" for name, value in metrics.items())


class Progress:
    """Progress over ``total`` steps: a tqdm bar on an interactive terminal, log lines otherwise.

    ``step(metrics)`` takes the latest values as tensors or floats; they are converted (which
    synchronizes with the GPU) only when shown, every ``log_every`` steps. No output at all
    when ``enabled`` is False (ranks other than 0). ``ci=True`` forces plain lines.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool = True,
        ci: bool = False,
        log_every: int = 50,
        stream: Optional[TextIO] = None,
    ) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.stream = stream if stream is not None else sys.stdout
        self.count = 0
        self._start = time.monotonic()
        self._bar: Any = None
        if enabled and not ci and _is_tty(self.stream):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True)

    def step(self, metrics: Optional[Mapping[str, Any]] = None, n: int = 1) -> None:
        if not self.enabled:
            return
        self.count += n
        due = self.count % self.log_every < n or self.count >= self.total
        if self._bar is not None:
            self._bar.update(n)
            if due and metrics:
                self._bar.set_postfix_str(_format(metrics), refresh=False)
        elif due:
            rate = self.count / max(time.monotonic() - self._start, 1e-9)
            width = len(str(self.total))
            line = f"{self.desc} {self.count:>{width}}/{self.total} ({rate:.1f} it/s)"
            if metrics:
                line += " " + _format(metrics)
            print(line.strip(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _json_value(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity; keep the file parseable by strict readers
    return value


class MetricsFile:
    """Appends one JSON object per line to ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: PathLike, enabled: bool = True, name: str = "metrics.jsonl") -> None:
        self.path = Path(run_dir) / name
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, step: int) -> None:
        """Remove the records of steps after ``step`` (a resumed run trains them again); atomic rewrite.

        Records without a ``step`` (start/end events) are kept. A no-op when disabled or absent.
        """
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({key: _json_value(value) for key, value in record.items()}, sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def _flatten(params: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    flat: Dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class MlflowLogger:
    """MLflow tracking for rank 0; a no-op when disabled or on other ranks.

    By default everything stays inside the run directory: the tracking store is
    ``sqlite:///<run_dir>/mlflow.db`` and artifacts go to ``<run_dir>/mlartifacts``.
    ``run_id`` continues an existing MLflow run (a resumed training) when the store has it;
    otherwise a new run is created.

    Under DDP, :meth:`share_run` tells every rank which run rank 0 opened, so that when rank 0
    is killed outright (SIGKILL, out of memory) a surviving rank, failing in its next
    collective, ends the run as FAILED instead of leaving it RUNNING.
    """

    def __init__(
        self,
        run_dir: PathLike,
        *,
        experiment: str = "scmc",
        run_name: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        enabled: bool = True,
        run_id: Optional[str] = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir).resolve()
        self.tracking_uri = tracking_uri or f"sqlite:///{self.run_dir / 'mlflow.db'}"
        self.run_id: Optional[str] = None
        self.resumed = False  # True when run_id named a run that this logger continues
        self.recorded_through = -1  # a resumed run skips the steps its first life already recorded
        self._client: Any = None
        self._shared: Optional[tuple] = None  # (run id, tracking URI) of rank 0's run, on the other ranks
        if not enabled:
            return
        tracking = require("mlflow.tracking", "MlflowLogger", "train")

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._client = tracking.MlflowClient(tracking_uri=self.tracking_uri)
        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifacts = (self.run_dir / "mlartifacts").as_uri()
            experiment_id = self._client.create_experiment(experiment, artifact_location=artifacts)
        if run_id is not None and self._has_run(run_id):
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.resumed = True
            self.recorded_through = self._last_step()
        else:
            self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id

    def _has_run(self, run_id: str) -> bool:
        try:
            return self._client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # mlflow raises MlflowException for unknown ids
            return False

    def _last_step(self) -> int:
        run = self._client.get_run(self.run_id)
        steps = [-1]
        for key in run.data.metrics:
            steps.extend(m.step for m in self._client.get_metric_history(self.run_id, key))
        return max(steps)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            from mlflow.entities import Param

            flat = _flatten(params)
            self._client.log_batch(self.run_id, params=[Param(key, value) for key, value in flat.items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.enabled:
            from mlflow.entities import Metric

            if step <= self.recorded_through:
                return  # recorded before the run was killed and resumed: one value per step and key
            now = int(time.time() * 1000)
            batch = [Metric(key, _as_float(value), now, step) for key, value in metrics.items()]
            self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: PathLike) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path))

    def share_run(self) -> None:
        """Every rank learns rank 0's run id and tracking URI (one broadcast; every rank must call it).

        A no-op single-process. The other ranks only keep the two strings: they open the store
        only if :meth:`close` is called with FAILED, to end a run that rank 0 cannot end itself.
        """
        from scmc_runtime.distributed import is_distributed

        if not is_distributed():
            return
        import torch.distributed as torch_dist

        box = [(self.run_id, self.tracking_uri) if self.enabled and self.run_id is not None else None]
        torch_dist.broadcast_object_list(box, src=0)
        if not self.enabled and box[0] is not None:
            self._shared = tuple(box[0])

    def _end_shared_run(self, status: str) -> None:
        """On a rank other than 0: end rank 0's run with ``status`` if it is still RUNNING (best effort)."""
        assert self._shared is not None  # the caller checked
        run_id, uri = self._shared
        self._shared = None
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
            return  # the store is on another node's file system: nothing to open here
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status=status)
        except Exception:  # the run's fate is reported by rank 0 where it can; this rank is failing anyway
            pass

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status``; on another rank after :meth:`share_run`, FAILED also ends rank 0's run.

        SIGTERM and SIGINT wait until the status is written: torchrun signals the ranks of a
        failing job, and the run must not stay RUNNING because the signal came first.
        """
        from scmc_runtime.signals import deferred_signals

        if self.enabled and self.run_id is not None:
            with deferred_signals():
                self._client.set_terminated(self.run_id, status=status)
            self.run_id = None
        elif self._shared is not None and status == "FAILED":
            with deferred_signals():
                self._end_shared_run(status)

    def __enter__(self) -> "MlflowLogger":
        return self

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")
