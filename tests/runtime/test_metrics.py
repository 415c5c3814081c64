"""MetricAccumulator: batch-size-weighted means, no host sync per step (2-rank case: test_distributed)."""

import math

import pytest
import torch

from scmc_runtime.metrics import MetricAccumulator


def test_compute_returns_means_weighted_by_batch_size():
    metrics = MetricAccumulator()
    metrics.update({"loss": torch.tensor(2.0), "top1": torch.tensor(0.5)}, n=30)
    metrics.update({"loss": torch.tensor(4.0), "top1": torch.tensor(1.0)}, n=10)
    assert metrics.compute() == {"loss": pytest.approx(2.5), "top1": pytest.approx(0.625)}


def test_update_never_copies_a_value_to_the_host(monkeypatch):
    metrics = MetricAccumulator()
    loss = torch.tensor(1.5, requires_grad=True) * 2

    def no_sync(*args, **kwargs):
        raise AssertionError("update() synchronized with the device")

    for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    for _ in range(3):
        metrics.update({"loss": loss}, n=4)
    monkeypatch.undo()
    assert metrics.compute() == {"loss": 3.0}


def test_sums_stay_on_the_device_of_the_values_in_double_precision():
    metrics = MetricAccumulator()
    metrics.update({"loss": torch.tensor(1.0, dtype=torch.bfloat16)}, n=1)
    assert metrics.device == torch.device("cpu")
    assert metrics._sums["loss"].dtype == torch.float64


def test_many_small_values_accumulate_without_float32_drift():
    metrics = MetricAccumulator()
    for _ in range(10_000):
        metrics.update({"loss": torch.tensor(0.1)}, n=1)
    assert math.isclose(metrics.compute()["loss"], float(torch.tensor(0.1)), rel_tol=1e-12)


def test_python_numbers_are_accepted_and_names_may_appear_later():
    metrics = MetricAccumulator()
    metrics.update({"loss": 1.0}, n=2)
    metrics.update({"loss": 4.0, "grad_norm": 3}, n=1)
    assert metrics.compute() == {"grad_norm": 3.0, "loss": 2.0}


def test_reset_starts_a_new_epoch_and_an_empty_accumulator_computes_nothing():
    metrics = MetricAccumulator()
    metrics.update({"loss": torch.tensor(1.0)}, n=1)
    metrics.reset()
    assert metrics.compute() == {}


def test_non_scalar_values_are_rejected_with_the_metric_name():
    with pytest.raises(ValueError, match="'per_class' must be a scalar"):
        MetricAccumulator().update({"per_class": torch.ones(3)}, n=1)
