"""timm's recipe end to end: presets at build time, soft targets, on-disk PNG/JPEG data, exact resume.

The packages trained here are the committed golden ``soft_cls_loss`` (ConvNeXtV2-atto with timm's
SoftTargetCrossEntropy) and ``convnextv2_femto`` (CrossEntropyLoss), copied out of tests/golden, and
a tiny linear model built from the structcast-model-style presets in cfg/ (built in-process: a
second or two). The data is an ImageFolder of real PNG and JPEG files made from scikit-learn's
digits, one folder per class.
"""

from __future__ import annotations

import ast
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_errors import diagnostic_lines
from tests.test_link import build
from tests.train_support import python_env, run_many

pytest.importorskip("timm")
pytest.importorskip("PIL")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
COMMON = ["--image-size", "32", "--batch-size", "8", "--threads", "1", "--ci", "--no-mlflow", "--max-val-steps", "1"]
FULL_RECIPE = [
    "--data-pipeline",
    "timm",
    "--auto-augment",
    "rand-m9-mstd0.5-inc1",
    "--mixup",
    "0.8",
    "--cutmix",
    "1.0",
    "--label-smoothing",
    "0.1",
    "--reprob",
    "0.25",
    "--ema",
    "--ema-decay",
    "0.9",
]


def write_image_folder(root: Path, per_class: int = 4, val_per_class: int = 1) -> Path:
    """root/{train,val}/<digit>/<n>.png|.jpg: the first digits of each class, upsampled to 32 x 32 RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for pixels, label in zip(digits.images, digits.target):
        n = seen.get(int(label), 0)
        if n >= per_class + val_per_class:
            continue
        seen[int(label)] = n + 1
        split = "train" if n < per_class else "val"
        folder = root / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * 255 / 16).astype("uint8")).convert("RGB").resize((32, 32), Image.BILINEAR)
        image.save(folder / (f"{n}.png" if n % 2 == 0 else f"{n}.jpg"))
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def golden(name: str, tmp_path: Path) -> Path:
    copy = tmp_path / name
    shutil.copytree(GOLDEN / name, copy)
    return copy


@pytest.fixture(scope="module")
def soft_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return golden("soft_cls_loss", tmp_path_factory.mktemp("soft"))


def command(package: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", f"{package.name}.train", *COMMON, "--out", str(out), "--cache-dir", str(out), *args]


def run(package: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(package, out, *args),
        env=python_env(package),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out.parent,
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(left: object, right: object, where: str) -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and torch.equal(left, right), where
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            assert_same(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert left == right, where


def test_the_full_recipe_trains_on_png_and_jpeg_files_and_resumes_bitwise_after_a_kill(
    soft_package: Path, images: Path, tmp_path: Path
):
    assert {p.suffix for p in images.rglob("*.*")} == {".png", ".jpg"}
    out = tmp_path / "runs"
    args = [*FULL_RECIPE, "--data", str(images), "--epochs", "2", "--save-every", "1", "--workers", "0"]
    straight = run(soft_package, out, *args, "--run-name", "straight")
    assert straight.returncode == 0, straight.stderr
    epochs = [r for r in records(out / "straight") if r["event"] == "epoch"]
    assert len(epochs) == 2 and all(v == v for r in epochs for v in r.values() if isinstance(v, float))
    assert {"val_ce_loss", "ema_val_ce_loss", "train_ce_loss"} <= set(epochs[-1])

    # The same run, killed after its first mid-epoch checkpoint and resumed with 2 loader workers:
    # every augmentation draw is fixed by (seed, epoch, index / step), not by the process or the workers.
    killed = out / "killed"
    process = subprocess.Popen(
        command(soft_package, out, *args, "--run-name", "killed"),
        env=python_env(soft_package),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        while process.poll() is None:
            last = killed / "last.pt"
            if last.exists():
                try:
                    state = load(last)
                except Exception:  # noqa: BLE001 - replaced between exists() and load(): look again
                    continue
                if state["step_in_epoch"] > 0:
                    process.send_signal(signal.SIGKILL)
                    break
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the run ended before a mid-epoch checkpoint"
    # Resumed with 2 persistent loader workers: they keep their copy of the dataset across epochs,
    # and the epoch that seeds the augmentation reaches them with each index.
    persistent = [*args[:-1], "2", "--persistent-workers"]
    resumed = run(soft_package, out, *persistent, "--run-name", "killed", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    start = [r for r in records(killed) if r["event"] == "start"][-1]
    assert start["resumed_from"] is not None and start["start_step"] > 0
    one, two = load(out / "straight" / "last.pt"), load(killed / "last.pt")
    assert two["config"]["persistent_workers"] is True and two["config"]["workers"] == 2
    for part in ("model", "ema", "backward", "epoch", "step_in_epoch", "global_step", "best"):
        assert_same(one[part], two[part], part)


def test_a_corrupt_jpeg_stops_with_its_path_or_is_skipped_and_counted(soft_package: Path, images: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    broken = data / "train" / "3" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    out = tmp_path / "runs"
    args = [*FULL_RECIPE, "--data", str(data), "--epochs", "1", "--workers", "2", "--use-prefetcher"]
    failed = run(soft_package, out, *args, "--run-name", "bad")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert f"{broken}: cannot read the image" in failed.stderr and "--skip-bad-images" in failed.stderr
    skipped = run(soft_package, out, *args, "--run-name", "skipped", "--skip-bad-images")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 unreadable image(s)" in skipped.stdout + skipped.stderr


def test_a_class_index_loss_on_a_mixup_run_is_refused_at_start_up(images: Path, tmp_path: Path):
    package = golden("convnextv2_femto", tmp_path)
    out = tmp_path / "runs"
    common = [*COMMON, "--out", str(out), "--data", str(images)]
    hard, basic, dtype = run_many(
        package,
        [
            [*common, "--data-pipeline", "timm", "--mixup", "0.8"],
            [*common, "--cutmix", "1.0"],
            [*common, "--data-pipeline", "timm", "--image-dtype", "bfloat16", "--mixup-mode", "row"],
        ],
        tmp_path,
    )
    assert hard["code"] == 2 and "Traceback" not in hard["stderr"]
    assert "--mixup 0.8: these make soft targets (a probability per class), but this package's loss takes" in (
        hard["stderr"]
    )
    assert "--loss cfg/losses/soft_cls.yaml" in hard["stderr"]
    assert basic["code"] == 2 and "--cutmix: timm's recipe flags need --data-pipeline timm" in basic["stderr"]
    assert dtype["code"] == 2 and "2 problems with the flags" in dtype["stderr"]
    assert "--image-dtype bfloat16: the model's weights are float32" in dtype["stderr"]
    assert "--mixup-mode row: must be one of batch, pair, elem" in dtype["stderr"]
    assert not out.exists()


def train_defaults(source: str) -> dict:
    """TrainConfig's field defaults in a generated train.py, read from its source."""
    tree = ast.parse(source)
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    return {
        field.target.id: ast.literal_eval(field.value.args[0])
        for field in config.body
        if isinstance(field, ast.AnnAssign)
    }


TINY_MODEL = """\
PARAMETERS:
  DEFAULT: {num_classes: 10}
INPUTS: [image]
OUTPUTS: [cls]
STRUCTURED_OUTPUT: true
INPUT_SHAPES:
  image: [3, 32, 32]
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


def preset_files(images: Path) -> dict[str, str]:
    timm_preset = (ROOT / "cfg/datasets/default_timm.yaml").read_text()
    for default, value in (("dataset_dir: data", f"dataset_dir: {images}"), ("num_classes: 1000", "num_classes: 10")):
        assert default in timm_preset
        timm_preset = timm_preset.replace(default, value)
    return {
        "model_yaml": TINY_MODEL,
        "loss_yaml": (ROOT / "cfg/losses/soft_cls.yaml").read_text(),
        "dataset_yaml": timm_preset,
        "ema_yaml": (ROOT / "cfg/others/ema.yaml").read_text(),
        "compile_yaml": (ROOT / "cfg/others/compile_default.yaml").read_text(),
    }


def test_the_structcast_model_presets_build_into_train_py_defaults_and_train(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    result = build(
        tmp_path,
        monkeypatch,
        "--name",
        "recipe_presets",
        "-p",
        "image_size=32",
        "-p",
        "batch_size=8",
        **preset_files(images),
    )
    assert result.exit_code == 0, result.output
    package = tmp_path / "out"
    train = (package / "src" / "recipe_presets" / "train.py").read_text()
    defaults = train_defaults(train)
    expected = {
        "data_pipeline": "timm",
        "data": str(images),
        "image_size": 32,
        "batch_size": 8,
        "label_smoothing": 0.1,
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "use_prefetcher": True,
        "pin_memory": False,
        "seed": 42,
        "hflip_prob": 0.5,
        "interpolation": "bicubic",
        "ema_decay": 0.998,
        "ema_warmup": True,
        "ema_warmup_power": 0.6666666666666666,
        "ema_exclude_buffers": False,
        "compile_backend": "inductor",
        "compile_fullgraph": False,
        "compile_mode": "default",
    }
    assert {k: defaults[k] for k in expected} == expected
    assert "SOFT_TARGETS = 10" in train
    renamed = tmp_path / "recipe_presets"
    package.rename(renamed)
    out = tmp_path / "runs"
    trained = run(renamed, out, "--epochs", "1", "--max-steps", "2", "--workers", "0", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    epoch = [r for r in records(out / "recipe_presets") if r["event"] == "epoch"][-1]
    assert epoch["val_ce_loss"] == epoch["val_ce_loss"] and "ema_val_ce_loss" in epoch


def test_preset_mistakes_are_located_diagnostics(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = preset_files(images)
    files["dataset_yaml"] = files["dataset_yaml"].replace("  aug_splits: 0\n", "  aug_splits: 0\n  mixup_alpha: 1\n")
    files["loss_yaml"] = (
        "FLOW:\n  - [{target: label, input: cls}, ce_loss, criterion, [_obj_, {_addr_: torch.nn.NLLLoss}, _call_]]\n"
    )
    result = build(tmp_path / "a", monkeypatch, **files)
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [  # aug_splits: tests/test_recipe_augmix.py
        "dataset.yaml:24:1: error[E1203]: unknown key `mixup_alpha` in the dataset preset (in the output of this "
        "Jinja block)",
    ]
    assert "= help: did you mean `mixup_prob`?" in result.stderr

    files = preset_files(images)
    files["loss_yaml"] = (
        "FLOW:\n  - [{target: label, input: cls}, ce_loss, criterion, [_obj_, {_addr_: torch.nn.NLLLoss}, _call_]]\n"
    )
    result = build(tmp_path / "b", monkeypatch, **files)
    assert result.exit_code == 1
    assert [line for line in diagnostic_lines(result.stderr) if "E1220" in line] == [
        "dataset.yaml:24:1: error[E1220]: `label_smoothing` in the dataset preset makes soft targets "
        "(a probability per class), but `torch.nn.NLLLoss` takes class indices (in the output of this Jinja block)"
    ]
    assert "= help: use a loss on probabilities (scmc build ... --loss cfg/losses/soft_cls.yaml)" in result.stderr


def test_soft_targets_need_num_classes_and_the_best_metric_must_be_reported(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    files = preset_files(images)
    assert "  num_classes: {{ num_classes }}\n" in files["dataset_yaml"]
    files["dataset_yaml"] = files["dataset_yaml"].replace(
        "  num_classes: {{ num_classes }}\n", "  best_metric: val_top1\n"
    )
    result = build(tmp_path, monkeypatch, **files)
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == [
        "dataset.yaml:24:1: error[E1221]: `label_smoothing` makes soft targets (a probability per class), so the "
        "preset needs `num_classes` (in the output of this Jinja block)",
        "dataset.yaml:24:1: error[E1222]: `best_metric: val_top1` is not reported by train.py (it reports "
        "val_ce_loss, ema_val_ce_loss, train_ce_loss) (in the output of this Jinja block)",
    ]


def test_a_preset_with_scmc_keys_but_no_kind_still_asks_for_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    result = build(tmp_path, monkeypatch, dataset_yaml="root: images\nimage_size: 16\n")
    assert result.exit_code == 1
    assert diagnostic_lines(result.stderr) == ["dataset.yaml:1:1: error[E1203]: the dataset preset needs `kind`"]
