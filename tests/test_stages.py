"""Repeated blocks become nn.Sequential stages (scmc/passes/stages.py), as timm writes them; the
template's step names stay what backward regexes match; an older checkpoint says which format it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scmc.passes.stages import MODEL_FORMAT, stem_of
from tests.test_emit_style import compiled, run

BLOCK = """
Blk:
  OUTPUTS: [out]
  FLOW:
    - [inp, out, fc, [_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 8, out_features: 8}}]]
"""
HEAD = "[_obj_, {_addr_: torch.nn.Linear}, {_call_: {in_features: 8, out_features: 2}}]"
ADD = "[_obj_, {_addr_: structcast_model.torch.layers.Add}, _call_]"


def template(flow: str) -> str:
    return f"INPUTS: [x]\nOUTPUTS: [out]\nINPUT_SHAPES: {{x: [2, 8]}}\nFLOW:\n{flow}{BLOCK}"


def test_the_stem_of_a_step_name_is_the_name_without_its_trailing_number() -> None:
    assert stem_of("block11") == "block"
    assert stem_of("layer1_0") == "layer1"
    assert stem_of("head") is None and stem_of("_1") is None


def test_chained_blocks_become_one_sequential_called_in_one_line_with_their_comments(tmp_path: Path) -> None:
    source = compiled(
        tmp_path,
        template(
            "  # the trunk\n"
            "  - [x, _, blk0, {TYPE: Blk}]\n"
            "  - [_, _, blk1, {TYPE: Blk}]\n"
            "  - [_, y, blk2, {TYPE: Blk}]\n"
            f"  - [y, out, head, {HEAD}]\n"
        ),
    )
    assert "self.blks = torch.nn.Sequential(*[Blk() for _ in range(3)])" in source
    assert 'step_names = {"blks": ("blk0", "blk1", "blk2")}' in source
    assert "        # the trunk\n        y = self.blks(x)\n" in source
    assert "self.blk0" not in source
    model = run(source, tmp_path)
    assert [k for k in model.state_dict() if k.startswith("blks.")] == [
        f"blks.{i}.fc.{p}" for i in range(3) for p in ("weight", "bias")
    ]
    assert model(torch.randn(2, 8)).shape == (2, 2)
    torch.jit.script(model)


def test_a_block_whose_output_is_read_twice_ends_the_run(tmp_path: Path) -> None:
    source = compiled(
        tmp_path,
        template(
            "  - [x, _, blk0, {TYPE: Blk}]\n"
            "  - [_, h, blk1, {TYPE: Blk}]\n"
            "  - [h, y, blk2, {TYPE: Blk}]\n"
            f"  - [[[h, y]], z, add, {ADD}]\n"
            f"  - [z, out, head, {HEAD}]\n"
        ),
    )
    assert "self.blks = torch.nn.Sequential(*[Blk() for _ in range(2)])" in source
    assert "self.blk2 = Blk()" in source
    assert "h = self.blks(x)" in source and "y = self.blk2(h)" in source


def test_steps_of_other_stems_or_called_twice_stay_attributes(tmp_path: Path) -> None:
    source = compiled(
        tmp_path,
        template(
            "  - [x, _, blk0, {TYPE: Blk}]\n"
            "  - [_, _, trunk1, {TYPE: Blk}]\n"
            "  - [_, _, shared1, {TYPE: Blk}]\n"
            "  - [_, y, shared1]\n"
            f"  - [y, out, head, {HEAD}]\n"
        ),
    )
    assert "Sequential" not in source and "step_names" not in source


@pytest.fixture(scope="module")
def atto_sources():
    from tests.test_vit import BuildRequest, Part, plan_package  # the in-memory build

    def source(*params: str) -> str:
        request = BuildRequest(
            parts=[Part("model", Path("cfg/models/ConvNeXtV2.yaml"), "Model")], params=["backbone=atto", *params]
        )
        plan = plan_package(request)
        return next(text.decode() for path, text in plan.files.items() if path.endswith("/model.py"))

    return source(), source("drop_path_rate=0.1")


def test_a_drop_path_rate_changes_no_state_dict_key(atto_sources, tmp_path: Path) -> None:
    from scmc_runtime.checkpoint import model_signature

    plain, dropped = (run(s, tmp_path) for s in atto_sources)
    assert "backbone.blocks2.5.fc2.weight" in plain.state_dict()
    assert model_signature(plain.state_dict()) == model_signature(dropped.state_dict())


def test_parameter_groups_see_the_templates_step_names(atto_sources, tmp_path: Path) -> None:
    from scmc_runtime.optim import named_parameters, param_groups

    model = run(atto_sources[0], tmp_path)
    names = [n for n, _ in named_parameters(model)]
    assert "backbone.block7.fc2.weight" in names and "backbone.downsample2.conv.weight" in names
    assert [n for n, _ in named_parameters(model, "model", submodule="backbone")][
        4
    ] == "model.backbone.block0.conv_dw.weight"
    groups = param_groups(
        model, weight_decay=0.05, layer_decay=0.9, layer_group_regexes=[r"^(?:\w+\.)*block7(?:\.\w+)*$"]
    )
    assert sum(len(g["params"]) for g in groups if g["lr_scale"] < 1.0) == len(
        list(model.backbone.blocks2[3].parameters())
    )


def test_a_checkpoint_of_the_flat_format_is_refused_naming_both_formats(atto_sources, tmp_path: Path) -> None:
    from scmc_runtime.checkpoint import FORMAT_VERSION, CheckpointError, check_checkpoint

    assert FORMAT_VERSION == MODEL_FORMAT == 2
    model = run(atto_sources[0], tmp_path)
    # the keys format 1 had: every block its own attribute
    flat = {k.replace("blocks0.1.", "block1."): v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint({"format": 1, "model": flat}, tmp_path / "old.pt", model=model.state_dict())
    message = str(caught.value)
    assert "\n" not in message
    assert "checkpoint of format 1" in message and "this package's model is format 2" in message
    check_checkpoint({"format": 2, "model": model.state_dict()}, tmp_path / "new.pt", model=model.state_dict())


def test_export_reads_manifests_up_to_the_format_the_build_writes() -> None:
    from scmc.export.package import MANIFEST_FORMAT

    assert MANIFEST_FORMAT == MODEL_FORMAT


# Step names a template author controls, chosen to trick the grouping: a later step already called
# like the stage would be, stems that sort differently from their order, stems that are numbered
# names themselves, a name that is the plural of another run. Each must build the network the
# neutral names build: same parameters in the same construction order, same outputs.
TRICKY_NAMES = [
    ("a", "b", "c", "d"),  # neutral: no stem, nothing grouped
    ("blk0", "blk1", "blk2", "blks"),  # the head takes the stage's name
    ("blk1", "blk10", "blk2", "blks0"),  # numbers out of order; the head takes a numbered stage name
    ("blks0", "blks1", "blks2", "blk"),  # the members are named like stages
    ("layer1_0", "layer1_1", "layer1_2", "layer1"),  # torchvision's scheme with the stem taken
    ("x0", "x1", "x2", "out0"),  # the stem is the input's name
]


@pytest.mark.parametrize("names", TRICKY_NAMES, ids=lambda names: "-".join(names))
def test_step_names_chosen_to_collide_change_attribute_names_never_the_network(names, tmp_path: Path) -> None:
    first, second, third, head = names
    source = compiled(
        tmp_path,
        template(
            f"  - [x, _, {first}, {{TYPE: Blk}}]\n"
            f"  - [_, _, {second}, {{TYPE: Blk}}]\n"
            f"  - [_, y, {third}, {{TYPE: Blk}}]\n"
            f"  - [y, out, {head}, {HEAD}]\n"
        ),
    )
    neutral_dir = tmp_path / "neutral"
    neutral_dir.mkdir()
    neutral_source = compiled(
        neutral_dir,
        template(
            "  - [x, _, a, {TYPE: Blk}]\n"
            "  - [_, _, b, {TYPE: Blk}]\n"
            "  - [_, y, c, {TYPE: Blk}]\n"
            f"  - [y, out, d, {HEAD}]\n"
        ),
    )
    torch.manual_seed(0)
    model = run(source, tmp_path)
    torch.manual_seed(0)
    neutral = run(neutral_source, neutral_dir)
    mine, theirs = list(model.parameters()), list(neutral.parameters())
    assert [p.shape for p in mine] == [p.shape for p in theirs]
    assert all(torch.equal(p, q) for p, q in zip(mine, theirs)), "another construction order or initialization"
    x = torch.randn(2, 8)
    assert torch.equal(model(x), neutral(x))
    # The name the template gave its head is kept; the stage, if any, took a name nobody else has.
    assert isinstance(getattr(model, head), torch.nn.Linear)
