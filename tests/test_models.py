"""The generated ConvNeXtV2 is timm's ConvNeXtV2: sizes, weights, outputs, script and export."""

from __future__ import annotations

import ast
import warnings

import pytest
import torch

from scmc.addresses import AllowList
from scmc.build import BuildRequest, Part, plan_package

# timm's convnextv2_<group> parameter counts (num_classes=1000)
TIMM_COUNTS = {
    "atto": 3_708_400,
    "femto": 5_233_240,
    "pico": 9_066_280,
    "nano": 15_623_800,
    "tiny": 28_635_496,
    "small": 50_318_440,
    "base": 88_717_800,
    "large": 197_956_840,
    "huge": 660_289_640,
}


def compiled_model_source(group: str) -> str:
    request = BuildRequest(
        parts=[Part("model", __import__("pathlib").Path("cfg/models/ConvNeXtV2.yaml"), "Model")],
        params=[f"backbone={group}"],
        presets=False,  # the model alone: 1000 classes, as timm's
    )
    plan = plan_package(request)
    return next(text.decode() for path, text in plan.files.items() if path.endswith("/model.py"))


def construct_on_meta(source: str, device: str = "meta") -> torch.nn.Module:
    """Execute generated model source (our own output, not template text) and build Model on DEVICE."""
    namespace: dict = {}
    code = compile(source, "<generated model.py>", "exec")
    exec(code, namespace)  # noqa: S102 - running the compiler's own output under test
    with torch.device(device):
        return namespace["Model"]()


@pytest.mark.parametrize("group", list(TIMM_COUNTS))
def test_every_group_has_exactly_timms_parameter_count_right_after_construction(group: str) -> None:
    model = construct_on_meta(compiled_model_source(group))
    assert sum(p.numel() for p in model.parameters()) == TIMM_COUNTS[group]
    assert not any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in model.parameters())


def test_timm_femto_weights_copied_in_order_give_the_same_outputs(femto) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = femto.Model().eval()
    reference = timm.create_model("convnextv2_femto", pretrained=False).eval()
    ours_params, ref_params = list(ours.parameters()), list(reference.parameters())
    assert len(ours_params) == len(ref_params)
    with torch.no_grad():
        for mine, theirs in zip(ours_params, ref_params):
            assert mine.numel() == theirs.numel()
            mine.copy_(theirs.reshape(mine.shape))
        for mine, theirs in zip(ours.buffers(), reference.buffers()):
            mine.copy_(theirs.reshape(mine.shape))
        x = torch.randn(2, 3, 224, 224)
        diff = (ours(x)["cls"] - reference(x)).abs().max().item()
    assert diff < 1e-5


def test_state_dict_loads_without_a_dummy_forward(femto) -> None:
    first, second = femto.Model(), femto.Model()
    second.load_state_dict(first.state_dict())
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_generated_code_is_concrete_and_plain(femto_package) -> None:
    for name in ("model.py", "loss.py", "metric.py"):
        source = (femto_package / "src" / "convnextv2_femto" / name).read_text()
        tree = ast.parse(source)
        assert "Lazy" not in source
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported <= {"torch", "timm", "scmc_runtime", "typing"}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "forward":
                assert node.args.kwarg is None and node.args.vararg is None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"eval", "exec", "compile", "__import__", "getattr"}
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not names & {"yaml", "jinja2", "structcast", "ruamel"}


def test_torch_jit_script_runs_and_matches_eager(femto) -> None:
    model = femto.Model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(x)["cls"], model(x)["cls"], atol=1e-6)


def test_torch_export_export_succeeds_with_a_dynamic_batch(femto) -> None:
    model = femto.Model().eval()
    x = torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes={"image": {0: batch}})
    y = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(program.module()(y)["cls"], model(y)["cls"], atol=1e-5)


def test_training_mode_forward_and_backward_reach_every_parameter(femto) -> None:
    model, loss, metric = femto.Model(), femto.Loss(), femto.Metric()
    x, label = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    out = model(x)
    value = loss(label, out["cls"])
    value.backward()
    assert all(p.grad is not None for p in model.parameters())
    acc1, acc5 = metric(label, out["cls"])
    assert 0.0 <= acc1.item() <= acc5.item() <= 1.0


def test_identical_blocks_share_one_class_with_lifted_constants(femto_package) -> None:
    source = (femto_package / "src" / "convnextv2_femto" / "model.py").read_text()
    assert source.count("class Block(") == 1
    assert "def __init__(self, fout: int) -> None:" in source
    assert "self.blocks3 = torch.nn.Sequential(*[Block(fout=384) for _ in range(2)])" in source
    assert "torch.nn.Linear(in_features=fout, out_features=fout * 4, bias=True)" in source


def test_drop_path_rate_becomes_a_typed_constructor_argument(tmp_path) -> None:
    from tests.conftest import build_package

    out = build_package(
        tmp_path / "p",
        "cfg/models/ConvNeXtV2.yaml",
        "-p",
        "backbone=atto",
        "-p",
        "drop_path_rate=0.1",
        "-p",
        "num_classes=10",
    )
    source = (out / "src" / "convnextv2_atto" / "model.py").read_text()
    assert "def __init__(self, fout: int, drop_path: float) -> None:" in source
    assert "self.drop_path = DropPath(rate=drop_path)" in source
    assert "self.blocks3 = torch.nn.Sequential(" in source and "Block(fout=320, drop_path=0.1)" in source


def test_the_allow_list_default_admits_the_reference_templates() -> None:
    allow = AllowList()
    assert "timm" in allow.all_roots() and "scmc_runtime" in allow.all_roots()
