"""ModelEma follows timm's ModelEmaV3, with or without timm, and sees through DDP/compile wrappers."""

import pytest
import torch
from torch import nn

from scmc_runtime.ema import ModelEma

timm_model_ema = pytest.importorskip("timm.utils.model_ema")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def _train_steps(model: nn.Module, steps: int, on_step) -> None:
    """A few real SGD steps (weights and BatchNorm buffers change), calling ``on_step(step)`` after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = torch.randn(4, 3, 6, 6, generator=generator)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        on_step(step)


def _materialized_model() -> nn.Module:
    model = _model()
    model(torch.zeros(1, 3, 6, 6))  # materialize the lazy layer before copying
    return model


SETTINGS = [
    dict(decay=0.99, warmup=True, warmup_power=3 / 4, update_after_step=2, min_decay=0.1),
    dict(decay=0.9, warmup=False),
    dict(decay=0.999, warmup=True, warmup_gamma=2.0),
]


def _timm_kwargs(settings: dict) -> dict:
    renamed = dict(settings)
    renamed["use_warmup"] = renamed.pop("warmup")
    return renamed


@pytest.mark.parametrize("settings", SETTINGS)
def test_decay_schedule_matches_timm_model_ema_v3(settings):
    ours = ModelEma(nn.Linear(2, 2), use_timm=False, **settings)
    reference = timm_model_ema.ModelEmaV3(nn.Linear(2, 2), **_timm_kwargs(settings))
    for step in [None, 0, 1, 2, 3, 4, 10, 100, 10_000]:
        assert ours.get_decay(step) == reference.get_decay(step)


@pytest.mark.parametrize("use_timm", [False, True], ids=["torch-math", "timm-backend"])
@pytest.mark.parametrize("settings", SETTINGS[:2])
def test_averaged_weights_match_timm_model_ema_v3_after_several_updates(settings, use_timm):
    model = _materialized_model()
    ours = ModelEma(model, use_timm=use_timm, **settings)
    reference = timm_model_ema.ModelEmaV3(model, **_timm_kwargs(settings))
    assert ours.backend == ("timm" if use_timm else "torch")

    def update_both(step):
        ours.update(model, step=step)
        reference.update(model, step=step)

    _train_steps(model, 6, update_both)
    expected = reference.module.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-7, msg=name)
    # the average lags behind the model: it is not a copy
    assert not torch.equal(ours.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_the_first_update_copies_the_weights_and_integer_buffers():
    model = _materialized_model()
    ema = ModelEma(model, decay=0.9, use_timm=False)
    _train_steps(model, 1, lambda step: ema.update(model, step=step))
    for name, value in model.state_dict().items():
        assert torch.equal(ema.state_dict()[name], value), name
    assert ema.state_dict()["1.num_batches_tracked"].item() == 2  # materializing forward + one step


def test_averaged_copy_is_in_eval_mode_without_gradients_and_independent_of_the_model():
    model = _materialized_model().train()
    ema = ModelEma(model)
    assert not ema.module.training
    assert not any(parameter.requires_grad for parameter in ema.module.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema.module[0].weight, model[0].weight)


def test_compiled_model_is_averaged_without_the_orig_mod_prefix():
    model = _materialized_model()
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until called
    ema = ModelEma(compiled, decay=0.5, use_timm=False)
    assert set(ema.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    ema.update(compiled, step=None)
    expected = (_materialized_model()[0].weight + 2.0) / 2
    torch.testing.assert_close(ema.module[0].weight, expected)


def test_data_parallel_wrapper_is_unwrapped_too():
    model = _materialized_model()
    ema = ModelEma(nn.DataParallel(model), use_timm=False)
    assert set(ema.state_dict()) == set(model.state_dict())


def test_state_dict_round_trip_restores_the_average():
    model = _materialized_model()
    ema = ModelEma(model, decay=0.5)
    _train_steps(model, 3, lambda step: ema.update(model, step=step))
    restored = ModelEma(_materialized_model(), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    for name, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_asking_for_timm_without_timm_installed_fails_with_an_install_hint(monkeypatch):
    import scmc_runtime.ema as ema_module

    monkeypatch.setattr(ema_module, "_timm_model_ema_v3", lambda: None)
    with pytest.raises(ImportError, match=r"scmc-runtime\[timm\]"):
        ModelEma(nn.Linear(2, 2), use_timm=True)
    assert ModelEma(nn.Linear(2, 2)).backend == "torch"
