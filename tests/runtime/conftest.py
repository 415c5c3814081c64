"""Make ``scmc_runtime`` importable from the source tree when the wheel is not installed."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("scmc_runtime") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "runtime" / "src"))
