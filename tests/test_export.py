"""`scmc export`: a built package + checkpoint -> ONNX / TorchScript / .pt2, verified against eager.

One femto package (10 classes) is built and trained for a few steps per session; one export
writes all three formats, and the other tests read what it wrote. Failure cases check the
message (code, file name, what is wrong) and the exit status, never a traceback.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import ROOT, RUNTIME_SRC, build_package

PKG = "convnextv2_femto"
IMAGE_SIZE = 32  # the digits preset trains at 32x32; the checkpoint's config says so


def run_cli(*args: str):
    from scmc.cli import main

    return CliRunner().invoke(main, ["export", *args], catch_exceptions=False)


def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ------------------------------------------------------------------------------------------
# Session fixtures: the package, a checkpoint, one export of every format


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / PKG
    return build_package(out, "cfg/models/ConvNeXtV2.yaml", "-p", "backbone=femto", "-p", "num_classes=10")


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scmc_runtime.data import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("data") / "digits")


def _train_with_torch(package: Path, digits: Path, out: Path) -> Path:
    """A few real optimization steps on the digits, saved like the generated train.py saves."""
    import torch

    from tests.conftest import import_package
    from scmc_runtime.checkpoint import save_checkpoint
    from scmc_runtime.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, ImageTransform

    module = import_package(package, PKG)
    torch.manual_seed(0)
    model = module.Model()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = ImageFolderDataset(digits / "train", ImageTransform(IMAGE_SIZE))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step, (images, labels) in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(model(images)["cls"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for key, value in model.state_dict().items():
                ema[key].lerp_(value, 0.5)
        if step == 7:
            break
    config = {
        "image_size": IMAGE_SIZE,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "data": "",
        "timm_dataset": "",
        "batch_size": 32,
    }
    state = {
        "package": PKG,
        "model": model.state_dict(),
        "ema": ema,
        "epoch": 1,
        "step_in_epoch": 0,
        "global_step": 8,
        "config": config,
    }
    return save_checkpoint(out / "last.pt", state)


@pytest.fixture(scope="session")
def checkpoint(package: Path, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    if (package / "src" / PKG / "train.py").is_file():  # the real training entry, when the build emits it
        cmd = [
            sys.executable,
            "-m",
            f"{PKG}.train",
            "--max-steps",
            "5",
            "--epochs",
            "1",
            "--image-size",
            str(IMAGE_SIZE),
            "--batch-size",
            "32",
            "--workers",
            "0",
            "--no-mlflow",
            "--ci",
            "--max-val-steps",
            "1",
            "--out",
            str(out),
            "--run-name",
            "r",
            "--cache-dir",
            str(digits.parent),
        ]
        proc = subprocess.run(cmd, cwd=out, env=_env(package / "src", RUNTIME_SRC), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return out / "r" / "last.pt"
    return _train_with_torch(package, digits, out)


@pytest.fixture(scope="session")
def exported(package: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("exported")
    modules_before = {k for k in sys.modules if k == PKG or k.startswith(PKG + ".")}
    path_before = list(sys.path)
    result = run_cli(
        str(package),
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "--format",
        "torchscript,pt2,aoti",
        "-o",
        str(out),
        "--aoti-timeout",
        "1",
        "--latency-rounds",
        "2",
    )
    leaked = {k for k in sys.modules if k == PKG or k.startswith(PKG + ".")} - modules_before
    return {
        "dir": out,
        "result": result,
        "leaked": leaked,
        "path_changed": sys.path != path_before,
        "report": json.loads((out / "export_report.json").read_text()),
    }


# ------------------------------------------------------------------------------------------
# The export itself


@pytest.mark.slow
def test_export_writes_onnx_torchscript_and_pt2_that_match_eager(exported) -> None:
    result, report = exported["result"], exported["report"]
    assert result.exit_code == 0, result.output
    assert report["passed"] and report["checkpoint"]["weights"] == "ema"
    formats = {a["format"]: a for a in report["artifacts"]}
    assert set(formats) == {"onnx", "torchscript", "pt2"}
    for fmt, artifact in formats.items():
        assert (exported["dir"] / Path(artifact["path"]).name).is_file()
        assert artifact["bytes"] > 1_000_000
        assert artifact["verification"]["passed"], artifact["verification"]
        cases = artifact["verification"]["cases"]
        assert [c["input_shapes"]["image"][0] for c in cases][:3] == [1, 2, 7], fmt
        for case in cases:
            assert case["outputs"]["cls"]["max_abs"] < 1e-4
        assert set(artifact["latency"]) == {"1", "8"}
    assert formats["onnx"]["path_taken"].startswith("torch.onnx.export(dynamo=True)")
    assert formats["onnx"]["opset"] == 20 and formats["onnx"]["dynamic_batch"]
    assert formats["torchscript"]["path_taken"] == "torch.jit.script"
    # TorchScript accepts any size, so it is also checked at a second spatial size (1.25x -> multiple of 32).
    assert formats["torchscript"]["verification"]["cases"][-1]["input_shapes"]["image"] == [2, 3, 64, 64]
    assert "parity: ok" in result.output and "MISMATCH" not in result.output
    assert "latency batch 8" in result.output


@pytest.mark.slow
def test_export_prints_and_records_each_formats_export_and_verify_time(exported) -> None:
    result, report = exported["result"], exported["report"]
    for artifact in report["artifacts"]:
        fmt = artifact["format"]
        for key in ("export_seconds", "verify_seconds"):
            assert isinstance(artifact[key], float) and artifact[key] > 0, (fmt, key, artifact.get(key))
        assert f"{fmt}: exported in {artifact['export_seconds']:.1f} s, verified in " in result.output, fmt
    assert report["timings"]["torch_export"] > 0 and "torch.export: traced in" in result.output


@pytest.mark.slow
def test_latency_has_median_and_spread_for_eager_and_each_runtime(exported) -> None:
    result, report = exported["result"], exported["report"]
    for artifact in report["artifacts"]:
        for batch, t in artifact["latency"].items():
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"], (artifact["format"], batch, t)
            eager = t["eager"]
            assert 0 < eager["min_ms"] <= eager["median_ms"] <= eager["max_ms"]
            assert t["ratio_to_eager"] == pytest.approx(t["median_ms"] / eager["median_ms"])
            assert (t["eager_ms"], t["runtime_ms"], t["ratio"]) == (
                eager["median_ms"],
                t["median_ms"],
                t["ratio_to_eager"],
            )
    table = report["latency"]["1"]
    assert set(table["median_ms"]) == {"eager", "onnx", "torchscript", "pt2"}
    assert set(table["min_ms"]) == set(table["max_ms"]) == set(table["median_ms"])
    line = next(x for x in result.output.splitlines() if "latency batch 1:" in x)
    assert f"eager {table['median_ms']['eager']:.2f} [{table['min_ms']['eager']:.2f}-" in line
    assert f"onnx {table['median_ms']['onnx']:.2f} [" in line and f"{table['ratio_to_eager']['onnx']:.2f}x" in line
    assert "median [min-max]" in result.output


@pytest.mark.slow
def test_export_records_metadata_in_the_onnx_file(exported, package: Path) -> None:
    import onnx

    model = onnx.load(str(exported["dir"] / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    manifest = json.loads((package / "src" / PKG / "manifest.json").read_text())
    model_sha = next(i["sha256"] for i in manifest["inputs"] if i["role"] == "model")
    assert meta["scmc.package"] == PKG
    assert meta["scmc.version"] == manifest["scmc_version"]
    assert meta["scmc.template_sha256"] == model_sha
    assert json.loads(meta["scmc.class_labels"]) == [str(i) for i in range(10)]
    assert json.loads(meta["scmc.inputs"]) == {
        "image": {"shape": ["batch", 3, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32"}
    }
    assert json.loads(meta["scmc.outputs"]) == {"cls": ["batch", 10]}
    assert json.loads(meta["scmc.preprocess"])["image_size"] == IMAGE_SIZE
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["cls"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.slow
def test_export_leaves_no_trace_of_the_package_import(exported) -> None:
    assert not exported["leaked"] and not exported["path_changed"]


@pytest.mark.slow
def test_aoti_package_is_skipped_with_a_reason_not_a_failure(exported) -> None:
    # --format aoti was asked for with --aoti-timeout 1: too short to compile (or no compiler here)
    skipped = {s["format"]: s["reason"] for s in exported["report"]["skipped"]}
    assert "aoti" in skipped
    assert "within 1 s" in skipped["aoti"] or "compiler" in skipped["aoti"]
    assert exported["result"].exit_code == 0


@pytest.mark.slow
def test_onnx_runs_in_a_session_started_from_another_directory(
    exported, checkpoint: Path, package: Path, tmp_path: Path
) -> None:
    import torch

    from tests.conftest import import_package

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    x = np.random.default_rng(0).standard_normal((3, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "np.save(sys.argv[3], s.run(['cls'], {'image': np.load(sys.argv[2])})[0])\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(exported["dir"] / "model.onnx"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    model = import_package(package, PKG).Model().eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["ema"])
    with torch.no_grad():
        expected = model(torch.from_numpy(x))["cls"].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_onnx_modified_after_export_fails_verification(
    exported, package: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """A real mismatch: the head's bias in the ONNX file on disk is nudged by 0.01, then re-verified."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(exported["dir"] / "model.onnx"))
    bias = next(t for t in model.graph.initializer if "head" in t.name and "bias" in t.name)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.01), bias.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    args = [
        str(package),
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "-o",
        str(tmp_path),
        "--verify-only",
        "--latency-rounds",
        "0",
    ]

    result = run_cli(*args)
    assert result.exit_code == 1
    assert "error[E1109]: onnx output does not match eager PyTorch" in result.output
    assert "max abs diff 0.01" in result.output  # says by how much
    assert str(tmp_path / "model.onnx") in result.output
    report = json.loads((tmp_path / "export_report.json").read_text())  # written all the same
    assert report["passed"] is False
    worst = report["artifacts"][0]["worst"]["cls"]
    assert worst["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert "Traceback" not in result.output

    allowed = run_cli(*args, "--allow-mismatch")
    assert allowed.exit_code == 0
    assert "warning[E1109]" in allowed.output


@pytest.mark.slow
def test_static_batch_dynamic_spatial_at_opset_18_with_external_data(
    package: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also the >2 GB path: weights in a side file, as for big models (the threshold lowered to 0)."""
    import onnx

    import scmc.export

    monkeypatch.setattr(scmc.export, "EXTERNAL_DATA_BYTES", 0)
    result = run_cli(
        str(package),
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "--opset",
        "18",
        "--static-batch",
        "--dynamic-spatial",
        "--raw",
        "-o",
        str(tmp_path),
        "--latency-rounds",
        "1",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export_report.json").read_text())
    onnx_entry = report["artifacts"][0]
    assert report["checkpoint"]["weights"] == "raw"
    assert onnx_entry["opset"] == 18 and not onnx_entry["dynamic_batch"] and onnx_entry["static_batch_size"] == 1
    assert onnx_entry["dynamic_spatial"]
    shapes = [c["input_shapes"]["image"] for c in onnx_entry["verification"]["cases"]]
    assert [3, 64, 64] in [s[1:] for s in shapes] and all(s[0] == 1 for s in shapes)
    dims = onnx.load(str(tmp_path / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and dims[2].dim_param and dims[3].dim_param
    assert set(onnx_entry["latency"]) == {"1"}  # batch 8 cannot run on a batch-1 model
    assert onnx_entry["external_data"] and len(onnx_entry["files"]) == 2
    data = tmp_path / onnx_entry["files"][1]
    assert data.stat().st_size > 10_000_000 and (tmp_path / "model.onnx").stat().st_size < 1_000_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scmc-export-")]  # staging removed


# ------------------------------------------------------------------------------------------
# The comparison used as the gate


def test_compare_outputs_passes_within_the_float32_tolerance() -> None:
    from scmc.export import compare_outputs

    expected = {"cls": np.linspace(-10, 10, 50, dtype=np.float32).reshape(5, 10)}
    actual = {"cls": expected["cls"] + np.float32(5e-5)}
    (diff,) = compare_outputs(expected, actual)
    assert diff.passed and diff.max_abs == pytest.approx(5e-5, rel=1e-2) and diff.worst < 1


def test_compare_outputs_reports_a_mismatch_and_by_how_much() -> None:
    from scmc.export import compare_outputs

    expected = {"cls": np.ones((2, 10), dtype=np.float32), "feat": np.zeros((2, 4), dtype=np.float32)}
    perturbed = expected["cls"].copy()
    perturbed[1, 3] += 0.01
    cls, feat = compare_outputs(expected, {"cls": perturbed, "feat": expected["feat"]})
    assert not cls.passed and cls.mismatched == 1
    assert cls.max_abs == pytest.approx(0.01, rel=1e-4) and cls.max_rel == pytest.approx(0.01, rel=1e-3)
    assert cls.worst == pytest.approx(0.01 / (1e-4 + 1e-3), rel=1e-3)
    assert feat.passed


def test_compare_outputs_catches_structural_differences() -> None:
    from scmc.export import compare_outputs

    e = np.zeros((2, 3), dtype=np.float32)
    nan = e.copy()
    nan[0, 0] = np.nan
    assert "shape" in compare_outputs({"a": e}, {"a": np.zeros((3, 2), np.float32)})[0].problem
    assert "missing" in compare_outputs({"a": e}, {"b": e})[0].problem
    assert "NaN" in compare_outputs({"a": e}, {"a": nan})[0].problem
    assert compare_outputs({"a": nan}, {"a": nan})[0].passed  # NaN where eager has NaN is fine
    ints = np.arange(6).reshape(2, 3)
    assert not compare_outputs({"i": ints}, {"i": ints + 1})[0].passed  # integers must match exactly
    extra = compare_outputs({"a": e}, {"a": e, "b": e})
    assert any("unexpected" in d.problem for d in extra)


# ------------------------------------------------------------------------------------------
# Errors: a clear message with the file name, exit status 1, no traceback


def _assert_error(result, code: str, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert f"error[{code}]" in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_checkpoint_of_another_model_names_the_keys(package: Path, tmp_path: Path) -> None:
    import timm
    import torch

    other = tmp_path / "atto.pt"
    torch.save({"model": timm.create_model("convnextv2_atto", num_classes=10).state_dict()}, other)
    result = run_cli(str(package), "--checkpoint", str(other), "-o", str(tmp_path / "out"))
    _assert_error(
        result, "E1106", str(other), PKG, "missing from the checkpoint:", "unexpected:", "stem.0.weight", "more)"
    )
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.slow
def test_checkpoint_with_another_head_size_names_the_shapes(package: Path, checkpoint: Path, tmp_path: Path) -> None:
    import torch

    state = torch.load(checkpoint, weights_only=True)["model"]
    state["head.weight"] = torch.zeros(100, state["head.weight"].shape[1])
    state["head.bias"] = torch.zeros(100)
    path = tmp_path / "hundred.pt"
    torch.save(state, path)  # a bare state_dict
    result = run_cli(str(package), "--checkpoint", str(path))
    _assert_error(result, "E1106", "2 with another shape", "head.weight [100, 384] vs [10, 384]")


def test_truncated_checkpoint_is_reported(package: Path, checkpoint: Path, tmp_path: Path) -> None:
    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    _assert_error(
        run_cli(str(package), "--checkpoint", str(truncated)), "E1103", str(truncated), "truncated or corrupt"
    )
    garbage = tmp_path / "notes.pt"
    garbage.write_text("these are not weights\n")
    _assert_error(run_cli(str(package), "--checkpoint", str(garbage)), "E1103", str(garbage))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _assert_error(run_cli(str(package), "--checkpoint", str(empty)), "E1103", "empty")
    _assert_error(run_cli(str(package), "--checkpoint", str(tmp_path / "nope.pt")), "E1102", "does not exist")


def test_a_folder_that_is_not_a_built_package_is_reported(tmp_path: Path, checkpoint: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_error(
        run_cli(str(empty), "--checkpoint", str(checkpoint)), "E1100", str(empty), "not a package built by scmc"
    )
    half = tmp_path / "half"
    (half / "src" / PKG).mkdir(parents=True)
    (half / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    _assert_error(run_cli(str(half), "--checkpoint", str(checkpoint)), "E1100", "the build did not finish")
    _assert_error(run_cli(str(tmp_path / "missing"), "--checkpoint", str(checkpoint)), "E1100", "does not exist")


def test_a_checkpoint_of_another_package_is_refused_like_resume_refuses_it(
    package: Path, checkpoint: Path, tmp_path: Path
) -> None:
    import torch

    state = torch.load(checkpoint, weights_only=True)
    other = tmp_path / "other.pt"
    torch.save({**state, "package": "resnet_tiny"}, other)
    result = run_cli(str(package), "--checkpoint", str(other), "-o", str(tmp_path / "out"))
    _assert_error(result, "E1106", str(other), f"a checkpoint of package resnet_tiny, not of {PKG}")
    assert not (tmp_path / "out").exists()
    newer = tmp_path / "newer.pt"
    torch.save({**state, "format": 99}, newer)
    _assert_error(run_cli(str(package), "--checkpoint", str(newer)), "E1106", "checkpoint format 99 is newer")


def test_ema_demanded_from_a_bare_state_dict_is_reported(package: Path, checkpoint: Path, tmp_path: Path) -> None:
    import torch

    bare = tmp_path / "bare.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["model"], bare)
    _assert_error(run_cli(str(package), "--checkpoint", str(bare), "--ema"), "E1105", str(bare), "no EMA weights")


def test_missing_onnxruntime_suggests_the_export_extra(
    package: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    _assert_error(
        run_cli(str(package), "--checkpoint", str(checkpoint)),
        "E1107",
        "onnxruntime",
        "pip install onnx onnxruntime onnxscript",
    )


def test_errors_print_no_traceback_from_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scmc", "export", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert f"{tmp_path}: error[E1100]" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------
# predict.py: inference without torch


def _render(labels=None) -> str:
    from scmc.emit.predict import render_predict
    from scmc_runtime.data import IMAGENET_MEAN, IMAGENET_STD

    return render_predict(PKG, "image", IMAGE_SIZE, list(IMAGENET_MEAN), list(IMAGENET_STD), labels, 5)


def test_render_predict_is_formatted_deterministic_and_torch_free() -> None:
    from scmc.emit.package import format_python

    source = _render([str(i) for i in range(10)])
    assert source == _render([str(i) for i in range(10)])
    assert format_python(source) == source
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"argparse", "json", "os", "stat", "sys", "typing", "warnings", "numpy", "onnxruntime", "PIL"}
    assert "IMAGE_SIZE = 32" in source and 'CLASS_LABELS: Optional[List[str]] = ["0", "1"' in source


def _predict_module(tmp_path: Path):
    import importlib.util

    path = tmp_path / "predict_mod.py"
    path.write_text(_render())
    spec = importlib.util.spec_from_file_location("_scmc_test_predict", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_resize_weights_are_torchs(tmp_path: Path) -> None:
    import torch
    import torch.nn.functional as F

    predict = _predict_module(tmp_path)
    for n_in, n_out in [(8, 32), (300, 224), (200, 224), (500, 96), (33, 64), (224, 224)]:
        basis = torch.eye(n_in).reshape(1, 1, n_in, n_in)  # column j of the output is the weight of input pixel j
        weights = F.interpolate(basis, size=(n_out, n_in), mode="bilinear", align_corners=False, antialias=True)[0, 0]
        assert np.array_equal(predict.resize_weights(n_in, n_out), weights.numpy()), (n_in, n_out)


def test_predict_preprocessing_matches_the_validation_transform(tmp_path: Path) -> None:
    """Same float32 weights as torch; only the summation order differs: at most a few ulp (< 2e-6)."""
    import torch
    from PIL import Image

    from scmc_runtime.data import ImageTransform

    predict = _predict_module(tmp_path)
    rng = np.random.default_rng(0)
    for (h, w), size in [((8, 8), 32), ((300, 200), 224), ((50, 70), 32), ((224, 224), 224), ((375, 500), 96)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"{h}x{w}.png"
        Image.fromarray(pixels).save(path)
        ours = predict.preprocess(str(path), (size, size), predict.MEAN, predict.STD)
        theirs = ImageTransform(size)(torch.from_numpy(pixels).permute(2, 0, 1).contiguous()).numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() < 2e-6, (h, w, size)


@pytest.mark.slow
def test_predict_without_torch_gives_eager_top1(
    exported, package: Path, checkpoint: Path, digits: Path, tmp_path: Path
) -> None:
    import torch

    from tests.conftest import import_package
    from scmc_runtime.data import ImageFolderDataset, ImageTransform

    # predict.py in a package folder of its own (the built package's __init__ imports torch today).
    pkg_dir = tmp_path / "predict_src" / PKG
    pkg_dir.mkdir(parents=True)
    (pkg_dir / "__init__.py").write_text("")
    (pkg_dir / "predict.py").write_text(_render())
    val = ImageFolderDataset(digits / "val", ImageTransform(IMAGE_SIZE))
    picks = [val.samples[i][0] for i in range(0, len(val.samples), len(val.samples) // 8)][:8]
    blocker = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['predict'] + sys.argv[1:]; "
        f"runpy.run_module('{PKG}.predict', run_name='__main__')"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            blocker,
            "--onnx",
            str(exported["dir"] / "model.onnx"),
            "--json",
            "--topk",
            "3",
            *map(str, picks),
        ],
        cwd=tmp_path,
        env=_env(tmp_path / "predict_src"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["image"] for r in results] == [str(p) for p in picks]

    model = import_package(package, PKG).Model().eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["ema"])
    transform = ImageTransform(IMAGE_SIZE)
    from scmc_runtime.data import _load_rgb

    with torch.no_grad():
        logits = model(torch.stack([transform(_load_rgb(p)) for p in picks]))["cls"]
    top2 = logits.topk(2, dim=1)
    for result, values, indices in zip(results, top2.values, top2.indices):
        assert len(result["topk"]) == 3
        assert result["topk"][0]["label"] == str(result["topk"][0]["index"])  # labels 0-9 from the ONNX metadata
        if float(values[0] - values[1]) > 1e-4:  # a near tie may go either way within float tolerance
            assert result["topk"][0]["index"] == int(indices[0])
    text = subprocess.run(
        [sys.executable, "-c", blocker, "--onnx", str(exported["dir"] / "model.onnx"), str(picks[0])],
        cwd=tmp_path,
        env=_env(tmp_path / "predict_src"),
        capture_output=True,
        text=True,
    )
    assert text.returncode == 0 and text.stdout.startswith(str(picks[0])) and "  1. " in text.stdout


# ------------------------------------------------------------------------------------------
# Untrusted files: exported archives, package metadata, labels (issues 17 and 19)


class _Canary:
    """A real pickle payload: unpickling it creates the file MARKER."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy the zip SRC to DST, member by member, with ``change(name, data)`` deciding each member's bytes."""
    import zipfile

    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info)))


@pytest.fixture(scope="session")
def small_exports(package: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model.pt2 and model.pt of the femto package (pt2 without aoti compiles no AOTInductor; no timing)."""
    out = tmp_path_factory.mktemp("small_exports")
    result = run_cli(
        str(package),
        "--checkpoint",
        str(checkpoint),
        "--format",
        "pt2,torchscript",
        "--latency-rounds",
        "0",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    return out


def test_pt2_alone_compiles_no_aoti_package(small_exports: Path) -> None:
    report = json.loads((small_exports / "export_report.json").read_text())
    assert {a["format"] for a in report["artifacts"]} == {"pt2", "torchscript"}
    assert not any(s["format"] == "aoti" for s in report["skipped"]), report["skipped"]
    assert not (small_exports / "model.aoti.pt2").exists()
    assert not any("AOTInductor" in w for w in report["warnings"])


def test_aoti_alone_keeps_no_pt2(package: Path, checkpoint: Path, tmp_path: Path) -> None:
    # the .pt2 AOTInductor compiles from is a staging file when pt2 was not asked for
    args = ["--format", "aoti", "--aoti-timeout", "1", "--latency-rounds", "0", "-o", str(tmp_path)]
    result = run_cli(str(package), "--checkpoint", str(checkpoint), *args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert {a["format"] for a in report["artifacts"]} <= {"aoti"}
    assert not (tmp_path / "model.pt2").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".scmc-export-")]


def _verify_only(package: Path, checkpoint: Path, folder: Path, fmt: str, *extra: str):
    return run_cli(
        str(package),
        "--checkpoint",
        str(checkpoint),
        "--format",
        fmt,
        "--no-aoti",
        "--verify-only",
        "--latency-rounds",
        "0",
        "-o",
        str(folder),
        *extra,
    )


def _pickled_weight(marker: Path):
    """A .pt2 member change: the first weight becomes `use_pickle` and its bytes a payload pickle."""
    import pickle

    state = {}

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("/weights/model_weights_config.json"):
            config = json.loads(data)
            fqn, entry = next(iter(config["config"].items()))
            entry["use_pickle"] = True
            state["member"] = entry["path_name"]
            return json.dumps(config).encode()
        return data

    def payload(name: str, data: bytes) -> bytes:
        if name.endswith(f"/weights/{state['member']}"):
            return pickle.dumps(_Canary(marker))
        return data

    return change, payload


def test_a_pt2_whose_weight_is_a_pickle_is_refused_by_verify_only_without_running_it(
    package: Path, checkpoint: Path, small_exports: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "canary"
    change, payload = _pickled_weight(marker)
    _rewrite_zip(small_exports / "model.pt2", tmp_path / "step.pt2", change)
    _rewrite_zip(tmp_path / "step.pt2", tmp_path / "bad" / "model.pt2", payload)

    result = _verify_only(package, checkpoint, tmp_path / "bad", "pt2")
    _assert_error(result, "E1113", str(tmp_path / "bad" / "model.pt2"), "refusing to load", "`io.open`", "--trust")
    assert not marker.exists()

    from scmc.diagnostics import CompileError
    from scmc.export import load_runner

    with pytest.raises(CompileError) as caught:  # the loader itself, as any caller of scmc.export uses it
        load_runner("pt2", tmp_path / "bad" / "model.pt2", ["image"], ["cls"])
    assert caught.value.diagnostics[0].code == "E1113" and not marker.exists()

    # The payload is real: torch.export.load itself runs it (in a child process, to keep this one clean).
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, torch\ntry: torch.export.load(sys.argv[1])\nexcept Exception: pass"]
        + [str(tmp_path / "bad" / "model.pt2")],
        capture_output=True,
        text=True,
        env=_env(ROOT),
        timeout=300,
    )
    assert marker.exists(), proc.stderr[-2000:]


def test_a_torchscript_file_whose_data_pkl_is_a_payload_is_refused_without_running_it(
    package: Path, checkpoint: Path, small_exports: Path, tmp_path: Path
) -> None:
    import pickle

    marker = tmp_path / "canary"
    bad = tmp_path / "bad" / "model.pt"
    _rewrite_zip(
        small_exports / "model.pt",
        bad,
        lambda name, data: pickle.dumps(_Canary(marker), protocol=2) if name.endswith("/data.pkl") else data,
    )
    _assert_error(_verify_only(package, checkpoint, bad.parent, "torchscript"), "E1113", str(bad), "data.pkl")
    assert not marker.exists()

    # A class the archive's TorchScript code does not define is refused too (it would be looked up, not compiled).
    other = tmp_path / "other" / "model.pt"

    def rename(name: str, data: bytes) -> bytes:
        return data.replace(b"__torch__.", b"__torch__.elsewhere.", 1) if name.endswith("/data.pkl") else data

    _rewrite_zip(small_exports / "model.pt", other, rename)
    _assert_error(_verify_only(package, checkpoint, other.parent, "torchscript"), "E1113", "__torch__.elsewhere")


def test_pt2_code_paths_beyond_pickles_are_refused(small_exports: Path, tmp_path: Path) -> None:
    """guards_code is exec'd, graph targets resolve through `torch.` attributes, sample inputs fall back to pickle."""
    import pickle

    from scmc.artifacts import ArtifactRefused, check_artifact

    marker = tmp_path / "canary"
    check_artifact("pt2", small_exports / "model.pt2")  # what scmc wrote passes
    check_artifact("torchscript", small_exports / "model.pt")

    def guards(name: str, data: bytes) -> bytes:
        if "/models/" in name and name.endswith(".json"):
            program = json.loads(data)
            program["guards_code"] = [f"__import__('os').system('touch {marker}')"]
            return json.dumps(program).encode()
        return data

    def target(name: str, data: bytes) -> bytes:
        if "/models/" in name and name.endswith(".json"):
            return data.replace(b'"torch.ops.aten.conv2d.default"', b'"torch.os.system"', 1)
        return data

    def sample_inputs(name: str, data: bytes) -> bytes:
        return pickle.dumps(_Canary(marker), protocol=0) if "/sample_inputs/" in name else data

    expected = {
        "guards": (guards, "guards_code"),
        "target": (target, "`torch.os.system`"),
        "sample_inputs": (sample_inputs, "sample_inputs"),
    }
    for case, (change, fragment) in expected.items():
        path = tmp_path / f"{case}.pt2"
        _rewrite_zip(small_exports / "model.pt2", path, change)
        with pytest.raises(ArtifactRefused) as caught:
            check_artifact("pt2", path)
        assert fragment in str(caught.value), (case, str(caught.value))
    assert not marker.exists()


def test_an_aoti_package_found_by_verify_only_is_refused(
    package: Path, checkpoint: Path, small_exports: Path, tmp_path: Path
) -> None:
    import shutil

    shutil.copy(small_exports / "model.pt2", tmp_path / "model.pt2")
    (tmp_path / "model.aoti.pt2").write_bytes((small_exports / "model.pt2").read_bytes())
    result = run_cli(
        str(package),
        "--checkpoint",
        str(checkpoint),
        "--format",
        "pt2,aoti",
        "--verify-only",
        "--latency-rounds",
        "0",
        "-o",
        str(tmp_path),
    )
    _assert_error(result, "E1113", "model.aoti.pt2", "native code")


def _copy_package(package: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(package, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.parametrize(
    "key, value, shown",
    [
        (("presets", "dataset", "image_size"), "32", "`presets.dataset.image_size`: input should be a valid integer"),
        (("presets", "dataset", "mean"), "0.5", "`presets.dataset.mean`: input should be a valid list"),
        (("input_shapes", "image", "shape"), [3, "224", 224], "`input_shapes.image.shape[1]`"),
        (("package",), 7, "`package`: input should be a valid string"),
    ],
)
def test_a_manifest_with_a_wrong_typed_value_names_the_file_and_key(
    package: Path, checkpoint: Path, tmp_path: Path, key, value, shown
) -> None:
    copy = _copy_package(package, tmp_path / PKG)
    path = copy / "src" / PKG / "manifest.json"
    manifest = json.loads(path.read_text())
    target = manifest
    for part in key[:-1]:
        target = target[part]
    target[key[-1]] = value
    path.write_text(json.dumps(manifest, indent=2))
    _assert_error(run_cli(str(copy), "--checkpoint", str(checkpoint)), "E1100", str(path), shown)


def test_a_checkpoint_config_with_wrong_types_names_the_file_and_key(
    package: Path, checkpoint: Path, tmp_path: Path
) -> None:
    import torch

    state = torch.load(checkpoint, weights_only=True)
    state["config"] = dict(state["config"], image_size="32", mean="imagenet")
    path = tmp_path / "typed.pt"
    torch.save(state, path)
    result = run_cli(str(package), "--checkpoint", str(path), "-o", str(tmp_path / "out"))
    _assert_error(result, "E1115", str(path), "`config.image_size`: input should be a valid integer", "`config.mean`")
    assert not (tmp_path / "out").exists()


def test_an_absurd_shape_is_refused_with_the_limit(package: Path, checkpoint: Path, tmp_path: Path) -> None:
    import time

    start = time.perf_counter()
    result = run_cli(str(package), "--checkpoint", str(checkpoint), "-s", "image=3,100000,100000", "-o", str(tmp_path))
    _assert_error(result, "E1114", "-s image=...", "30,000,000,000 values per sample", "--max-input-elements")
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "model.onnx").exists()


def _fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(path)
    return path


def test_a_fifo_as_labels_checkpoint_or_package_file_is_refused_at_once(
    package: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """Each would block the export forever if it were opened for reading; run as a command with a deadline."""

    def scmc_export(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "scmc", "export", *args, "--latency-rounds", "0"],
            cwd=ROOT,
            env=_env(ROOT, RUNTIME_SRC),
            capture_output=True,
            text=True,
            timeout=240,
        )

    labels = _fifo(tmp_path / "labels.txt")
    proc = scmc_export(str(package), "--checkpoint", str(checkpoint), "--labels", str(labels), "-o", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert f"error[E1110]: the labels file `{labels}` is not a regular file (a FIFO)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "model.onnx").exists()

    fifo_ckpt = _fifo(tmp_path / "last.pt")
    proc = scmc_export(str(package), "--checkpoint", str(fifo_ckpt))
    assert proc.returncode == 1 and "error[E1102]" in proc.stderr and "not a regular file (a FIFO)" in proc.stderr

    copy = _copy_package(package, tmp_path / PKG)
    _fifo(copy / "src" / PKG / "extra.py")
    proc = scmc_export(str(copy), "--checkpoint", str(checkpoint))
    assert proc.returncode == 1, proc.stderr
    assert f"`{PKG}/extra.py`: not a regular file (a FIFO)" in proc.stderr


def test_an_oversized_manifest_is_refused(package: Path, checkpoint: Path, tmp_path: Path) -> None:
    copy = _copy_package(package, tmp_path / PKG)
    path = copy / "src" / PKG / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["padding"] = "x" * (5 * 2**20)
    path.write_text(json.dumps(manifest))
    _assert_error(
        run_cli(str(copy), "--checkpoint", str(checkpoint)), "E1100", str(path), "over the limit of 4,194,304"
    )


# ------------------------------------------------------------------------------------------
# predict.py: user mistakes are one line naming the file; a pixel limit on inputs


def _tiny_onnx(path: Path, preprocess: dict | None = None) -> Path:
    """A real 3-class ONNX classifier (global average pool of the image), with scmc's metadata keys."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["cls"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("cls", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if preprocess is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "scmc.preprocess", json.dumps(preprocess)
    onnx.save(model, str(path))
    return path


def _predict(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "predict_cli.py"
    if not script.exists():
        script.write_text(_render())
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_predict_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    from PIL import Image

    model = _tiny_onnx(tmp_path / "model.onnx")
    image = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    ok = _predict(tmp_path, "--onnx", str(model), "--json", str(image))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["image"] == str(image)

    missing = tmp_path / "labels.txt"
    _one_line_error(_predict(tmp_path, "--onnx", str(model), "--labels", str(missing), str(image)), str(missing))
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model\n")
    _one_line_error(_predict(tmp_path, "--onnx", str(not_onnx), str(image)), str(not_onnx), "not an ONNX model")
    text = tmp_path / "photo.png"
    text.write_text("hello")
    _one_line_error(_predict(tmp_path, "--onnx", str(model), str(text)), str(text), "not an image")
    _one_line_error(_predict(tmp_path, "--onnx", str(model), str(tmp_path / "nope.png")), "nope.png", "cannot open")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.png"
        os.mkfifo(fifo)
        _one_line_error(_predict(tmp_path, "--onnx", str(model), str(fifo)), str(fifo), "not a regular file")
        labels_fifo = tmp_path / "labels.fifo"
        os.mkfifo(labels_fifo)
        _one_line_error(
            _predict(tmp_path, "--onnx", str(model), "--labels", str(labels_fifo), str(image)), str(labels_fifo)
        )


def test_predict_refuses_wrong_typed_metadata_naming_the_key(tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(image)
    bad_size = _tiny_onnx(tmp_path / "size.onnx", {"image_size": "big", "mean": [0.5] * 3, "std": [0.5] * 3})
    _one_line_error(
        _predict(tmp_path, "--onnx", str(bad_size), str(image)), str(bad_size), "scmc.preprocess.image_size"
    )
    bad_mean = _tiny_onnx(tmp_path / "mean.onnx", {"image_size": 8, "mean": "imagenet"})
    _one_line_error(_predict(tmp_path, "--onnx", str(bad_mean), str(image)), str(bad_mean), "scmc.preprocess.mean")
    huge = _tiny_onnx(tmp_path / "huge.onnx", {"image_size": 100_000})
    _one_line_error(_predict(tmp_path, "--onnx", str(huge), str(image)), str(huge), "over the limit")


def test_predict_refuses_an_image_over_the_pixel_limit_before_decoding_it(tmp_path: Path) -> None:
    """121 megapixels (under Pillow's own bomb limit of 179) is refused from the header, in well under a second."""
    import time

    from PIL import Image

    model = _tiny_onnx(tmp_path / "model.onnx")
    big = tmp_path / "big.png"
    Image.new("1", (11_000, 11_000)).save(big)  # 1 bit per pixel: small to write, 121 MP to decode
    start = time.perf_counter()
    line = _one_line_error(_predict(tmp_path, "--onnx", str(model), str(big)), str(big), "11000x11000")
    assert "over the limit of 50,000,000" in line and "--max-pixels" in line
    assert time.perf_counter() - start < 30  # the interpreter, numpy and onnxruntime start; nothing is decoded

    medium = tmp_path / "medium.png"
    Image.new("RGB", (1200, 1000)).save(medium)
    _one_line_error(_predict(tmp_path, "--onnx", str(model), "--max-pixels", "1000000", str(medium)), "over the limit")
    raised = _predict(tmp_path, "--onnx", str(model), "--max-pixels", "2000000", "--json", str(medium))
    assert raised.returncode == 0, raised.stderr


def test_trust_artifact_loads_a_file_the_check_refuses(
    package: Path, checkpoint: Path, small_exports: Path, tmp_path: Path
) -> None:
    """A harmless extra member that looks like a native library: refused by default, loaded on request."""
    import zipfile

    path = tmp_path / "model.pt"
    path.write_bytes((small_exports / "model.pt").read_bytes())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("model/extra/helper.so", b"\x7fELF not really")
    _assert_error(_verify_only(package, checkpoint, tmp_path, "torchscript"), "E1113", "helper.so", "native library")
    trusted = _verify_only(package, checkpoint, tmp_path, "torchscript", "--trust-artifact")
    assert trusted.exit_code == 0, trusted.output
    assert "parity: ok" in trusted.output


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_the_pickle_scan_finds_imports_in_every_protocol(protocol: int, tmp_path: Path) -> None:
    import collections
    import pickle

    from scmc.artifacts import pickle_imports

    payload = pickle.dumps([_Canary(tmp_path / "m"), collections.OrderedDict(a=1)], protocol=protocol)
    found = list(pickle_imports(payload))
    assert ("io", "open") in found and ("collections", "OrderedDict") in found
    assert list(pickle_imports(pickle.dumps({"a": [1, 2.0, "x", None]}, protocol=protocol))) == []
    assert not (tmp_path / "m").exists()


def test_the_pickle_scan_refuses_what_it_cannot_read_off_the_bytes() -> None:
    import pickle

    from scmc.artifacts import ArtifactRefused, _Policy, _tensor_format_objects, pickle_imports, scan_pickle

    # STACK_GLOBAL whose module comes from a computed value, and an import by extension code.
    computed = b"\x80\x04" + b"\x8c\x02os" + b"\x8c\x06system" + b"\x86" + b"0" + b"\x8c\x02os\x8c\x06system\x93."
    assert list(pickle_imports(computed)) == [("os", "system")]  # plain strings are read
    dup = b"\x80\x04\x8c\x02os\x8c\x06system2\x93."  # DUP: the name is a copy, not a push the scan saw
    with pytest.raises(ValueError):
        list(pickle_imports(dup))
    with pytest.raises(ValueError):
        list(pickle_imports(b"\x80\x02\x82\x01."))  # EXT1
    exact, by_kind = _tensor_format_objects()
    import torch

    scan_pickle(pickle.dumps(torch.float32), "dtype", _Policy(exact, by_kind))  # torch's format passes
    with pytest.raises(ArtifactRefused, match="`torch.load`"):
        scan_pickle(b"ctorch\nload\n.", "m", _Policy(exact, by_kind))  # torch.* is judged by what it is
    with pytest.raises(ArtifactRefused, match="not a pickle"):
        scan_pickle(b"\x80\x04\x95garbage", "m", _Policy(exact, by_kind))


def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from scmc.artifacts import ArtifactRefused, check_artifact

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [weight],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ArtifactRefused, match="outside the model's folder"):
        check_artifact("onnx", path)
    check_artifact("onnx", _tiny_onnx(tmp_path / "tiny.onnx"))
