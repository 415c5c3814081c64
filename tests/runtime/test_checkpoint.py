"""Checkpoints: weights-only round trip, atomic writes, clear errors, latest lookup, RNG state."""

import os
import random
import stat
from pathlib import Path

import numpy
import pytest
import torch
from torch import nn

from scmc_runtime.checkpoint import (
    RESUME_KEYS,
    CheckpointError,
    check_checkpoint,
    find_latest,
    load_checkpoint,
    load_weights,
    model_signature,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from scmc_runtime.ema import ModelEma


def _training_state() -> dict:
    """Everything train.py saves, after one real optimizer step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ema = ModelEma(model, decay=0.9, use_timm=False)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    ema.update(model, step=1)
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict(),
        "epoch": 3,
        "step": 120,
        "sampler": {"epoch": 3, "batches_done": 7},
        "rng": [rng_state()],
        "config": {"lr": 1e-3, "name": "digits", "betas": (0.9, 0.999), "compile": None},
    }


def _assert_same(actual, expected, where="state"):
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def test_full_training_state_round_trips_through_a_weights_only_load(tmp_path):
    state = _training_state()
    path = save_checkpoint(tmp_path / "ckpt" / "step-00000120.pt", state)
    assert path.is_file()
    _assert_same(torch.load(path, weights_only=True), state)
    _assert_same(load_checkpoint(path), state)


def test_unsupported_values_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match=r"state\['config'\]\['out'\].*PosixPath"):
        save_checkpoint(tmp_path / "c.pt", {"config": {"out": Path("/tmp")}})
    assert list(tmp_path.iterdir()) == []


def test_a_writer_dying_mid_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def dies_halfway(obj, handle):
        real_save(obj, handle)
        handle.truncate(100)
        raise KeyboardInterrupt  # e.g. Ctrl-C while writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(1000)})
    assert [entry.name for entry in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path) == {"step": 1}


def test_a_truncated_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "cut.pt", {"weights": torch.randn(256)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == f"{path}: the checkpoint is truncated (an interrupted write or copy)"


def test_garbage_and_empty_files_raise_checkpoint_error(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 20)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("garbage.pt", "empty.pt"):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(tmp_path / name)
        assert str(caught.value) == f"{tmp_path / name}: not a checkpoint (not a torch.save archive)"


def test_a_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


class _Custom:
    pass


def test_a_checkpoint_holding_arbitrary_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"obj": _Custom()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == (
        f"{path}: the checkpoint holds Python objects (test_checkpoint._Custom); only tensors and plain "
        "values are loaded (weights_only), so it is refused"
    )
    assert "\n" not in str(caught.value)


def test_find_latest_returns_the_newest_complete_checkpoint(tmp_path):
    assert find_latest(tmp_path / "missing") is None
    assert find_latest(tmp_path) is None
    old = save_checkpoint(tmp_path / "step-00000100.pt", {"step": 100})
    new = save_checkpoint(tmp_path / "step-00000200.pt", {"step": 200})
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    os.utime(new, ns=(2_000_000_000, 2_000_000_000))
    assert find_latest(tmp_path) == new

    # newer, but a leftover temp file of a killed writer and a truncated file: both ignored
    (tmp_path / ".step-00000300.pt.abc123.tmp").write_bytes(new.read_bytes())
    truncated = tmp_path / "step-00000300.pt"
    truncated.write_bytes(new.read_bytes()[:50])
    assert find_latest(tmp_path) == new


def test_equal_modification_times_fall_back_to_name_order(tmp_path):
    first = save_checkpoint(tmp_path / "step-00000100.pt", {})
    second = save_checkpoint(tmp_path / "step-00000200.pt", {})
    for path in (first, second):
        os.utime(path, ns=(5, 5))
    assert find_latest(tmp_path) == second


def test_unwrap_strips_data_parallel_and_compile_prefixes():
    model = nn.Linear(2, 2)
    assert unwrap(model) is model
    wrapped = torch.compile(nn.DataParallel(model))
    assert any(key.startswith("_orig_mod.module.") for key in wrapped.state_dict())
    assert unwrap(wrapped) is model
    assert list(unwrap(wrapped).state_dict()) == ["weight", "bias"]


def test_a_module_with_its_own_module_attribute_is_not_mistaken_for_a_wrapper():
    ema = ModelEma(nn.Linear(2, 2), use_timm=False)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = ema.module

    holder = Holder()
    assert unwrap(holder) is holder


def _draw():
    return random.random(), random.gauss(0, 1), torch.rand(3).tolist(), numpy.random.rand(2).tolist()


def test_rng_state_restores_python_torch_and_numpy_streams(tmp_path):
    random.gauss(0, 1)  # leave a cached gaussian in python's state
    state = rng_state()
    expected = _draw()
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    _draw()
    set_rng_state(load_checkpoint(path)["rng"])
    assert _draw() == expected


def test_checkpoints_are_written_with_the_permissions_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "open.pt", {"step": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        path = save_checkpoint(tmp_path / "private.pt", {"step": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_the_model_signature_depends_on_names_shapes_and_dtypes_not_values():
    small, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert model_signature(small.state_dict()) == model_signature(other.state_dict())
    assert model_signature(small.state_dict()) != model_signature(torch.nn.Linear(4, 2).state_dict())
    assert model_signature(small.state_dict()) != model_signature(torch.nn.Linear(3, 2).double().state_dict())
    assert len(model_signature(small.state_dict())) == 16


@pytest.mark.parametrize(
    "state, require, message",
    [
        (
            {"format": 99, "model": {}},
            ("model",),
            "checkpoint format 99 is newer than this scmc-runtime reads (2); " "upgrade scmc-runtime",
        ),
        ({"package": "other", "model": {}}, ("model",), "a checkpoint of package other, not of pkg"),
        (
            {"package": "pkg", "model": {}},
            RESUME_KEYS,
            "the checkpoint has no backward, epoch, step_in_epoch, "
            "global_step, best, rng (best.pt holds weights only: resume from last.pt)",
        ),
        ({"model": [1, 2]}, ("model",), "the checkpoint's model entry is not a dict of tensors"),
        (
            {"model": torch.nn.Linear(4, 2).state_dict()},
            ("model",),
            "the checkpoint's model does not fit this "
            "package's model (signature {found}, expected {expected}: weight is [2, 4] there, [2, 3] here)",
        ),
    ],
)
def test_check_checkpoint_names_the_first_mismatch_in_one_line(state, require, message):
    expected = torch.nn.Linear(3, 2).state_dict()
    text = message.format(
        found=model_signature(state["model"]) if isinstance(state["model"], dict) else "",
        expected=model_signature(expected),
    )
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint(state, "ck.pt", package="pkg", model=expected, require=require)
    assert str(caught.value) == f"ck.pt: {text}"


def test_load_weights_takes_the_ema_weights_unless_asked_for_the_raw_ones(tmp_path):
    raw, averaged = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    path = save_checkpoint(
        tmp_path / "best.pt", {"format": 1, "package": "pkg", "model": raw.state_dict(), "ema": averaged.state_dict()}
    )
    model = load_weights(path, torch.nn.Linear(3, 2), package="pkg")
    assert torch.equal(model.weight, averaged.weight) and not model.training
    model = load_weights(path, torch.nn.Linear(3, 2), package="pkg", ema=False)
    assert torch.equal(model.weight, raw.weight)
    with pytest.raises(CheckpointError, match="a checkpoint of package pkg, not of other"):
        load_weights(path, torch.nn.Linear(3, 2), package="other")
