"""scmc_runtime.optim: structcast-model's parameter groups, timm optimizers and explicitly stepped schedules."""

import io
import math

import pytest
import torch
from torch import nn

from scmc_runtime.optim import Optimization, create, create_with_scheduler, named_parameters, param_groups

pytest.importorskip("timm.scheduler")

STEM, BLOCK0, BLOCK1 = (rf"^(?:\w+\.)*{layer}(?:\.\w+)*$" for layer in ("stem", "block0", "block1"))
BIAS = r"^(?:\w+\.)*bias*$"
LAYER_DECAY = dict(layer_decay=0.9, layer_group_regexes=[STEM, BLOCK0, BLOCK1])
# lr_scale per named layer with layer_decay 0.9 over 3 groups; "head" matches no group
SCALES = {"stem": 0.9**3, "block0": 0.9**2, "block1": 0.9, "head": 1.0}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.block0 = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.block1 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).mean(dim=(2, 3))
        return self.head(self.block1(self.block0(x)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (50x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(name: str) -> str:
    return name.split(".")[0]


def _cosine(t, base, *, t_initial, warmup_t, warmup_lr, min_lr):
    """timm's CosineLRScheduler lr at t (warmup_prefix=False, one cycle, k_decay=1)."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / t_initial))


def _train(optimization: Optimization, model: nn.Module, updates: int, start: int, per_epoch: int, metrics=None):
    """Real updates ``start+1 .. start+updates`` with the schedule stepped the way a training loop does."""
    for update in range(start + 1, start + updates + 1):
        x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(update))
        model(x).square().mean().backward()
        optimization.step()
        optimization.zero_grad(set_to_none=True)
        optimization.step_update(update)
        if update % per_epoch == 0:
            epoch = update // per_epoch
            optimization.step_epoch(epoch, None if metrics is None else metrics[epoch - 1])


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------- parameters


def test_named_parameters_sees_through_data_parallel_and_compile_wrappers_and_applies_the_prefix():
    model = Net()
    wrapped = nn.DataParallel(torch.compile(model))
    names = [name for name, _ in named_parameters(wrapped)]
    assert names == [name for name, _ in model.named_parameters()]
    assert not any("module." in name or "_orig_mod" in name for name in names)
    assert named_parameters(wrapped, prefix="net")[0][0] == "net.stem.0.weight"
    assert named_parameters(wrapped)[0][1] is model.stem[0].weight


def test_biases_and_norm_weights_get_no_weight_decay_while_conv_and_linear_weights_do():
    groups = param_groups(named_parameters(Net()), weight_decay=0.05, no_weight_decay_regexes=[BIAS])
    assert [group["weight_decay"] for group in groups] == [0.0, 0.05]
    no_decay, decay = (set(group["param_names"]) for group in groups)
    assert decay == {"stem.0.weight", "block0.0.weight", "block1.weight", "head.weight"}
    assert {"stem.1.weight", "block0.1.weight", "stem.0.bias", "head.bias"} <= no_decay
    assert all(len(group["params"]) == len(group["param_names"]) for group in groups)


def test_a_weight_decay_regex_match_decays_even_a_one_dimensional_parameter():
    groups = param_groups(
        named_parameters(Net()),
        weight_decay=0.1,
        weight_decay_regexes=[r"^block0\.1\.weight$"],
        no_weight_decay_regexes=[BIAS],
    )
    decay = groups[1]
    assert decay["weight_decay"] == 0.1 and "block0.1.weight" in decay["param_names"]


def test_without_regexes_every_parameter_shares_one_decayed_group_like_upstream():
    groups = param_groups(named_parameters(Net()), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    assert groups[0]["param_names"] == [name for name, _ in Net().named_parameters()]


def test_frozen_parameters_and_repeated_parameters_are_left_out():
    model = Net()
    model.stem.requires_grad_(False)
    params = named_parameters(model) + [("again", model.head.weight)]
    names = [name for group in param_groups(params) for name in group["param_names"]]
    assert not any(name.startswith("stem") for name in names)
    assert names.count("head.weight") == 1 and "again" not in names


def test_layer_decay_groups_follow_the_regexes_with_scales_decaying_away_from_the_last_group():
    groups = param_groups(named_parameters(Net()), weight_decay=0.05, no_weight_decay_regexes=[BIAS], **LAYER_DECAY)
    layers = [(_layer(group["param_names"][0]), group["weight_decay"]) for group in groups]
    assert layers == [
        ("stem", 0.0), ("stem", 0.05), ("block0", 0.0), ("block0", 0.05),
        ("block1", 0.0), ("block1", 0.05), ("head", 0.0), ("head", 0.05),
    ]  # fmt: skip
    for group in groups:
        assert {_layer(name) for name in group["param_names"]} == {_layer(group["param_names"][0])}
        assert group["lr_scale"] == pytest.approx(SCALES[_layer(group["param_names"][0])])
    assert [group["lr_scale"] for group in groups[::2]] == pytest.approx([0.729, 0.81, 0.9, 1.0])


# --------------------------------------------------------------------------- optimizers


def test_create_builds_the_named_timm_optimizer_with_its_keyword_arguments():
    params = named_parameters(Net())
    adamw = create(params, opt="adamw", lr=1e-3, betas=[0.8, 0.99], weight_decay=0.05, no_weight_decay_regexes=[BIAS])
    assert type(adamw) is torch.optim.AdamW
    assert [group["weight_decay"] for group in adamw.param_groups] == [0.0, 0.05]
    assert all(group["betas"] == (0.8, 0.99) and group["lr"] == 1e-3 for group in adamw.param_groups)
    sgd = create(named_parameters(Net()), opt="sgd", lr=0.1)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9


def test_create_without_a_schedule_multiplies_each_lr_scale_into_the_lr_once():
    model = Net()
    optimizer = create(named_parameters(model), opt="sgd", lr=0.1, **LAYER_DECAY)
    for group in optimizer.param_groups:
        assert "lr_scale" not in group
        assert group["lr"] == pytest.approx(0.1 * SCALES[_layer(group["param_names"][0])])
    before = [group["lr"] for group in optimizer.param_groups]
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    optimizer.step()
    assert [group["lr"] for group in optimizer.param_groups] == before


def test_the_example_binding_of_old_templates_builds_adamw_with_a_per_epoch_cosine_schedule():
    optimization = create_with_scheduler(
        named_parameters(Net()),
        optimizer_kwargs=dict(opt="adamw", betas=[0.9, 0.999], weight_decay_regexes=[], lr=4.0e-3,
                              no_weight_decay_regexes=[BIAS], weight_decay=0.05, **LAYER_DECAY),
        scheduler_kwargs=dict(name="cosine", min_lr=1.0e-6, warmup_lr=1.0e-5, warmup_prefix=False,
                              step_on_epochs=True, k_decay=1.0, criterion="ce_loss", warmup_epochs=1,
                              num_epochs=300),
    )  # fmt: skip
    assert isinstance(optimization.optimizer, torch.optim.AdamW)
    assert optimization.step_on_epochs and optimization.criterion == "ce_loss" and optimization.num_epochs == 300
    assert optimization.lrs() == pytest.approx(
        [1.0e-5 * SCALES[_layer(g["param_names"][0])] for g in optimization.param_groups]
    )


# --------------------------------------------------------------------------- timm schedules

COSINE = dict(name="cosine", warmup_epochs=2, warmup_lr=0.01, min_lr=0.001, num_epochs=10)


def test_cosine_with_warmup_stepped_per_epoch_follows_timm_formula_and_ignores_updates():
    optimization = create_with_scheduler(named_parameters(Net()), dict(opt="sgd", lr=0.1), COSINE)
    expected = lambda t: _cosine(t, 0.1, t_initial=10, warmup_t=2, warmup_lr=0.01, min_lr=0.001)  # noqa: E731
    assert optimization.step_on_epochs and optimization.lrs() == pytest.approx([expected(0)])
    optimization.step_update(7)
    assert optimization.lrs() == pytest.approx([expected(0)])
    for epoch in (1, 2, 3, 7, 10):
        optimization.step_epoch(epoch)
        assert optimization.lrs() == pytest.approx([expected(epoch)]), epoch
    assert optimization.lrs() == pytest.approx([0.001])


def test_cosine_with_warmup_stepped_per_update_follows_timm_formula_on_the_update_count():
    optimization = create_with_scheduler(
        named_parameters(Net()), dict(opt="sgd", lr=0.1), {**COSINE, "step_on_epochs": False}, updates_per_epoch=4
    )
    expected = lambda t: _cosine(t, 0.1, t_initial=40, warmup_t=8, warmup_lr=0.01, min_lr=0.001)  # noqa: E731
    assert not optimization.step_on_epochs
    for update in (1, 5, 8, 9, 23, 40):
        optimization.step_update(update)
        assert optimization.lrs() == pytest.approx([expected(update)]), update
    optimization.step_epoch(3)
    assert optimization.lrs() == pytest.approx([expected(40)])


def test_per_update_schedules_need_updates_per_epoch():
    with pytest.raises(ValueError, match="updates_per_epoch"):
        create_with_scheduler(named_parameters(Net()), dict(lr=0.1), {**COSINE, "step_on_epochs": False})


def test_each_group_lr_is_the_base_schedule_lr_times_its_layer_decay_scale():
    optimization = create_with_scheduler(named_parameters(Net()), dict(opt="adamw", lr=0.1, **LAYER_DECAY), COSINE)
    scales = [SCALES[_layer(group["param_names"][0])] for group in optimization.param_groups]
    assert sorted(set(scales)) == pytest.approx([0.729, 0.81, 0.9, 1.0])
    for epoch in (0, 1, 2, 5, 9):
        if epoch:
            optimization.step_epoch(epoch)
        base = _cosine(epoch, 0.1, t_initial=10, warmup_t=2, warmup_lr=0.01, min_lr=0.001)
        assert optimization.lrs() == pytest.approx([base * scale for scale in scales]), epoch


def test_step_schedule_multiplies_the_lr_by_decay_rate_every_decay_epochs():
    optimization = create_with_scheduler(
        named_parameters(Net()), dict(lr=0.1), dict(name="step", decay_epochs=3, decay_rate=0.5, warmup_epochs=0)
    )
    lrs = []
    for epoch in range(1, 8):
        optimization.step_epoch(epoch)
        lrs.append(optimization.lrs()[0])
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])


def test_plateau_schedule_cuts_the_lr_only_after_the_metric_stops_improving_for_patience_epochs():
    optimization = create_with_scheduler(
        named_parameters(Net()),
        dict(lr=0.1, **LAYER_DECAY),
        dict(name="plateau", patience_epochs=1, decay_rate=0.5, plateau_mode="min", criterion="val_loss"),
    )
    head = [group["param_names"][0].startswith("head") for group in optimization.param_groups].index(True)
    stem = 0
    history = []
    for epoch, loss in enumerate([1.0, 0.5, 0.6, 0.7, 0.4, 0.45], start=1):
        optimization.step_epoch(epoch, loss)
        history.append(optimization.lrs()[head])
    assert history == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])
    assert optimization.lrs()[stem] == pytest.approx(0.05 * 0.729)
    with pytest.raises(ValueError, match="val_loss"):
        optimization.step_epoch(7)


def test_num_epochs_argument_overrides_the_num_epochs_of_scheduler_kwargs():
    optimization = create_with_scheduler(named_parameters(Net()), dict(lr=0.1), COSINE, num_epochs=20)
    assert optimization.num_epochs == 20
    optimization.step_epoch(10)
    expected = _cosine(10, 0.1, t_initial=20, warmup_t=2, warmup_lr=0.01, min_lr=0.001)
    assert optimization.lrs() == pytest.approx([expected])


def test_unknown_scheduler_kwargs_raise_a_type_error_naming_them():
    with pytest.raises(TypeError, match="bogus_epochs"):
        create_with_scheduler(named_parameters(Net()), dict(lr=0.1), {**COSINE, "bogus_epochs": 3})
    with pytest.raises(TypeError, match="num_epochs"):
        create_with_scheduler(named_parameters(Net()), dict(lr=0.1), dict(name="StepLR", step_size=2, num_epochs=3))


def test_no_scheduler_name_means_no_schedule_and_lr_scale_applied_once():
    optimization = create_with_scheduler(named_parameters(Net()), dict(lr=0.1, **LAYER_DECAY), None)
    assert optimization.scheduler is None
    scales = [SCALES[_layer(group["param_names"][0])] for group in optimization.param_groups]
    optimization.step_update(1)
    optimization.step_epoch(1)
    assert optimization.lrs() == pytest.approx([0.1 * scale for scale in scales])


# --------------------------------------------------------------------------- torch schedules


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_a_torch_native_scheduler_by_name_steps_per_epoch_and_honours_lr_scale():
    optimization = create_with_scheduler(
        named_parameters(Net()), dict(lr=0.1, **LAYER_DECAY), dict(name="StepLR", step_size=2, gamma=0.5)
    )
    assert isinstance(optimization.scheduler, torch.optim.lr_scheduler.StepLR) and optimization.step_on_epochs
    scales = [SCALES[_layer(group["param_names"][0])] for group in optimization.param_groups]
    optimization.step_update(3)  # per-epoch scheduler: updates change nothing
    for epoch, base in zip(range(1, 6), [0.1, 0.05, 0.05, 0.025, 0.025]):
        optimization.step_epoch(epoch)
        assert optimization.lrs() == pytest.approx([base * scale for scale in scales]), epoch


def test_cosine_annealing_warm_restarts_steps_per_update_at_the_fractional_epoch():
    optimization = create_with_scheduler(
        named_parameters(Net()),
        dict(lr=0.1, **LAYER_DECAY),
        dict(name="CosineAnnealingWarmRestarts", T_0=2, eta_min=0.0),
        updates_per_epoch=4,
    )
    assert not optimization.step_on_epochs
    scales = [SCALES[_layer(group["param_names"][0])] for group in optimization.param_groups]
    for update in (1, 3, 7, 8, 9):
        optimization.step_update(update)
        t_cur = (update / 4) % 2
        base = 0.05 * (1 + math.cos(math.pi * t_cur / 2))
        assert optimization.lrs() == pytest.approx([base * scale for scale in scales]), update


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_reduce_lr_on_plateau_by_name_reacts_to_the_metric_given_at_epoch_end():
    optimization = create_with_scheduler(
        named_parameters(Net()), dict(lr=0.1), dict(name="ReduceLROnPlateau", patience=0, factor=0.1, mode="max")
    )
    history = []
    for epoch, accuracy in enumerate([0.5, 0.6, 0.55, 0.7], start=1):
        optimization.step_epoch(epoch, accuracy)
        history.append(optimization.lrs()[0])
    assert history == pytest.approx([0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="metric"):
        optimization.step_epoch(5)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_sequential_lr_is_built_from_nested_scheduler_entries():
    optimization = create_with_scheduler(
        named_parameters(Net()),
        dict(lr=0.1),
        dict(
            name="SequentialLR",
            milestones=[2],
            schedulers=[dict(name="ConstantLR", factor=0.5, total_iters=2), dict(name="ExponentialLR", gamma=0.9)],
        ),
    )
    lrs = [optimization.lrs()[0]]
    for epoch in range(1, 5):
        optimization.step_epoch(epoch)
        lrs.append(optimization.lrs()[0])
    assert lrs == pytest.approx([0.05, 0.05, 0.1, 0.09, 0.081])


# --------------------------------------------------------------------------- wrapper and checkpoints


def test_optimization_behaves_like_its_optimizer_for_groups_steps_and_zero_grad():
    model = Net()
    optimization = create_with_scheduler(named_parameters(model), dict(opt="sgd", lr=0.1), COSINE)
    assert optimization.param_groups is optimization.optimizer.param_groups
    before = model.head.weight.detach().clone()
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    optimization.step()
    assert not torch.equal(before, model.head.weight)
    optimization.zero_grad(set_to_none=True)
    assert model.head.weight.grad is None
    assert optimization.state is optimization.optimizer.state


SCHEDULES = {
    "timm cosine per update": (dict(opt="adamw", lr=0.01, **LAYER_DECAY), {**COSINE, "step_on_epochs": False}),
    "timm plateau": (
        dict(opt="sgd", lr=0.1, **LAYER_DECAY),
        dict(name="plateau", patience_epochs=0, plateau_mode="min"),
    ),
    "torch StepLR": (dict(opt="sgd", lr=0.1, **LAYER_DECAY), dict(name="StepLR", step_size=1, gamma=0.7)),
    "torch ReduceLROnPlateau": (dict(opt="adamw", lr=0.01), dict(name="ReduceLROnPlateau", patience=0, factor=0.5)),
    "torch warm restarts": (dict(opt="sgd", lr=0.1, **LAYER_DECAY), dict(name="CosineAnnealingWarmRestarts", T_0=2)),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_state_dict_survives_torch_save_and_weights_only_load_and_resumes_the_schedule_exactly(schedule):
    optimizer_kwargs, scheduler_kwargs = SCHEDULES[schedule]
    losses = [1.0, 0.9, 0.95, 0.97, 0.5, 0.6]

    def build(model):
        return create_with_scheduler(named_parameters(model), optimizer_kwargs, scheduler_kwargs, updates_per_epoch=3)

    straight_model = Net()
    straight = build(straight_model)
    _train(straight, straight_model, 18, 0, 3, losses)

    first_model = Net()
    first = build(first_model)
    _train(first, first_model, 9, 0, 3, losses)
    saved = _round_trip({"model": first_model.state_dict(), "optimization": first.state_dict()})

    resumed_model = Net()
    resumed_model.load_state_dict(saved["model"])
    resumed = build(resumed_model)
    assert resumed.lrs() != first.lrs()  # the schedule has moved: loading must restore it
    resumed.load_state_dict(saved["optimization"])
    assert resumed.lrs() == first.lrs()
    _train(resumed, resumed_model, 9, 9, 3, losses)

    assert resumed.lrs() == straight.lrs()
    for name, value in straight_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name
    assert _round_trip(resumed.state_dict())["scheduler"] == _round_trip(straight.state_dict())["scheduler"]


@pytest.mark.parametrize(
    "pattern, problem",
    [
        (r"^(?:\w+\.)*bias$", None),
        (r"^(?:\w+\.)*(?:downsample1|block3|block4)(?:\.\w+)*$", None),
        (r"norm|bias", None),
        (r"(a+)+$", "it repeats a repetition (like `(a+)+`), which can take exponential time"),
        (r"^(\w+)*bias$", "it repeats a repetition (like `(a+)+`), which can take exponential time"),
        (r"(.*)*x", "it repeats a repetition (like `(a+)+`), which can take exponential time"),
        (r"(a|ab)*c", "it repeats alternatives that can match the same text (like `(a|ab)*`)"),
        (r"(a)\1", "it uses a backreference, which can take exponential time"),
        ("(", "it does not compile: missing ), unterminated subpattern at position 0"),
        ("a" * 1001, "it is 1,001 characters long (the limit is 1,000)"),
    ],
)
def test_regexes_that_could_backtrack_exponentially_are_refused(pattern, problem):
    from scmc_runtime.regexes import regex_problem

    assert regex_problem(pattern) == problem


def test_param_groups_refuses_a_catastrophic_regex_before_matching_any_name():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"regular expression '\^\(\\\\w\+\)\*bias\$' is refused: it repeats"):
        param_groups(model, weight_decay=0.05, no_weight_decay_regexes=[r"^(\w+)*bias$"])
