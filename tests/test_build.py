"""`scmc build` output: golden files, determinism, formatting, and atomic writes."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, build_package
from tests.golden.cases import CASES


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_build_matches_the_committed_golden_package(name: str, tmp_path: Path) -> None:
    args = list(CASES[name])
    out = build_package(tmp_path / name, *args, name=None if "--name" in args else name)
    expected = tree_bytes(ROOT / "tests" / "golden" / name)
    actual = tree_bytes(out)
    assert sorted(actual) == sorted(expected), "file lists differ; run `make golden` and review the diff"
    for rel in expected:
        if actual[rel] != expected[rel]:
            diff = "".join(
                difflib.unified_diff(
                    expected[rel].decode().splitlines(True),
                    actual[rel].decode().splitlines(True),
                    f"golden/{rel}",
                    f"built/{rel}",
                )
            )
            pytest.fail(f"{rel} differs from the golden file (regenerate with `make golden`):\n{diff}")


def _build_subprocess(out: Path, seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    subprocess.run(
        [sys.executable, "-m", "scmc", "build", *CASES["convnextv2_femto"], "-o", str(out), "-q"],
        cwd=ROOT,
        env=env,
        check=True,
    )


@pytest.mark.slow
def test_two_builds_with_different_hash_seeds_are_byte_identical(tmp_path: Path) -> None:
    _build_subprocess(tmp_path / "a", "1")
    _build_subprocess(tmp_path / "b", "12345")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_generated_python_passes_black_check(femto_package: Path) -> None:
    import black

    for path in (femto_package / "src").rglob("*.py"):
        source = path.read_text()
        assert black.format_str(source, mode=black.Mode(line_length=100)) == source, path
    result = subprocess.run([sys.executable, "-m", "black", "--check", "-l", "100", "-q", str(femto_package / "src")])
    assert result.returncode == 0


def test_an_existing_output_is_kept_unless_force(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scmc.cli import main

    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["build", "cfg/losses/cls.yaml", "-o", str(out)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["build", "cfg/losses/cls.yaml", "-o", str(out), "--force"])
    assert result.exit_code == 1, "--force replaces only a package scmc wrote"
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    out.rmdir()
    assert CliRunner().invoke(main, ["build", "cfg/losses/cls.yaml", "-o", str(out)]).exit_code == 0
    result = CliRunner().invoke(main, ["build", "cfg/losses/cls.yaml", "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert (out / "pyproject.toml").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"], "no staging or backup directory is left behind"


def test_a_failed_build_leaves_the_previous_package_untouched(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scmc.cli import main

    out = build_package(tmp_path / "pkg", "cfg/losses/cls.yaml")
    before = tree_bytes(out)
    broken = tmp_path / "broken.yaml"
    broken.write_text("FLOW:\n  - [x, y, [_obj_, {_addr_: torch.nn.NoSuchLayer}, _call_]]\n")
    result = CliRunner().invoke(main, ["build", str(broken), "-o", str(out), "--force"])
    assert result.exit_code == 1
    assert "NoSuchLayer" in result.output and "nothing was written" in result.output
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "pkg"]


def test_manifest_records_versions_parameters_and_input_hashes(femto_package: Path) -> None:
    import hashlib
    import json

    manifest = json.loads((femto_package / "src" / "convnextv2_femto" / "manifest.json").read_text())
    assert manifest["parameters"] == ["backbone=femto"]
    assert manifest["resolved_parameters"]["backbone"] == "femto"
    assert manifest["parameter_count"] == 5_233_240
    for entry in manifest["inputs"]:
        assert entry["sha256"] == hashlib.sha256((ROOT / entry["path"]).read_bytes()).hexdigest()
    assert {"scmc_version", "torch_version"} <= set(manifest)


def test_pyproject_depends_on_exactly_what_the_code_imports(femto_package: Path, tmp_path: Path) -> None:
    import tomllib

    project = tomllib.loads((femto_package / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["scmc-runtime>=0.1.0,<0.2", "timm>=1.0", "torch>=2.4"]
    loss_only = build_package(tmp_path / "loss", "cfg/losses/cls.yaml", name="loss_only")
    deps = tomllib.loads((loss_only / "pyproject.toml").read_text())["project"]["dependencies"]
    assert deps == ["scmc-runtime>=0.1.0,<0.2", "torch>=2.4"]


def test_importing_the_package_checks_the_runtime_version(femto_package: Path) -> None:
    init = (femto_package / "src" / "convnextv2_femto" / "__init__.py").read_text()
    assert 'scmc_runtime.check_version(">=0.1.0,<0.2", package="convnextv2_femto")' in init


def test_a_template_with_cfg_includes_builds_and_the_manifest_hashes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer graph taken from another file (CFG) is an input of the package like the template."""
    import hashlib
    import json

    from click.testing import CliRunner

    from scmc.cli import main

    head = (
        "PARAMETERS:\n  DEFAULT: {classes: 3}\nINPUTS: [feat]\nOUTPUTS: [logits]\nFLOW:\n"
        "  - _jinja_yaml_: |-\n"
        "      - [feat, logits, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ classes }}}}]]\n"
    )
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "head.yaml").write_text(head)
    (tmp_path / "net.yaml").write_text(
        "INPUTS: [x]\nOUTPUTS: [y]\nINPUT_SHAPES: {x: [4]}\nFLOW:\n  - [x, y, head, {CFG: parts/head.yaml}]\n"
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["build", "net.yaml", "-o", "out", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    inputs = json.loads((tmp_path / "out" / "src" / "net" / "manifest.json").read_text())["inputs"]
    assert {
        "role": "model (CFG)",
        "path": "parts/head.yaml",
        "sha256": hashlib.sha256(head.encode()).hexdigest(),
    } in inputs
    assert "in_features=4, out_features=3" in (tmp_path / "out" / "src" / "net" / "model.py").read_text()


# --------------------------------------------------------------------------- paths in generated files


def build_in(cwd: Path, *args: str):
    from click.testing import CliRunner

    from scmc.cli import main

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, ["build", *args, "-q"])
    finally:
        os.chdir(previous)


def test_no_path_of_the_build_machine_appears_in_a_package(tmp_path: Path) -> None:
    """A template given by absolute path from elsewhere is recorded by file name (its CFG and
    PACKAGE inputs too); one inside the working directory relative to it, normalized."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    template = ROOT / "cfg" / "models" / "ConvNeXtV2.yaml"
    result = build_in(elsewhere, str(template), "-p", "backbone=atto", "--name", "atto", "-o", "out")
    assert result.exit_code == 0, result.output
    files = tree_bytes(elsewhere / "out")
    assert {"src/atto/train.py", "src/atto/backward.py", "README.md", "src/atto/manifest.json"} <= set(files)
    for rel, data in files.items():
        text = data.decode()
        # the model card's commands run from the package folder (`../dist`, `../runs`): its input paths
        # are checked by the rebuild command below
        relative = () if rel == "README.md" else ("../",)
        for machine_path in (str(ROOT), str(tmp_path), "/tmp/", "/work/", *relative):
            assert machine_path not in text, f"{rel} holds {machine_path!r}"
    assert files["src/atto/model.py"].startswith(b"# Generated by scmc 0.1.0 from ConvNeXtV2.yaml -- do not edit.")
    assert b"scmc build ConvNeXtV2.yaml -p backbone=atto --name atto --force" in files["README.md"]
    import json

    manifest = json.loads(files["src/atto/manifest.json"])
    assert [i["path"] for i in manifest["inputs"]] == [
        "ConvNeXtV2.yaml",
        "cls.yaml",
        "topk.yaml",
        "ConvNeXtV2.yaml",
        "digits.yaml",
        "ema.yaml",
        "compile_default.yaml",
    ]
    dotted = build_in(ROOT, "cfg/models/../models/ConvNeXtV2.yaml", "-p", "backbone=atto", "-o", str(tmp_path / "p"))
    assert dotted.exit_code == 0, dotted.output
    normal = tree_bytes(tmp_path / "p")
    for rel, data in normal.items():
        assert b"models/../" not in data and str(tmp_path).encode() not in data, rel
    assert b"scmc build cfg/models/ConvNeXtV2.yaml -p backbone=atto" in normal["README.md"]
    manifest = json.loads(normal["src/convnextv2_atto/manifest.json"])
    assert manifest["inputs"][0]["path"] == "cfg/models/ConvNeXtV2.yaml"
    assert manifest["inputs"][3]["path"] == "cfg/backwards/ConvNeXtV2.yaml"


# --------------------------------------------------------------------------- names in generated code

TRAINABLE_MODEL = """\
PACKAGE:
  LOSS: loss.yaml
  BACKWARD: {root}/cfg/backwards/ConvNeXtV2.yaml
  DATASET: {root}/cfg/datasets/digits.yaml
INPUTS: [{input}]
OUTPUTS: [logits]
STRUCTURED_OUTPUT: true
INPUT_SHAPES: {{{input}: [3, 32, 32]}}
FLOW:
  - [{input}, h, flat, [_obj_, {{_addr_: torch.nn.Flatten}}, _call_]]
  - [h, logits, fc, [_obj_, {{_addr_: torch.nn.LazyLinear}}, {{_call_: {{out_features: 10}}}}]]
"""
TRAINABLE_LOSS = """\
INPUTS: [label, {name}]
FLOW:
  - [{{target: label, input: {name}}}, {loss}, criterion, [_obj_, {{_addr_: torch.nn.CrossEntropyLoss}}, _call_]]
"""


TRAINABLE_METRIC = """\
INPUTS: [label, logits]
FLOW:
  - [{{y_true: label, y_pred: logits}}, {metric}, [_obj_, {{_addr_: structcast_model.torch.layers.sparse_categorical_accuracy}}]]
"""


def trainable(
    tmp_path: Path, model_input: str = "image", loss_input: str = "logits", loss: str = "ce_loss", metric: str = ""
) -> Path:
    """A small package that trains on the digits; the names of its inputs, loss and metric are given."""
    model = TRAINABLE_MODEL.format(root=ROOT, input=model_input)
    if loss_input != "logits":
        model = model.replace("logits", loss_input)
    if metric:
        model = model.replace("  LOSS: loss.yaml\n", "  LOSS: loss.yaml\n  METRIC: metric.yaml\n")
        (tmp_path / "metric.yaml").write_text(TRAINABLE_METRIC.format(metric=metric))
    (tmp_path / "net.yaml").write_text(model)
    (tmp_path / "loss.yaml").write_text(TRAINABLE_LOSS.format(name=loss_input, loss=loss))
    return tmp_path


def diagnostics_of(result) -> list[str]:
    return [line for line in result.output.splitlines() if "error[" in line]


def test_a_loss_input_that_train_py_cannot_pass_by_name_is_an_error_at_its_line(tmp_path: Path) -> None:
    """train.py calls the loss with keyword arguments named after its INPUTS; `input` would be
    renamed `input_` in the generated forward (it is a builtin): a TypeError at the first step."""
    trainable(tmp_path, loss_input="input")
    result = build_in(tmp_path, "net.yaml", "--name", "tpk", "-o", "out")
    assert result.exit_code == 1
    assert diagnostics_of(result) == [
        "loss.yaml:1:17: error[E0930]: loss input `input` cannot be a keyword argument of the generated "
        "`Loss.forward` (it would be `input_`: the name is taken by Python or by the generated code), and "
        "train.py passes each input by name"
    ]
    assert "= help: rename `input` here and where the loss reads it, e.g. to `input_in`" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.yaml", "net.yaml"]


def test_a_loss_named_like_what_backward_py_uses_is_an_error(tmp_path: Path) -> None:
    trainable(tmp_path, loss="update")
    result = build_in(tmp_path, "net.yaml", "--name", "tpk", "-o", "out", "-p", "target_loss=update")
    assert result.exit_code == 1
    assert diagnostics_of(result) == [
        f"{ROOT}/cfg/backwards/ConvNeXtV2.yaml:45:1: error[E0931]: loss `update` cannot be an argument of the "
        "generated `Backward.__call__`: the generated code uses that name"
    ]
    assert not (tmp_path / "out").exists()


def test_a_metric_output_python_cannot_bind_is_an_error_at_its_line(tmp_path: Path) -> None:
    trainable(tmp_path, metric="__debug__")
    result = build_in(tmp_path, "net.yaml", "--name", "tpk", "-o", "out")
    assert result.exit_code == 1
    assert diagnostics_of(result) == [
        "metric.yaml:3:39: error[E0932]: metric output `__debug__` cannot be a variable of the generated train.py: "
        "Python refuses to bind it"
    ]
    assert not (tmp_path / "out").exists()


def test_generated_python_must_compile_not_only_parse() -> None:
    from scmc.emit.python import format_python

    assert format_python("x = 1\n") == "x = 1\n"
    with pytest.raises(SyntaxError, match="__debug__"):
        format_python("__debug__ = 1\n")


@pytest.mark.parametrize(
    "classname, message",
    [
        ("Loss", "the package already has a class `Loss` (the loss)"),
        ("TrainConfig", "the generated train.py uses `TrainConfig` for something else"),
        ("model", "the generated train.py uses `model` for a local variable"),
        ("importlib", "the generated __init__.py uses `importlib` for something else"),
        ("ℳodel", "Python reads it as `Model`"),
        ("_Model", "names starting with `_` are private to the generated modules"),
        ("print", "the generated code uses that name (a builtin, typing or module name)"),
    ],
)
def test_a_class_name_the_package_itself_uses_is_refused(tmp_path: Path, classname: str, message: str) -> None:
    trainable(tmp_path)
    result = build_in(tmp_path, "net.yaml", "--name", "tpk", "-o", "out", "-c", classname)
    assert result.exit_code == 1
    assert diagnostics_of(result) == [f"error[E0906]: class name `{classname}` is not usable: {message}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, message",
    [
        ("class", "it is a Python keyword"),
        ("json", "a module of Python's standard library has that name"),
        ("numpy", "the generated code imports a module of that name"),
        ("scmc_runtime", "the generated code imports a module of that name"),
        ("__main__", "Python treats names starting with `__` specially"),
        ("Net", "it is not a lowercase Python identifier"),
    ],
)
def test_a_package_name_that_would_not_import_as_itself_is_refused(tmp_path: Path, name: str, message: str) -> None:
    trainable(tmp_path)
    result = build_in(tmp_path, "net.yaml", "--name", name, "-o", "out")
    assert result.exit_code == 1
    assert diagnostics_of(result) == [f"error[E0900]: package name `{name}` is not usable: {message}"]


def test_a_template_stem_that_is_a_keyword_is_refused_as_the_package_name(tmp_path: Path) -> None:
    trainable(tmp_path)
    (tmp_path / "net.yaml").rename(tmp_path / "import.yaml")
    result = build_in(tmp_path, "import.yaml", "-o", "out")
    assert diagnostics_of(result) == ["error[E0900]: package name `import` is not usable: it is a Python keyword"]


def test_names_the_emitter_renames_give_a_package_that_imports_and_trains(tmp_path: Path) -> None:
    """A model input named like a builtin (`input`), a loss and a metric named like the classes
    train.py imports (`Loss`, `Backward`: locals of functions that never use the classes) and a
    class name given with -c build a package whose train.py runs a step."""
    import json

    from tests.train_support import python_env

    trainable(tmp_path, model_input="input", loss="Loss", metric="Backward")
    result = build_in(
        tmp_path, "net.yaml", "--name", "renamed_net", "-o", "out", "-c", "Classifier", "-p", "target_loss=Loss"
    )
    assert result.exit_code == 0, result.output
    package = tmp_path / "out"
    assert "def forward(self, input_: torch.Tensor)" in (package / "src" / "renamed_net" / "model.py").read_text()
    command = [
        sys.executable,
        "-m",
        "renamed_net.train",
        *("--epochs", "1", "--max-steps", "1", "--max-val-steps", "1", "--batch-size", "8", "--image-size", "32"),
        *("--workers", "0", "--threads", "1", "--ci", "--no-mlflow", "--no-ema", "--out", str(tmp_path / "runs")),
        *("--cache-dir", str(tmp_path / "data")),
    ]
    done = subprocess.run(command, env=python_env(package), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = list((tmp_path / "runs").glob("*/metrics.jsonl"))
    records = [json.loads(line) for line in runs[0].read_text().splitlines()]
    assert any(r.get("event") == "start" for r in records)
    assert any("val_Backward" in r and "val_Loss" in r for r in records), records
