"""A picture of a run: loss, metrics and learning rate over the steps, drawn from its metrics.jsonl.

:func:`plot_run` reads ``<run>/metrics.jsonl`` (the records :class:`scmc_runtime.logging.MetricsFile`
wrote) and writes ``<run>/curves.png``, three panels side by side:

* **loss** -- the training loss every ``--log-every`` steps (``train_step_<loss>``), the epoch means
  (``train_<loss>``), validation of the raw weights (``val_<loss>``) and of their moving average
  (``ema_val_<loss>``);
* **metrics** -- the same for every metric output (accuracy ...);
* **learning rate** -- every parameter group (``lr_<optimizer>/<group>``).

The file is replaced atomically, so a reader never sees half a PNG. matplotlib (the ``plot`` extra)
is imported when a picture is drawn, with the Agg backend and without pyplot's global state; when
it is missing :func:`plot_run` returns ``None`` and :func:`curves_problem` says what to install.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from scmc_runtime._optional import install_hint
from scmc_runtime.checkpoint import _umask

__all__ = ["CURVES_FILE", "FIGURE_PIXELS", "RunCurves", "curves_problem", "plot_run", "read_series"]

CURVES_FILE = "curves.png"
DPI = 100
FIGURE_PIXELS = (1500, 450)  # width, height of the PNG
MAX_RECORDS = 1_000_000  # lines of metrics.jsonl read at most (a run logs one per --log-every steps)

Series = Dict[str, Tuple[List[int], List[float]]]


def curves_problem() -> Optional[str]:
    """``None`` when matplotlib can be imported, else the one line that says how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"no run curves (curves.png): matplotlib is not installed; {install_hint('matplotlib', 'plot')}"
    return None


def read_series(path: Path) -> Series:
    """``{name: (steps, values)}`` of every numeric value of the step and epoch records of ``path``.

    Lines that are not JSON objects (a run killed while writing one) are skipped.
    """
    series: Series = {}
    try:
        handle = open(path, encoding="utf-8")
    except OSError:
        return series
    with handle:
        for index, line in enumerate(handle):
            if index >= MAX_RECORDS:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("event") not in ("step", "epoch"):
                continue
            step = record.get("step")
            if not isinstance(step, int):
                continue
            for name, value in record.items():
                if name in ("event", "step", "epoch", "epoch_seconds") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    steps, values = series.setdefault(name, ([], []))
                    steps.append(step)
                    values.append(float(value))
    return series


def _panel(axes: Any, series: Series, names: Sequence[str], title: str) -> None:
    """One panel: for each name the four curves train_step_/train_/val_/ema_val_ that exist."""
    styles = (
        ("train_step_", "train (steps)", {"linewidth": 0.8, "alpha": 0.6}),
        ("train_", "train (epoch mean)", {"marker": "o", "linestyle": "--"}),
        ("val_", "val", {"marker": "o"}),
        ("ema_val_", "val, EMA weights", {"marker": "s"}),
    )
    drawn = False
    for name in names:
        for prefix, label, style in styles:
            key = prefix + name
            if key in series:
                steps, values = series[key]
                axes.plot(steps, values, label=f"{label}: {name}" if len(names) > 1 else label, **style)
                drawn = True
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(True, alpha=0.3)
    if drawn:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=axes.transAxes)


def plot_run(
    run_dir: os.PathLike | str,
    *,
    losses: Sequence[str],
    metrics: Sequence[str] = (),
    title: str = "",
) -> Optional[Path]:
    """Draw ``<run_dir>/curves.png`` from ``<run_dir>/metrics.jsonl``; its path, or ``None`` without matplotlib.

    ``losses`` and ``metrics`` are the output names of the loss and metric graphs (``LOSSES`` and
    ``METRICS`` of a generated train.py): they decide which panel a series goes to.
    """
    if curves_problem() is not None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    series = read_series(run_dir / "metrics.jsonl")
    figure = Figure(figsize=(FIGURE_PIXELS[0] / DPI, FIGURE_PIXELS[1] / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    loss_axes, metric_axes, lr_axes = figure.subplots(1, 3)
    _panel(loss_axes, series, list(losses), "loss")
    _panel(metric_axes, series, list(metrics), "metrics" if metrics else "metrics (none compiled)")
    lrs = sorted(name for name in series if name.startswith("lr_"))
    for name in lrs:
        steps, values = series[name]
        lr_axes.plot(steps, values, label=name[3:], linewidth=1.0)
    lr_axes.set_title("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(True, alpha=0.3)
    if lrs:
        lr_axes.legend(fontsize="small")
        if len(lrs) > 1 or min(min(series[n][1]) for n in lrs) > 0:
            lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    target = run_dir / CURVES_FILE
    handle, temporary = tempfile.mkstemp(prefix=".curves-", suffix=".png", dir=run_dir)
    try:
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask
            figure.savefig(stream, format="png", dpi=DPI)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return target


class RunCurves:
    """:func:`plot_run` for the training loop (rank 0): a problem is one warning, then no more pictures.

    Training never stops for a picture: without matplotlib, or when drawing fails, :meth:`draw`
    warns once and returns ``None`` from then on.
    """

    def __init__(
        self, run_dir: Path, *, losses: Sequence[str], metrics: Sequence[str], title: str, enabled: bool, warn: Any
    ) -> None:
        self.run_dir = Path(run_dir)
        self.losses, self.metrics, self.title = list(losses), list(metrics), title
        self.warn = warn
        self.enabled = enabled

    def draw(self) -> Optional[Path]:
        if not self.enabled:
            return None
        problem = curves_problem()
        if problem is None:
            try:
                return plot_run(self.run_dir, losses=self.losses, metrics=self.metrics, title=self.title)
            except (OSError, ValueError, RuntimeError) as error:
                problem = f"no run curves ({CURVES_FILE}): {error}"
        self.warn(problem)
        self.enabled = False
        return None
