"""The link stage (scmc/link.py): how the parts of a package fit together, checked before emitting.

The single-file wiring mistakes are cases of the error corpus (tests/errors/link_*.yaml); the
tests here need several templates of their own (a model template's PACKAGE block naming EMA and
compile presets), the issue's reproduction on a copy of cfg/, or look at the PackageDef itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_errors import diagnostic_lines

ROOT = Path(__file__).resolve().parents[1]

MODEL = """\
PARAMETERS:
  DEFAULT: {num_classes: 10}
INPUTS: [image]
OUTPUTS: [cls]
STRUCTURED_OUTPUT: true
INPUT_SHAPES:
  image: [3, 8, 8]
PACKAGE:
  LOSS: loss.yaml
  BACKWARD: backward.yaml
  DATASET: dataset.yaml
  EMA: ema.yaml
  COMPILE: compile.yaml
FLOW:
  - [image, _, flatten, [_obj_, {_addr_: torch.nn.Flatten}, _call_]]
  - _jinja_yaml_: |-
      - [_, cls, head, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ num_classes }}}}]]
"""
FILES = {
    "model.yaml": MODEL,
    "loss.yaml": (ROOT / "tests/errors/link/loss.yaml").read_text(),
    "backward.yaml": (ROOT / "tests/errors/link/backward.yaml").read_text(),
    "dataset.yaml": "kind: digits\nnum_classes: 10\nimage_size: 16\n",
    "ema.yaml": "enabled: true\ndecay: 0.99\n",
    "compile.yaml": "enabled: false\nmode: default\n",
}


def build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str, **files: str):
    """`scmc build model.yaml ARGS` in tmp_path, holding FILES with `files` replacing some."""
    from click.testing import CliRunner

    from scmc.cli import main

    for name, text in {**FILES, **{k.replace("_yaml", ".yaml"): v for k, v in files.items()}}.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["build", "model.yaml", "-o", "out", "--no-cache", *args])
    assert "Traceback" not in result.stderr and "internal compiler error" not in result.stderr, result.stderr
    return result


def test_the_wired_package_builds_and_its_train_py_takes_the_presets_defaults(tmp_path, monkeypatch) -> None:
    result = build(tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    train = (tmp_path / "out" / "src" / "model" / "train.py").read_text()
    assert 'image_size: int = flag(16, "images are resized' in train
    assert "ema_decay: float = flag(0.99," in train
    assert 'ce_loss = criterion(label=batch.loss_labels, cls=outputs["cls"])' in train


def test_unknown_and_invalid_keys_of_ema_and_compile_presets_are_errors_at_their_lines(tmp_path, monkeypatch) -> None:
    result = build(
        tmp_path,
        monkeypatch,
        ema_yaml="enabled: true\ndecay: 1.5\nwarmup_steps: 100\n",
        compile_yaml="enabled: false\nmode: default\nfull_graph: true\n",
    )
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "ema.yaml:2:1: error[E1203]: `decay`: Input should be less than 1",
        "ema.yaml:3:1: error[E1203]: unknown key `warmup_steps` in the ema preset",
        "compile.yaml:3:1: error[E1203]: unknown key `full_graph` in the compile preset",
    ]
    assert "= help: did you mean `warmup_power`?" in result.stderr
    assert "= help: did you mean `fullgraph`?" in result.stderr
    assert result.stderr.rstrip().endswith("3 errors; nothing was written.")
    assert not (tmp_path / "out").exists()


def test_a_preset_that_renders_to_something_else_than_a_mapping_is_an_error(tmp_path, monkeypatch) -> None:
    result = build(tmp_path, monkeypatch, compile_yaml="_jinja_yaml_: |-\n  - enabled\n  - mode\n")
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "compile.yaml:1:1: error[E1203]: a compile preset must be a mapping of keys to values"
    ]


def test_a_timm_preset_without_a_name_and_the_classes_it_lists_against_the_head(tmp_path, monkeypatch) -> None:
    result = build(tmp_path, monkeypatch, dataset_yaml="kind: timm\nclasses: [cat, dog, bird]\n")
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "dataset.yaml:1:1: error[E1208]: a timm preset needs `name`, the timm dataset (e.g. torch/cifar10)",
    ]


def test_a_head_wider_or_narrower_than_the_data_builds_with_a_located_warning(tmp_path, monkeypatch) -> None:
    result = build(tmp_path, monkeypatch, dataset_yaml="kind: digits\nnum_classes: 3\nimage_size: 16\n")
    assert result.exit_code == 0, result.output
    assert diagnostic_lines(result.stderr) == [
        "dataset.yaml:2:1: warning[W1204]: the dataset preset has 3 classes, but the model's `cls` gives 10 per sample",
    ]
    assert "= help: build the model's head for the data: pass -p num_classes=3" in result.stderr
    assert (tmp_path / "out").is_dir()


def test_soft_targets_need_the_number_of_classes(tmp_path, monkeypatch) -> None:
    result = build(tmp_path, monkeypatch, dataset_yaml="kind: digits\ntargets: soft\n")
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "dataset.yaml:2:1: error[E1210]: `targets: soft` makes one-hot probabilities, so the preset needs `num_classes`"
    ]


def test_the_package_definition_holds_the_wiring(tmp_path, monkeypatch) -> None:
    from scmc.build import BuildRequest, Part, build_info, compile_parts
    from scmc.link import PackageDef, link

    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "dataset.yaml").write_text(
        "kind: timm\nname: torch/cifar10\nroot: cache\nnum_classes: 10\ntargets: soft\nmean: [0.5, 0.5, 0.5]\n"
    )
    (tmp_path / "loss.yaml").write_text(
        "FLOW:\n  - [{target: y, x: cls}, ce_loss, ce, [_obj_, {_addr_: timm.loss.SoftTargetCrossEntropy}, _call_]]\n"
    )
    monkeypatch.chdir(tmp_path)
    request = BuildRequest(parts=[Part("model", Path("model.yaml"), "Model")])
    name, compiled, allow = compile_parts(request)
    pkg = link(name, compiled, build_info(request), allow)
    assert isinstance(pkg, PackageDef)
    with pytest.raises(AttributeError):
        pkg.name = "other"  # frozen
    assert pkg.model.output_shapes == {"cls": (10,)}
    assert pkg.dataset.kind == "timm" and pkg.ema.decay == 0.99 and pkg.compile.enabled is False
    training = pkg.training
    assert training.label == "y"  # the one loss input the model does not produce
    assert training.soft_targets == 10
    assert training.backward_losses == ("ce_loss",)
    assert dict(training.defaults) == {
        "timm_dataset": "torch/cifar10",
        "cache_dir": "cache",  # a timm dataset's root is where it is cached
        "mean": [0.5, 0.5, 0.5],
        "ema": True,
        "ema_decay": 0.99,
        "compile": False,
        "compile_mode": "default",
        "image_size": 8,  # from the model's input shape
    }
    assert [c.role for c in pkg.modules] == ["model", "loss", "backward"]


def test_the_issue_reproduction_is_a_user_error_not_an_internal_one(tmp_path: Path) -> None:
    """Copy cfg/, change `input: cls` to `input: logits` in losses/cls.yaml, build atto: was exit 70."""
    shutil.copytree(ROOT / "cfg", tmp_path / "cfg")
    loss = tmp_path / "cfg" / "losses" / "cls.yaml"
    loss.write_text(loss.read_text().replace("input: cls", "input: logits"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime" / "src")])}
    result = subprocess.run(
        [sys.executable, "-m", "scmc", "build", "cfg/models/ConvNeXtV2.yaml", "-p", "backbone=atto", "--no-cache"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal compiler error" not in result.stderr
    assert diagnostic_lines(result.stderr) == [
        "cfg/losses/cls.yaml:6:5: error[E1200]: loss input `logits` is neither the label (`label`) nor an output "
        "of the model (cls) (in the output of this Jinja block)",
    ]
    assert not (tmp_path / "artifacts").exists()
