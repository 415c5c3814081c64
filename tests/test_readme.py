"""The README and the docs stay true: the walk-through runs as written, links stay inside the
repository, every error code and every construct of the template language is documented, and the
first-template guide builds.

The walk-through is the README's ```bash blocks between the markers ``<!-- walkthrough: begin``
and ``<!-- walkthrough: end -->``, run in order by one ``bash -euo pipefail``. It is sized by the
environment variables the README itself reads; this test sets the smallest model and a few steps:
``BACKBONE=atto EPOCHS=1 IMAGE_SIZE=32 MAX_STEPS=2``. It runs in a temporary folder holding a copy
of ``cfg/``, with a fresh virtual environment on top of this one (the packages of this interpreter
stay visible, so nothing is downloaded; what the README installs goes into the new environment).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli

README = ROOT / "README.md"
DOCS = ROOT / "docs"
SMALL = {"BACKBONE": "atto", "EPOCHS": "1", "IMAGE_SIZE": "32", "MAX_STEPS": "2"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def walkthrough() -> str:
    text = README.read_text(encoding="utf-8")
    begin, end = text.find("<!-- walkthrough: begin"), text.find("<!-- walkthrough: end -->")
    assert 0 < begin < end, "README.md lost its walk-through markers"
    return "\n".join(bash_blocks(text[begin:end]))


def commands(script: str) -> list[str]:
    """The script's command lines (comments and blank lines dropped, continuations joined)."""
    joined = script.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_walkthrough_goes_from_a_template_to_an_onnx_prediction() -> None:
    steps = commands(walkthrough())
    order = ["scmc build", "scmc wheel", "pip install", "-m $PKG.train", "scmc export", "-m $PKG.predict", "--check"]
    found = [re.compile(re.escape(key) + r"(?![\w-])") for key in order]  # `--check`, not `--checkpoint`
    positions = [next((i for i, s in enumerate(steps) if pattern.search(s)), -1) for pattern in found]
    assert -1 not in positions and positions == sorted(positions), list(zip(order, positions))
    for name in SMALL:
        assert f"${name}" in walkthrough(), f"the walk-through no longer reads ${name}"


def _tool_venv(tmp_path: Path) -> Path:
    """A fresh venv that also sees this interpreter's packages (a .pth file), with `pip` and `scmc`
    commands that run this checkout's scmc."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_parent_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n"
    )
    for tool, module in (("pip", "pip"), ("scmc", "scmc")):
        shim = venv / "bin" / tool
        shim.write_text(f'#!/bin/sh\nexec "{venv / "bin" / "python"}" -m {module} "$@"\n')
        shim.chmod(0o755)
    return venv


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(ROOT / "cfg", work / "cfg")
    venv = _tool_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(SMALL)
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "runtime" / "src")]),
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    script = walkthrough()
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-x", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    assert "is up to date with its templates" in run.stdout
    assert (work / "runs" / "convnextv2_atto" / "export" / "model.onnx").is_file()
    predictions = [line for line in run.stdout.splitlines() if ".png" in line]
    assert len(predictions) >= 2, run.stdout
    # what the README installed went into the new environment, not into this one
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import convnextv2_atto; print(convnextv2_atto.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert installed.startswith(str(venv)), installed


# ----------------------------------------------------------------------------- docs


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.name)
def test_docs_link_only_to_files_in_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "shared/spec" not in text, f"{page.name} points outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def documented_codes() -> set[str]:
    text = (DOCS / "errors.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| ([EW]\d{4}) \|", text, re.M))


def test_every_error_code_in_the_error_cases_is_documented() -> None:
    used = {
        c for p in (ROOT / "tests" / "errors").glob("*.expected") for c in re.findall(r"\[(E\d{4})\]", p.read_text())
    }
    assert used, "tests/errors has no expected diagnostics"
    assert used <= documented_codes(), f"add to docs/errors.md: {sorted(used - documented_codes())}"


def test_docs_errors_lists_exactly_the_codes_scmc_defines() -> None:
    defined = {c for p in (ROOT / "scmc").rglob("*.py") for c in re.findall(r"\"([EW]\d{4})\"", p.read_text())}
    documented = documented_codes()
    assert defined - documented == set(), f"add to docs/errors.md: {sorted(defined - documented)}"
    assert (
        documented - defined == set()
    ), f"docs/errors.md lists codes scmc no longer has: {sorted(documented - defined)}"


def test_the_template_language_page_covers_every_key_and_filter_scmc_reads() -> None:
    import jinja2

    from scmc.backward import BACKWARD_KEYS, BackwardSpec, OptimizerSpec
    from scmc.build import PACKAGE_KEYS
    from scmc.load import JINJA_KEYS, LAYER_GRAPH_KEYS, jinja_environment
    from scmc.lower import PATTERN_KEYS, STEP_KEYS, USER_LAYER_KEYS

    text = (DOCS / "template-language.md").read_text(encoding="utf-8")
    keys = [*LAYER_GRAPH_KEYS, *STEP_KEYS, *USER_LAYER_KEYS, *PATTERN_KEYS, *JINJA_KEYS, *BACKWARD_KEYS]
    keys += [*PACKAGE_KEYS, *OptimizerSpec.model_fields, *BackwardSpec.model_fields, "_obj_", "PACKAGE"]
    keys += ["eval:", "constant:", "{% raw %}", "--allow-module", "--allow-new-params", "-p"]
    filters = sorted(set(jinja_environment().filters) - set(jinja2.Environment().filters))
    assert filters, "scmc's own Jinja filters were not found"
    missing = [k for k in [*keys, *filters] if not re.search(r"(?<![\w-])" + re.escape(k) + r"(?![\w-])", text)]
    assert missing == [], f"docs/template-language.md does not describe: {missing}"


def test_the_first_template_of_the_guide_builds_as_the_guide_says(tmp_path: Path) -> None:
    text = (DOCS / "template-language.md").read_text(encoding="utf-8")
    guide = text[text.index("## Write your first template") : text.index("## 0. Kinds of templates")]
    yaml = re.search(r"^```yaml\n(# tiny_cnn\.yaml.*?)^```", guide, re.S | re.M)
    assert yaml is not None, "the guide lost its tiny_cnn.yaml block"
    (tmp_path / "tiny_cnn.yaml").write_text(yaml.group(1))
    (tmp_path / "cfg").symlink_to(ROOT / "cfg")
    first = commands(bash_blocks(guide)[0])[0]
    assert first.startswith("scmc build tiny_cnn.yaml")
    result = cli(tmp_path, *shlex.split(first)[2:])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("built tiny_cnn -> artifacts/tiny_cnn  (5,418 parameters, 10 files, ")
    model = (tmp_path / "artifacts" / "tiny_cnn" / "src" / "tiny_cnn" / "model.py").read_text()
    assert "class Down(torch.nn.Module):" in model and "class Model(torch.nn.Module):" in model
    assert "torch.nn.Conv2d(in_channels=3, out_channels=16, kernel_size=3, padding=1)" in model
    assert (tmp_path / "artifacts" / "tiny_cnn" / "src" / "tiny_cnn" / "train.py").is_file()
