"""torchrun's elastic restarts: a restarted worker continues the run its first life started.

Under ``torchrun --max-restarts=K`` a failed worker (a rank killed, out of memory, a lost
node) makes torchrun stop every worker of the job and start them all again, with
``TORCHELASTIC_RESTART_COUNT`` counting the restarts and ``TORCHELASTIC_RUN_ID`` (the
rendezvous id, ``--rdzv-id``; a fresh id per ``--standalone`` launch) the same in every life.
The restarted workers run the same command line, so the flags alone would start a second run
(or refuse the folder the first life wrote). :func:`elastic_resume` turns them into a resume:

- no ``--resume``: ``--resume auto`` semantics (a flag given explicitly is kept);
- ``--resume PATH``: the run folder's own ``last.pt`` once the first life wrote one (newer);
- the run folder is the one the first life chose (with or without ``--run-name``, after
  ``--fresh``), found by the job id it wrote into ``<run>/elastic.json``
  (:func:`note_elastic_run`) together with the MLflow run it opened, so a job killed before
  its first checkpoint restarts in the same folder and the same MLflow run; ``--fresh`` is
  for the first life only.

Outside torchrun, or in the first life, both functions change nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["ElasticRun", "restart_count", "job_id", "elastic_resume", "note_elastic_run", "ELASTIC_FILE"]

ELASTIC_FILE = "elastic.json"  # in a run folder started under torchrun: {"job": ..., "mlflow_run_id": ...}


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (0 outside torchrun and in the first life)."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def job_id() -> Optional[str]:
    """The rendezvous id, the same in every life of a job; None outside torchrun or for the default "none"."""
    value = os.environ.get("TORCHELASTIC_RUN_ID", "").strip()
    return value if value and value != "none" else None


@dataclass(frozen=True)
class ElasticRun:
    """The ``--run-name`` and ``--resume`` a (re)started worker uses, and the MLflow run to continue."""

    run_name: str
    resume: str
    fresh: bool = False
    restarts: int = 0
    mlflow_run_id: Optional[str] = None


def _marked_folder(out: Path, job: str) -> Optional[Path]:
    """The run folder in ``out`` whose elastic.json names ``job`` (the newest, should there be several)."""
    if not out.is_dir():
        return None
    found = []
    for marker in out.glob(f"*/{ELASTIC_FILE}"):
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("job") == job:
            found.append((marker.stat().st_mtime_ns, marker.parent))
    return max(found)[1] if found else None


def _mlflow_run_of(folder: Path) -> Optional[str]:
    try:
        value = json.loads((folder / ELASTIC_FILE).read_text(encoding="utf-8")).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def elastic_resume(out: str, run_name: str, resume: str, fresh: bool = False) -> ElasticRun:
    """The run folder name and ``--resume``/``--fresh`` for this life of the job (see the module docstring)."""
    restarts = restart_count()
    if restarts == 0:
        return ElasticRun(run_name, resume, fresh)
    job = job_id()
    marked = _marked_folder(Path(out), job) if job is not None else None
    if marked is not None:
        run_name, fresh = marked.name, False
    elif fresh:
        return ElasticRun(run_name, resume, fresh, restarts)  # the first life died before it wrote anything
    folder = Path(out) / run_name if run_name else None
    if not resume:
        resume = "auto"
    elif resume != "auto":
        own = (folder if folder is not None else Path(resume).parent) / "last.pt"
        if own.is_file() and own.resolve() != Path(resume).resolve():
            resume = str(own)  # written by an earlier life of this job: newer than the one first given
    mlflow_run_id = _mlflow_run_of(marked) if marked is not None else None  # this job's run, no other
    return ElasticRun(run_name, resume, fresh, restarts, mlflow_run_id)


def note_elastic_run(run_dir: Path, mlflow_run_id: Optional[str], *, is_main: bool) -> None:
    """Rank 0: write ``<run>/elastic.json`` (job id and MLflow run) so that a restart finds this run.

    A no-op outside torchrun, for the default job id "none", and on other ranks. Written
    atomically (temporary file, then rename).
    """
    job = job_id()
    if not is_main or job is None:
        return
    path = Path(run_dir) / ELASTIC_FILE
    tmp = path.with_name(f".{ELASTIC_FILE}.tmp")
    tmp.write_text(json.dumps({"job": job, "mlflow_run_id": mlflow_run_id}) + "\n", encoding="utf-8")
    os.replace(tmp, path)
