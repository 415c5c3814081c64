"""The generated ViT is timm's: sizes right after construction, outputs with its weights, other image sizes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scmc.build import BuildRequest, Part, plan_package
from tests.conftest import build_package, import_package
from tests.test_models import construct_on_meta

TEMPLATE = Path("cfg/models/ViT.yaml")

# timm's vit_<size>_patch16_224 parameter counts (num_classes=1000)
TIMM_COUNTS = {"tiny": 5_717_416, "small": 22_050_664, "base": 86_567_656}


def model_source(group: str, *params: str) -> str:
    request = BuildRequest(parts=[Part("model", TEMPLATE, "Model")], params=[f"backbone={group}", *params])
    plan = plan_package(request)
    return next(text.decode() for path, text in plan.files.items() if path.endswith("/model.py"))


@pytest.mark.parametrize("group", list(TIMM_COUNTS))
def test_every_size_has_exactly_timms_parameter_count_right_after_construction(group: str) -> None:
    model = construct_on_meta(model_source(group))
    assert sum(p.numel() for p in model.parameters()) == TIMM_COUNTS[group]


@pytest.fixture(scope="module")
def vit_tiny(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("vit") / "vit_tiny_ref"
    build_package(out, str(TEMPLATE), "-p", "backbone=tiny", name="vit_tiny_ref")
    return import_package(out, "vit_tiny_ref")


def copy_timm_weights(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    """timm keeps cls_token and pos_embed before patch_embed; every other tensor is in the same order."""
    theirs = dict(reference.state_dict())
    order = [k for k in theirs if k.startswith("patch_embed.")] + ["cls_token", "pos_embed"]
    order += [k for k in theirs if k not in order]
    mine = ours.state_dict()
    assert len(mine) == len(order)
    state = {}
    for (key, value), ref_key in zip(mine.items(), order):
        assert value.shape == theirs[ref_key].shape, (key, ref_key)
        state[key] = theirs[ref_key]
    ours.load_state_dict(state)


def test_timm_vit_tiny_weights_give_the_same_outputs_at_224_and_at_another_size(vit_tiny) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    ours = vit_tiny.Model().eval()
    copy_timm_weights(ours, reference)
    with torch.no_grad():
        for size in (224, 160):
            x = torch.randn(2, 3, size, size)
            diff = (ours(x)["cls"] - reference(x)).abs().max().item()
            assert diff < 1e-5, (size, diff)


def test_a_non_square_token_grid_is_refused_with_a_message(vit_tiny) -> None:
    model = vit_tiny.Model().eval()
    with pytest.raises(ValueError, match="do not form a square grid"), torch.no_grad():
        model(torch.randn(1, 3, 224, 160))


def test_vit_tiny_scripts_and_exports_with_a_dynamic_batch(vit_tiny) -> None:
    torch.manual_seed(0)
    model = vit_tiny.Model().eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        eager = model(x)["cls"]
        assert torch.allclose(torch.jit.script(model)(x)["cls"], eager, atol=1e-5)
        batch = torch.export.Dim("batch", min=1, max=64)
        exported = torch.export.export(model, (x,), dynamic_shapes={"image": {0: batch}})
        y = torch.randn(3, 3, 224, 224)
        assert torch.allclose(exported.module()(y)["cls"], model(y)["cls"], atol=1e-5)


def test_drop_path_appears_only_when_its_rate_is_positive() -> None:
    assert "DropPath" not in model_source("tiny")
    source = model_source("tiny", "drop_path_rate=0.1")
    assert "timm.layers.DropPath(drop_prob=drop_path)" in source  # one class, the rate a typed argument
    assert "self.blocks = torch.nn.Sequential(" in source  # one stage, whatever classes dedup made
    assert "Block()," in source and "Block2(drop_path=0.1)" in source


@pytest.mark.slow
def test_vit_tiny_package_trains_on_the_digits_at_another_image_size(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    pytest.importorskip("sklearn")
    from tests.test_train import COMMON, records
    from tests.train_support import python_env

    package = build_package(tmp_path / "vit_train", str(TEMPLATE), "-p", "num_classes=10", name="vit_train")
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "vit_train.train", *COMMON, "--out", str(out), "--cache-dir", str(tmp_path)]
    command += ["--epochs", "1", "--max-steps", "3"]
    result = subprocess.run(command, env=python_env(package), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [run_dir] = list(out.iterdir())
    steps = records(run_dir, "step")
    assert len(steps) == 3 and all(math.isfinite(step["train_step_ce_loss"]) for step in steps)
