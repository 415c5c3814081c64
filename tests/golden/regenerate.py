"""Rebuild every golden package (`make golden`). Review the diff like code before committing."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from cases import CASES  # noqa: E402


def main() -> None:
    for name, args in CASES.items():
        target = ROOT / "tests" / "golden" / name
        shutil.rmtree(target, ignore_errors=True)
        cmd = [sys.executable, "-m", "scmc", "build", *args, "--name", name, "-o", str(target), "-q"]
        if "--name" in args:
            cmd = [sys.executable, "-m", "scmc", "build", *args, "-o", str(target), "-q"]
        subprocess.run(cmd, cwd=ROOT, check=True)
        print(f"regenerated tests/golden/{name}")


if __name__ == "__main__":
    main()
