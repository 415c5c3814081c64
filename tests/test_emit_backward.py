"""backward.py is `templates/backward.py.j2` rendered from a typed context (scmc.emit.backward).

The byte-identity of the generated file with what the string-building emitter wrote is held by
the goldens (tests/golden/*/src/*/backward.py); these tests cover what the goldens do not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import torch

from tests.conftest import run_scmc

# every pattern the template lays out differently: a CLIP emitted as written, value and agc
# clipping, two BACKWARDS items, backward() keywords, GradScaler keywords, submodule layers
RICH = """\
MIXED_PRECISION: {init_scale: 512.0, growth_interval: 10}
MIXED_PRECISION_TYPE: float16
ACCUMULATE_GRADIENTS: 3
BACKWARDS:
  - LOSS: total
    retain_graph: true
    OPTIMIZERS:
      - NAME: head
        OPTIMIZER: [_obj_, {_addr_: torch.optim.AdamW}, {_bind_: {lr: 0.001, weight_decay: 0.05}}]
        LAYERS: [model.head, model.neck]
        CLIP: [_obj_, {_addr_: timm.utils.agc.adaptive_clip_grad}, {_bind_: {clip_factor: 0.02}}]
      - NAME: body
        OPTIMIZER: [_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: 0.01, momentum: 0.9}}]
        LAYERS: [model.body]
        CLIP: [_obj_, {_addr_: torch.nn.utils.clip_grad_value_}, {_bind_: {clip_value: 0.5}}]
  - LOSS: aux
    OPTIMIZERS:
      - NAME: third
        OPTIMIZER: [_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: 0.02}}]
        LAYERS: model
        CLIP: [_obj_, {_addr_: timm.utils.clip_grad.dispatch_clip_grad}, {_bind_: {value: 0.1, mode: agc}}]
"""


def compile_backward(path: Path):
    from scmc.build import BuildRequest, Part, compile_parts

    _, compiled, _ = compile_parts(BuildRequest(parts=[Part("backward", path, "Backward")], presets=False))
    return compiled[0]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_context_holds_only_source_text_and_the_template_renders_it(tmp_path: Path) -> None:
    from scmc.emit.backward import BackwardContext, backward_context, emit_backward
    from scmc.emit.jinja import environment
    from scmc.emit.python import format_python

    (tmp_path / "rich.yaml").write_text(RICH)
    part = compile_backward(tmp_path / "rich.yaml")
    context = backward_context(part.backward, ["header"], "rich backward.")
    assert isinstance(context, BackwardContext)

    def leaves(value):  # no IR value reaches the template: it only lays out text and numbers
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                yield from leaves(getattr(value, f.name))
        elif isinstance(value, tuple):
            for v in value:
                yield from leaves(v)
        else:
            yield value

    assert {type(v) for v in leaves(context)} <= {str, int, type(None)}
    assert [o.name for o in context.optimizers] == ["head", "body", "third"]
    head, body, third = context.optimizers
    assert (
        head.custom_clip
        == "timm.utils.agc.adaptive_clip_grad(scmc_runtime.optim.parameters(self.head), clip_factor=0.02)"
    )
    assert (body.custom_clip, body.max_value, body.mode) == (None, "0.5", "'value'")
    assert (third.custom_clip, third.max_value, third.mode) == (None, "0.1", "'agc'")
    assert context.scaler_kwargs == (("init_scale", "512.0"), ("growth_interval", "10"))
    assert [(s.loss, s.kwargs) for s in context.steps] == [("total", (("retain_graph", "True"),)), ("aux", ())]
    rendered = environment().get_template("backward.py.j2").render(b=context)
    assert format_python(rendered) == emit_backward(part.backward, ["header"], "rich backward.")


def test_the_rendered_class_trains_with_every_clip_kind(tmp_path: Path) -> None:
    (tmp_path / "rich.yaml").write_text(RICH)
    result = run_scmc(tmp_path, "torch", "create", "backward", "rich.yaml", "-o", "backward.py")
    assert result.exit_code == 0, result.output
    module = load(tmp_path / "backward.py", "rich_backward")
    model = torch.nn.Module()
    model.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    model.neck = torch.nn.Linear(4, 4)
    model.head = torch.nn.Linear(4, 1)
    backward = module.Backward(model, updates_per_epoch=3, epochs=1)
    before = [p.detach().clone() for p in model.parameters()]
    stepped = []
    for _ in range(3):
        out = model.head(model.neck(model.body(torch.randn(8, 4))))
        stepped.append(backward(out.square().mean(), out.abs().mean()))
    assert stepped == [False, False, True] and backward.updates == 1
    assert set(backward.grad_norms) == {"head", "body", "third"}
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = backward.state_dict()
    assert set(state) == {"head", "body", "third", "scaler", "updates", "pending"}
    backward.load_state_dict(state)


def test_an_infinity_norm_clip_is_a_float_literal_not_a_name(tmp_path: Path) -> None:
    (tmp_path / "inf.yaml").write_text("""\
BACKWARDS:
  - LOSS: loss
    OPTIMIZERS:
      - OPTIMIZER: [_obj_, {_addr_: torch.optim.SGD}, {_bind_: {lr: 0.1}}]
        LAYERS: model
        CLIP: [_obj_, {_addr_: torch.nn.utils.clip_grad_norm_}, {_bind_: {max_norm: 1.0, norm_type: .inf}}]
""")
    result = run_scmc(tmp_path, "torch", "create", "backward", "inf.yaml", "-o", "backward.py")
    assert result.exit_code == 0, result.output
    assert 'norm_type=float("inf")' in (tmp_path / "backward.py").read_text()
    module = load(tmp_path / "backward.py", "inf_backward")
    net = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    backward = module.Backward(net, updates_per_epoch=1)
    x = torch.tensor([[3.0, -4.0, 1.0]])
    assert backward(net(x).sum())
    # the infinity norm of the gradient (x itself) is its largest magnitude, 4; clipped to 1
    assert math.isclose(float(backward.grad_norms["optimizer"]), 4.0)
    assert torch.allclose(net.weight, torch.tensor([[1.0, -2.0, 0.5]]) - 0.1 * x / 4.0)
