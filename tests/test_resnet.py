"""The generated ResNets are torchvision's: sizes right after construction, and outputs with its weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scmc.build import BuildRequest, Part, plan_package
from tests.conftest import build_package, import_package
from tests.test_models import construct_on_meta

TEMPLATE = Path("cfg/models/ResNet.yaml")

# torchvision.models.resnet<depth>() parameter counts (num_classes=1000)
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def model_source(group: str, *params: str) -> str:
    request = BuildRequest(parts=[Part("model", TEMPLATE, "Model")], params=[f"backbone={group}", *params])
    plan = plan_package(request)
    return next(text.decode() for path, text in plan.files.items() if path.endswith("/model.py"))


@pytest.mark.parametrize("group", list(TORCHVISION_COUNTS))
def test_every_depth_has_exactly_torchvisions_parameter_count_right_after_construction(group: str) -> None:
    model = construct_on_meta(model_source(group))
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_COUNTS[group]
    assert not any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in model.parameters())


@pytest.mark.parametrize("group", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_weights_copied_in_order_give_the_same_outputs(group: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = getattr(torchvision.models, group)(weights=None).eval()
    ours = construct_on_meta(model_source(group), device="cpu").eval()
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert len(ours_state) == len(ref_state)
    with torch.no_grad():
        # the same tensors in the same order (running stats and num_batches_tracked included)
        for (mine_key, mine), (ref_key, theirs) in zip(ours_state.items(), ref_state.items()):
            assert mine.shape == theirs.shape, (mine_key, ref_key)
            assert mine_key.rsplit(".", 1)[-1] == ref_key.rsplit(".", 1)[-1], (mine_key, ref_key)
        ours.load_state_dict(dict(zip(ours_state, ref_state.values())))
        x = torch.randn(2, 3, 96, 96)
        diff = (ours(x)["cls"] - reference(x)).abs().max().item()
    assert diff < 1e-5


def test_the_class_count_is_a_parameter() -> None:
    model = construct_on_meta(model_source("resnet18", "num_classes=10"))
    assert model.fc.out_features == 10
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_COUNTS["resnet18"] - 990 * 513


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("resnet") / "resnet18"
    build_package(out, str(TEMPLATE), "-p", "backbone=resnet18", "-p", "num_classes=10", name="resnet18_digits")
    return import_package(out, "resnet18_digits")


def test_resnet18_package_scripts_exports_and_trains_a_step(resnet18) -> None:
    torch.manual_seed(0)
    model = resnet18.Model()
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        eager = model(x)["cls"]
        scripted = torch.jit.script(model)(x)["cls"]
    assert torch.allclose(eager, scripted, atol=1e-5)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes={"image": {0: batch}})
    with torch.no_grad():
        y = torch.randn(3, 3, 64, 64)
        assert torch.allclose(exported.module()(y)["cls"], model(y)["cls"], atol=1e-5)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x)["cls"], torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_resnet18_package_trains_with_its_sgd_backward_on_the_digits(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    pytest.importorskip("sklearn")
    import math
    import subprocess
    import sys

    from tests.test_train import COMMON, records
    from tests.train_support import python_env

    package = build_package(
        tmp_path / "resnet18_train",
        str(TEMPLATE),
        "-p",
        "backbone=resnet18",
        "-p",
        "num_classes=10",
        name="resnet18_train",
    )
    backward = (package / "src" / "resnet18_train" / "backward.py").read_text()
    assert "sgd" in backward
    out = tmp_path / "runs"
    command = [
        sys.executable,
        "-m",
        "resnet18_train.train",
        *COMMON,
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "data"),
        "--epochs",
        "1",
        "--max-steps",
        "3",
    ]
    result = subprocess.run(command, env=python_env(package), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [run_dir] = list(out.iterdir())
    steps = records(run_dir, "step")
    assert len(steps) == 3
    assert all(math.isfinite(step["train_step_ce_loss"]) for step in steps)
    assert (run_dir / "last.pt").is_file()
