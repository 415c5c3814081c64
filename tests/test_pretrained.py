"""Fine-tuning: --init-from and <pkg>.load_pretrained map timm, torchvision, safetensors and scmc weights
into a generated model, or refuse with a table and load nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from scmc_runtime.checkpoint import load_checkpoint
from scmc_runtime.pretrained import PretrainedError, head_names, read_weights
from tests.conftest import ROOT, import_package
from tests.train_support import run_many
from tests.tune_support import PACKAGE, import_model, train_args, tuned_run

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    return tuned_run(tmp_path_factory)


@pytest.fixture(scope="module")
def pkg(run):
    return import_model(run.package)


def timm_atto(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights tune_support saved
    return timm.create_model("convnextv2_atto", pretrained=False, num_classes=num_classes).eval()


def outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(images)
    return out[next(iter(out))] if isinstance(out, dict) else out


def test_timm_convnextv2_atto_weights_give_timms_outputs_within_1e_5(run, pkg) -> None:
    reference = timm_atto()
    model = pkg.Model()
    mapping = pkg.load_pretrained(model, run.timm_weights)
    # timm names its layers stages.0.blocks.0..., the generated model backbone.block0...: paired by order,
    # timm's 1x1-convolution MLP weights [out, in, 1, 1] into the generated Linear layers [out, in].
    assert mapping.how == "order" and len(mapping.pairs) == len(model.state_dict()) == 140
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(outputs(model, images), outputs(reference, images), atol=1e-5, rtol=0)


def test_safetensors_weights_load_by_name_and_unordered_ones_are_refused(run, pkg, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    reference = timm_atto()
    source = pkg.Model()
    pkg.load_pretrained(source, run.timm_weights)
    path = tmp_path / "atto.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = pkg.Model()
    assert pkg.load_pretrained(model, path).how == "name"
    images = torch.randn(1, 3, 32, 32)
    assert torch.allclose(outputs(model, images), outputs(reference, images), atol=1e-5, rtol=0)
    # timm's names: safetensors keeps no order, so there is nothing to pair them by.
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(timm_file))
    with pytest.raises(PretrainedError, match="not in the file, which keeps no order to pair by"):
        pkg.load_pretrained(pkg.Model(), timm_file)


def test_train_py_init_from_starts_from_the_checkpoint_weights(run, pkg) -> None:
    assert f"initialized 140 tensors from {run.timm_weights} (matched by order)" in run.result.stdout
    # --lr 0 --warmup-epochs 0: two AdamW updates of at most 1e-6; random weights differ by ~1e-2.
    trained = load_checkpoint(run.run_dir / "best.pt")["model"]
    expected = pkg.Model().state_dict()
    pkg.load_pretrained(pkg.Model(), run.timm_weights)  # the file still maps
    reference = {k: v for k, v in zip(expected, timm_atto().state_dict().values())}
    worst = max((trained[k] - reference[k].reshape(trained[k].shape)).abs().max().item() for k in trained)
    assert worst < 1e-5


def test_a_scmc_checkpoint_loads_by_name(run, pkg) -> None:
    model = pkg.Model()
    mapping = pkg.load_pretrained(model, run.run_dir / "best.pt")
    assert mapping.how == "name" and len(mapping.pairs) == 140
    trained = load_checkpoint(run.run_dir / "best.pt")["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


def test_torchvision_resnet18_state_dict_loads_into_the_resnet_package(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    resnet = import_package(ROOT / "tests" / "golden" / "resnet18_digits", "resnet18_digits")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # running statistics that are not the defaults, to see that they are copied
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = resnet.Model()
    mapping = resnet.load_pretrained(model, path)
    assert mapping.how == "order" and not mapping.kept and not mapping.skipped  # BN counters paired too
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(outputs(model, images), outputs(reference, images), atol=1e-5, rtol=0)
    assert int(model.state_dict()["bn1.num_batches_tracked"]) == 7


def test_reset_head_keeps_the_models_classifier_for_another_class_count(run, pkg, tmp_path: Path) -> None:
    path = tmp_path / "atto1000.pth"
    reference = timm_atto(num_classes=1000)
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)  # as timm's train.py saves
    model = pkg.Model()
    with pytest.raises(PretrainedError) as refused:
        pkg.load_pretrained(model, path)
    assert "head.fc.weight" in str(refused.value) and "[1000, 320]" in str(refused.value)
    assert "(another class count), pass reset_head (train.py: --reset-head)" in str(refused.value)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mapping = pkg.load_pretrained(model, path, reset_head=True)
    assert mapping.kept == tuple(head_names(model)) and len(mapping.kept) == 2  # the last Linear's weight and bias
    assert mapping.skipped == ("head.fc.weight", "head.fc.bias")  # timm's 1000-class classifier
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in mapping.kept)
    stem = next(iter(model.state_dict()))
    assert torch.equal(model.state_dict()[stem], reference.state_dict()["stem.0.weight"])


def test_a_mismatched_checkpoint_is_refused_with_a_table_and_nothing_is_loaded(pkg, tmp_path: Path) -> None:
    torch.manual_seed(1)
    femto = timm.create_model("convnextv2_femto", pretrained=False, num_classes=10)
    path = tmp_path / "femto.pth"
    torch.save(femto.state_dict(), path)
    model = pkg.Model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError) as refused:
        pkg.load_pretrained(model, path)
    text = str(refused.value)
    assert text.startswith(f"{path} does not map onto the model (matched by order;")
    assert "nothing was loaded" in text
    header = text.splitlines()[1].split()
    assert header == ["generated", "name", "checkpoint", "name", "generated", "shape", "checkpoint", "shape", "why"]
    assert re.search(
        r"\n  backbone\.stem\.conv\.weight +stem\.0\.weight +\[40, 3, 4, 4\] +\[48, 3, 4, 4\] +shapes differ", text
    )
    assert "shapes differ at this position" in text
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_untrusted_files_are_refused_before_use(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    pickled = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "x": Payload()}, pickled)
    with pytest.raises(PretrainedError, match="holds Python objects"):
        read_weights(pickled)
    notes = tmp_path / "notes.pth"
    torch.save({"weight": torch.zeros(1), "note": "hello"}, notes)
    with pytest.raises(PretrainedError, match="neither a state dict nor a checkpoint"):
        read_weights(notes)
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(PretrainedError, match="not a readable .safetensors file"):
        read_weights(tmp_path / "broken.safetensors")
    with pytest.raises(PretrainedError, match="more than the 10 a weights file may have"):
        read_weights(notes, max_bytes=10)


def test_train_py_refuses_a_mismatched_init_from_with_the_table_and_exit_1(run, tmp_path: Path) -> None:
    torch.manual_seed(1)
    path = tmp_path / "femto.pth"
    torch.save(timm.create_model("convnextv2_femto", pretrained=False, num_classes=10).state_dict(), path)
    out = tmp_path / "runs"
    cases = [
        train_args(out, run.cache, "--init-from", str(path)),
        train_args(out, run.cache, "--reset-head"),
        train_args(out, run.cache, "--init-from", str(tmp_path / "missing.pth")),
    ]
    mismatch, reset_alone, missing = run_many(run.package, cases, cwd=tmp_path)
    prog = f"python -m {PACKAGE}.train"
    assert mismatch["code"] == 1 and "Traceback" not in mismatch["stderr"]
    assert mismatch["stderr"].startswith(f"{prog}: error: --init-from: {path} does not map onto the model")
    assert "generated name" in mismatch["stderr"] and "shapes differ at this position" in mismatch["stderr"]
    assert reset_alone == {
        "code": 2,
        "stderr": f"{prog}: error: --reset-head: only with --init-from (it keeps this model's classifier "
        "instead of the file's)\n",
    }
    assert missing["code"] == 2 and f"--init-from {tmp_path / 'missing.pth'}: no such file" in missing["stderr"]
    assert not (out / PACKAGE).exists()
