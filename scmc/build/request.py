"""What a build is asked for (:class:`BuildRequest`, its :class:`Part` templates) and plans (:class:`Plan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scmc.diagnostics import Diagnostic

if TYPE_CHECKING:
    from scmc.link import Compiled


LAYER_ROLES = ("model", "loss", "metric")
PRESET_ROLES = ("dataset", "ema", "compile")


class InternalError(Exception):
    """A bug in scmc: an IR invariant broke. Carries the IR dump."""

    def __init__(self, message: str, ir_dump: str = ""):
        super().__init__(message)
        self.ir_dump = ir_dump


@dataclass
class Part:
    """One template of the package and the class it becomes."""

    role: str  # model | loss | metric | backward | dataset | ema | compile
    path: Path
    classname: str


ROLE_CLASSES = {"model": "Model", "loss": "Loss", "metric": "Metric", "backward": "Backward"}
PACKAGE_KEYS = {
    "LOSS": "loss",
    "METRIC": "metric",
    "BACKWARD": "backward",
    "DATASET": "dataset",
    "EMA": "ema",
    "COMPILE": "compile",
}


@dataclass
class BuildRequest:
    parts: list[Part]
    params: list[str] = field(default_factory=list)
    name: str | None = None
    output: Path | None = None
    force: bool = False
    shapes: dict[str, Any] = field(default_factory=dict)
    structured: bool | None = None
    sublayer: str | None = None
    allow_new_params: bool = False
    allow_modules: tuple[str, ...] = ()
    cfg_dirs: tuple[Path, ...] = ()  # --allow-cfg-dir: folders CFG may read besides the template's
    presets: bool = True  # add the parts the model template names under PACKAGE
    cache: bool = False  # reuse and keep results in the build cache (scmc/cache.py); the CLI turns it on


@dataclass
class Plan:
    name: str
    files: dict[str, bytes]
    compiled: list[Compiled]  # empty when the plan came from the build cache
    param_count: int = 0  # the model's
    cached: bool = False
    warnings: list[Diagnostic] = field(default_factory=list)  # a build cache that is not private (E0950), W1204
