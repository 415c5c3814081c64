"""Run folders: where a run writes, which checkpoint it resumes, and that checkpoint checked.

Decided on rank 0 and shared with every rank (:func:`resolve_run`); nothing is overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as torch_dist

from scmc_runtime.checkpoint import RESUME_KEYS, CheckpointError, check_checkpoint, load_checkpoint
from scmc_runtime.config import _flag, _shown
from scmc_runtime.distributed import DistInfo, is_distributed
from scmc_runtime.errors import TrainError, UsageError, note_run_dir

__all__ = ["broadcast_object", "resolve_run", "start_run", "load_resume_state", "RUN_FILE", "FRESH_HINT"]


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (itself when single-process)."""
    if not is_distributed():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


RUN_FILE = "run.json"  # written into every run folder: which package the run trains
FRESH_HINT = "pass --fresh to start a new run in a new folder next to it (nothing is overwritten)"


def _checkpoints_in(folder: Path) -> List[Path]:
    """Checkpoint files in a run folder, complete or not (temporary files of interrupted writes aside)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.pt") if p.is_file() and not p.name.startswith("."))


def _package_of(folder: Path) -> Optional[str]:
    try:
        value = json.loads((folder / RUN_FILE).read_text(encoding="utf-8")).get("package")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _runs_of(out: Path, package: str) -> List[Path]:
    """Run folders of ``package`` in ``out``: those whose run.json names it (or, without one, named after it)."""
    if not out.is_dir():
        return []
    runs = []
    for folder in out.iterdir():
        if not folder.is_dir():
            continue
        owner = _package_of(folder)
        if owner == package or (owner is None and (folder.name == package or folder.name.startswith(package + "-"))):
            runs.append(folder)
    return runs


def _free_folder(out: Path, base: str) -> Path:
    """``out/base``, else ``base-2``, ``base-3``, ...: the first that does not exist or holds nothing but run.json."""
    name, index = base, 1
    while not _reusable(out / name):
        index += 1
        name = f"{base}-{index}"
    return out / name


def _reusable(folder: Path) -> bool:
    if not folder.exists():
        return True
    return folder.is_dir() and all(entry.name == RUN_FILE for entry in folder.iterdir())


def _decide_run(
    out: Path, run_name: str, package: str, resume: str, fresh: bool = False
) -> Tuple[Path, Optional[Path]]:
    if resume and resume != "auto":
        checkpoint = Path(resume)
        if not checkpoint.is_file():
            raise UsageError(f"--resume {resume}: no such checkpoint file")
        run_dir = out / run_name if run_name else checkpoint.parent
        if run_dir.resolve() != checkpoint.parent.resolve() and _checkpoints_in(run_dir):
            raise TrainError(
                f"--run-name {run_name}: {run_dir} already holds another run's checkpoints "
                f"({', '.join(p.name for p in _checkpoints_in(run_dir))}); choose another --run-name"
            )
        return run_dir, checkpoint
    if fresh:
        return _free_folder(out, run_name or package), None
    if run_name:
        run_dir = out / run_name
        existing = _checkpoints_in(run_dir)
        last = run_dir / "last.pt"
        if resume == "auto":
            if last.is_file():
                return run_dir, last  # read and checked before anything is written
            if existing:
                raise TrainError(
                    f"{run_dir} holds {', '.join(p.name for p in existing)} but no last.pt to resume; {FRESH_HINT}, "
                    "or pass --resume with one of them"
                )
            return run_dir, None
        if existing:
            raise TrainError(
                f"{run_dir} already holds a run ({', '.join(p.name for p in existing)}); pass --resume auto to "
                f"continue it, --fresh to start a new run next to it, or choose another --run-name"
            )
        return run_dir, None
    if resume == "auto":
        runs = [r for r in _runs_of(out, package) if (r / "last.pt").is_file()]
        if runs:
            newest = max(runs, key=lambda r: ((r / "last.pt").stat().st_mtime_ns, r.name))  # the last.pt written last
            return newest, newest / "last.pt"
    return _free_folder(out, package), None


def resolve_run(
    dist: DistInfo,
    *,
    out: str,
    run_name: str,
    package: str,
    resume: str,
    fresh: bool = False,
    create: bool = True,
) -> Tuple[Path, Optional[Path]]:
    """(run folder, checkpoint to resume from or None), decided on rank 0 and shared with every rank.

    ``resume``: ``""`` starts a new run (``<out>/<package>``, then ``<package>-2``, ... unless
    ``run_name`` is given; a named run folder that holds any checkpoint, readable or not, is
    refused rather than overwritten); ``"auto"`` continues ``<run_name>/last.pt``, or the
    newest ``last.pt`` among this package's runs (the folders whose run.json names it), and
    starts fresh only when there is none; a path resumes from that file. A ``last.pt`` that
    exists is always returned, never skipped: the caller reads and checks it, and stops if it
    cannot be used. ``fresh``: a new run in the first free folder named after ``run_name`` (or
    the package). With ``create``, rank 0 creates the folder (see :func:`start_run`).
    """
    decision: Any
    if dist.is_main:
        try:
            run_dir, checkpoint = _decide_run(Path(out), run_name, package, resume, fresh)
            if create:
                start_run(dist, run_dir, package)
            decision = (str(run_dir), str(checkpoint) if checkpoint else None)
        except (OSError, TrainError) as error:
            decision = error
    else:
        decision = None
    decision = broadcast_object(decision)
    if isinstance(decision, OSError):
        raise TrainError(f"--out {out}: {decision.strerror or decision} ({decision.filename or out})")
    if isinstance(decision, BaseException):
        raise decision
    run_dir_text, checkpoint_text = decision
    return Path(run_dir_text), (Path(checkpoint_text) if checkpoint_text else None)


def start_run(dist: DistInfo, run_dir: Path, package: str) -> None:
    """Create the run folder (rank 0) with its run.json, and note it as the place for an internal error's log."""
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = run_dir / RUN_FILE
        if not marker.exists():
            marker.write_text(json.dumps({"package": package}) + "\n", encoding="utf-8")
    note_run_dir(run_dir)


def load_resume_state(
    path: Path,
    *,
    package: str,
    model: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    world_size: int,
    must_match: Iterable[str] = ("epochs", "batch_size", "max_steps", "seed"),
) -> Dict[str, Any]:
    """The training state in ``path``, checked before any of it is used; ``TrainError`` otherwise.

    Readable with ``weights_only`` (no pickled objects), written by ``package``, a resumable
    checkpoint (``last.pt``, not ``best.pt``), weights of exactly this model (names, shapes and
    dtypes), and the flags that fix the learning-rate schedule and the position in the data
    (``must_match``) the same as when it was written: a resume with another ``--epochs`` or
    ``--batch-size`` is refused rather than re-planned. A run stopped mid-epoch resumes only
    with the same number of ranks.
    """
    try:
        state = load_checkpoint(path)
        check_checkpoint(state, path, package=package, model=model, require=RESUME_KEYS)
    except CheckpointError as error:
        raise TrainError(
            f"{error}. Nothing was changed; to continue from another checkpoint pass --resume PATH, or {FRESH_HINT}"
        ) from None
    saved: Mapping[str, Any] = state["config"] if isinstance(state.get("config"), Mapping) else {}
    differ = [name for name in must_match if name in saved and name in config and saved[name] != config[name]]
    if differ:
        was = " ".join(f"{_flag(n)} {_shown(saved[n])}" for n in differ)
        now = " ".join(f"{_flag(n)} {_shown(config[n])}" for n in differ)
        raise TrainError(
            f"{path} was trained with {was}, not {now}: the learning-rate schedule and the position in the "
            f"data depend on them, so the run is not re-planned; resume with {was}, or {FRESH_HINT}"
        )
    saved_world = state.get("world_size", world_size)
    if state.get("step_in_epoch", 0) and saved_world != world_size:
        raise TrainError(
            f"{path} stopped mid-epoch with {saved_world} rank(s); resume it with {saved_world} rank(s) "
            f"(here: {world_size}), or from the checkpoint of an epoch's end"
        )
    return state
