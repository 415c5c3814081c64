"""The training pieces need only torch at import time; extras are imported when used."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import scmc_runtime
from scmc_runtime._optional import require

TRAINING_MODULES = [
    "checkpoint",
    "curves",
    "data",
    "distributed",
    "elastic",
    "ema",
    "logging",
    "metrics",
    "overrides",
    "pretrained",
    "signals",
]
OPTIONAL = ["timm", "mlflow", "sklearn", "PIL", "matplotlib", "safetensors"]


def test_importing_the_training_modules_imports_no_optional_dependency():
    imports = "; ".join(f"import scmc_runtime.{name}" for name in TRAINING_MODULES)
    script = f"import json, sys; {imports}; print(json.dumps(sorted(set({OPTIONAL!r}) & set(sys.modules))))"
    env = dict(os.environ, PYTHONPATH=str(Path(scmc_runtime.__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_a_missing_optional_dependency_names_the_extra_to_install():
    with pytest.raises(
        ImportError,
        match=r"MlflowLogger needs the optional dependency 'no_such_pkg': pip install no_such_pkg "
        r"\(or install the package with its \[train\] extra, which brings scmc-runtime\[train\]\)",
    ):
        require("no_such_pkg.sub", "MlflowLogger", "train")
    # the hint names what the package index serves (scmc-runtime travels as a wheel: `scmc wheel`)
    with pytest.raises(ImportError, match=r"pip install Pillow \(or"):
        require("PIL.NoSuchModule", "ImageFolderDataset", "data")
    assert require("json", "x", "y") is json
