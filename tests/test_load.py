"""scmc.load: YAML with positions, parameter groups, `-p` overrides and Jinja expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from scmc.diagnostics import CompileError, Diagnostics, Span
from scmc.load import (
    display_path,
    LDict,
    LList,
    Parameters,
    Source,
    apply_override,
    expand,
    parameter_blocks,
    parse_override,
    parse_yaml,
    plain,
    read_template,
    report_unused_overrides,
)


def codes(exc: pytest.ExceptionInfo[CompileError]) -> list[str]:
    return [d.code for d in exc.value.diagnostics]


# --------------------------------------------------------------------------- YAML and positions

POSITIONS = """\
PARAMETERS:
  DEFAULT: {width: 16}
FLOW:
  - [x, _, fc]
  - [_, out]
"""


def test_mapping_keys_and_values_remember_their_line_and_column() -> None:
    data = parse_yaml(POSITIONS, "t.yaml")
    assert isinstance(data, LDict)
    assert data.span == Span("t.yaml", 1, 1)
    assert data.key_span("FLOW") == Span("t.yaml", 3, 1)
    params = data["PARAMETERS"]
    assert params.key_span("DEFAULT") == Span("t.yaml", 2, 3)
    assert params["DEFAULT"].key_span("width") == Span("t.yaml", 2, 13)
    assert params["DEFAULT"].value_span("width") == Span("t.yaml", 2, 20)


def test_list_items_remember_their_line_and_column() -> None:
    flow = parse_yaml(POSITIONS, "t.yaml")["FLOW"]
    assert isinstance(flow, LList)
    assert flow.item_span(0) == Span("t.yaml", 4, 5)
    assert flow.item_span(1) == Span("t.yaml", 5, 5)
    assert flow[0].item_span(2) == Span("t.yaml", 4, 12)
    assert flow.item_span(7) == flow.span  # out of range: the list itself


def test_positions_in_text_from_a_jinja_block_are_shifted_by_the_offset_and_noted() -> None:
    data = parse_yaml("a: 1\nb: 2\n", "t.yaml", line_offset=10, note="in a block")
    assert data.key_span("b") == Span("t.yaml", 12, 1, "in a block")


def test_located_values_compare_equal_to_plain_python_values() -> None:
    data = parse_yaml(POSITIONS, "t.yaml")
    assert plain(data) == {"PARAMETERS": {"DEFAULT": {"width": 16}}, "FLOW": [["x", "_", "fc"], ["_", "out"]]}
    assert type(plain(data)) is dict


@pytest.mark.parametrize(
    "text",
    [
        "a: !!python/object/apply:os.system ['echo hi']",
        "a: !!python/name:os.system ''",
        "a: !!binary aGVsbG8=",
        "a: !custom 1",
        "!!python/object:collections.OrderedDict {}",
    ],
)
def test_yaml_tags_that_build_objects_are_refused(text: str) -> None:
    with pytest.raises(CompileError) as exc:
        parse_yaml(text, "t.yaml")
    assert codes(exc) == ["E0101"]
    assert exc.value.diagnostics[0].span.line == 1


def test_standard_scalar_tags_are_accepted() -> None:
    assert plain(parse_yaml("a: !!str 1\nb: !!float 2\nc: !!int '3'\n", "t.yaml")) == {"a": "1", "b": 2.0, "c": 3}


def test_every_refused_tag_in_a_file_is_reported() -> None:
    with pytest.raises(CompileError) as exc:
        parse_yaml("a: !!python/none ''\nb: ok\nc: !!python/tuple [1]\n", "t.yaml")
    assert [(d.code, d.span.line) for d in exc.value.diagnostics] == [("E0101", 1), ("E0101", 3)]
    assert "`!!python/none`" in exc.value.diagnostics[0].message


def test_a_duplicate_key_points_at_the_second_and_names_the_first_line() -> None:
    with pytest.raises(CompileError) as exc:
        parse_yaml("a: 1\nb: 2\na: 3\n", "t.yaml")
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.span.line, diag.span.col) == ("E0103", 3, 1)
    assert "line 1" in diag.hint


def test_a_yaml_syntax_error_points_at_the_problem_and_names_the_open_bracket() -> None:
    with pytest.raises(CompileError) as exc:
        parse_yaml("FLOW:\n  - [a, b\n  - [c, d]\n", "t.yaml")
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0100"
    assert diag.span.line == 3
    assert "line 2" in diag.hint and "]" in diag.hint


def test_a_template_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(CompileError) as exc:
        read_template(path)
    assert codes(exc) == ["E0104"]


def test_a_non_utf8_template_points_at_the_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(CompileError) as exc:
        read_template(path)
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.span.line, diag.span.col) == ("E0003", 2, 7)


# --------------------------------------------------------------------------- parameter groups


def groups_of(text: str) -> dict:
    diags = Diagnostics()
    data = parse_yaml(text, "t.yaml")
    params = Parameters.from_raw(data.get("PARAMETERS"), data.span, diags)
    diags.raise_if_any()
    return params.groups


def test_shared_is_merged_into_default_and_every_named_group() -> None:
    groups = groups_of("""\
PARAMETERS:
  DEFAULT: {backbone: femto}
  SHARED: {classes: 10}
  femto: {dims: [48, 96]}
""")
    assert groups == {
        "default": {"backbone": "femto", "classes": 10},
        "femto": {"dims": [48, 96], "classes": 10},
    }


def test_a_key_in_both_shared_and_default_is_an_error_at_the_shared_key() -> None:
    diags = Diagnostics()
    data = parse_yaml("PARAMETERS:\n  DEFAULT:\n    width: 1\n  SHARED:\n    width: 2\n", "t.yaml")
    Parameters.from_raw(data["PARAMETERS"], data.span, diags)
    (diag,) = diags
    assert (diag.code, diag.span.line, diag.span.col) == ("E0202", 5, 5)
    assert "line 3" in diag.hint


def test_a_parameter_group_that_is_not_a_mapping_is_an_error() -> None:
    diags = Diagnostics()
    data = parse_yaml("PARAMETERS:\n  DEFAULT: [1, 2]\n", "t.yaml")
    Parameters.from_raw(data["PARAMETERS"], data.span, diags)
    assert [(d.code, d.span.line) for d in diags] == [("E0201", 2)]


# --------------------------------------------------------------------------- -p overrides

GROUPS = """\
PARAMETERS:
  DEFAULT:
    backbone: atto
  SHARED:
    num_classes: 1000
  atto:  {dims: [40, 80], depths: [2, 2], drop_path_rate: 0.0}
  femto: {dims: [48, 96], depths: [2, 2], drop_path_rate: 0.0}
FLOW: []
"""


def overridden(*params: str, text: str = GROUPS, allow_new: bool = False) -> dict:
    """The parameter groups after `-p PARAMS`, as `scmc build` applies them."""
    data = parse_yaml(text, "t.yaml")
    source = Source(Path("t.yaml"), "t.yaml", text, data)
    diags = Diagnostics()
    overrides = [parse_override(p) for p in params]
    blocks = parameter_blocks(data)
    used = [apply_override(blocks, o, allow_new) for o in overrides]
    report_unused_overrides(overrides, used, [source], diags)
    diags.raise_if_any()
    params_ = Parameters.from_raw(data["PARAMETERS"], data.span, diags)
    diags.raise_if_any()
    return params_.groups


def test_p_key_equals_value_sets_the_default_key() -> None:
    assert overridden("backbone=femto")["default"]["backbone"] == "femto"


def test_p_values_are_parsed_as_yaml() -> None:
    groups = overridden("femto.depths=[2,2,6,2]", "num_classes=10")
    assert groups["femto"]["depths"] == [2, 2, 6, 2]
    assert groups["default"]["num_classes"] == 10


def test_p_group_dot_key_changes_that_group_only() -> None:
    groups = overridden("femto.depths=[3,3]")
    assert groups["femto"]["depths"] == [3, 3]
    assert groups["atto"]["depths"] == [2, 2]


def test_p_upstream_mapping_form_sets_the_named_groups() -> None:
    groups = overridden("DEFAULT: {backbone: femto}", "femto: {dims: [1, 2]}")
    assert groups["default"]["backbone"] == "femto"
    assert groups["femto"]["dims"] == [1, 2]
    assert groups["atto"]["dims"] == [40, 80]


def test_a_bare_p_key_sets_it_in_every_group_that_defines_it() -> None:
    groups = overridden("drop_path_rate=0.1")
    assert groups["atto"]["drop_path_rate"] == 0.1
    assert groups["femto"]["drop_path_rate"] == 0.1
    assert "drop_path_rate" not in groups["default"]


def test_a_bare_p_key_defined_in_shared_reaches_every_group() -> None:
    groups = overridden("num_classes=10")
    assert {name: g["num_classes"] for name, g in groups.items()} == {"default": 10, "atto": 10, "femto": 10}


def test_later_p_flags_win_over_earlier_ones() -> None:
    assert overridden("backbone=femto", "DEFAULT: {backbone: pico}")["default"]["backbone"] == "pico"


def test_a_group_value_for_a_key_in_shared_wins_over_shared_for_that_group_only() -> None:
    groups = overridden("femto.num_classes=10")  # structcast-model: command-line group over SHARED
    assert {name: g["num_classes"] for name, g in groups.items()} == {"default": 1000, "atto": 1000, "femto": 10}
    upstream = overridden("femto: {num_classes: 7}")
    assert {name: g["num_classes"] for name, g in upstream.items()} == {"default": 1000, "atto": 1000, "femto": 7}


def test_a_default_value_for_a_key_in_shared_applies_to_default_instead_of_stopping_with_e0202() -> None:
    groups = overridden("DEFAULT: {num_classes: 8}")
    assert {name: g["num_classes"] for name, g in groups.items()} == {"default": 8, "atto": 1000, "femto": 1000}
    assert overridden("default.num_classes=9")["default"]["num_classes"] == 9


def test_a_bare_key_and_shared_form_still_set_a_shared_key_everywhere() -> None:
    for spelling in ("num_classes=5", "SHARED: {num_classes: 5}"):
        assert {g["num_classes"] for g in overridden(spelling).values()} == {5}


def test_a_key_the_template_sets_in_both_shared_and_default_is_still_the_templates_error() -> None:
    text = "PARAMETERS:\n  DEFAULT: {a: 1}\n  SHARED: {a: 2}\nFLOW: []\n"
    with pytest.raises(CompileError) as exc:
        overridden("DEFAULT: {a: 3}", text=text)
    assert codes(exc) == ["E0202"]


def test_an_unknown_p_key_is_an_error_with_a_did_you_mean() -> None:
    with pytest.raises(CompileError) as exc:
        overridden("num_clases=10")
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0213"
    assert diag.span == Span("t.yaml", 1, 1)  # PARAMETERS
    assert "did you mean `num_classes`?" in diag.hint
    assert "--allow-new-params" in diag.hint


def test_an_unknown_group_in_a_dotted_p_key_is_an_error_with_a_did_you_mean() -> None:
    with pytest.raises(CompileError) as exc:
        overridden("femtoo.depths=[1]")
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0214"
    assert diag.hint == "did you mean `femto`?"


def test_allow_new_params_puts_an_unknown_key_in_default() -> None:
    assert overridden("seed=3", allow_new=True)["default"]["seed"] == 3


@pytest.mark.parametrize("text", ["[1, 2]", "just words", "a: 1"])
def test_a_p_value_that_is_neither_key_value_nor_a_mapping_of_groups_is_an_error(text: str) -> None:
    with pytest.raises(CompileError) as exc:
        parse_override(text)
    assert codes(exc) == ["E0210"]


def test_a_p_value_that_is_not_valid_yaml_is_an_error() -> None:
    with pytest.raises(CompileError) as exc:
        parse_override("dims=[1, 2")
    assert codes(exc) == ["E0211"]


# --------------------------------------------------------------------------- Jinja


def render(text: str, groups: dict | None = None) -> object:
    data = parse_yaml(text, "t.yaml")
    return plain(expand(data, Parameters(groups or {"default": {}})))


def test_a_jinja_yaml_block_merges_into_its_sibling_keys() -> None:
    text = "OUTPUTS: [out]\n_jinja_yaml_: |-\n  INPUTS: [{{ name }}]\n"
    assert render(text, {"default": {"name": "image"}}) == {"OUTPUTS": ["out"], "INPUTS": ["image"]}


def test_a_jinja_block_in_a_list_is_spliced_into_the_list() -> None:
    text = """\
FLOW:
  - [a, b]
  - _jinja_yaml_: |-
      {% for i in range(n) %}
      - [b, b{{ i }}]
      {% endfor %}
  - [b, c]
"""
    assert render(text, {"default": {"n": 2}}) == {"FLOW": [["a", "b"], ["b", "b0"], ["b", "b1"], ["b", "c"]]}


def test_a_list_block_that_renders_nothing_adds_no_items() -> None:
    text = "FLOW:\n  - [a, b]\n  - _jinja_yaml_: '{% if false %}- [x, y]{% endif %}'\n"
    assert render(text) == {"FLOW": [["a", "b"]]}


def test_jinja_group_renders_a_block_with_that_groups_variables() -> None:
    text = "_jinja_group_: femto\n_jinja_yaml_: 'dims: {{ dims }}'\n"
    groups = {"default": {"dims": [1]}, "femto": {"dims": [48, 96]}}
    assert render(text, groups) == {"dims": [48, 96]}


def test_raw_defers_an_inner_block_to_a_second_pass_with_the_selected_group() -> None:
    text = """\
FLOW:
  - _jinja_yaml_: |-
      - _jinja_group_: {{ backbone }}
      {% raw %}
        _jinja_yaml_: |-
          {% for d in dims %}
          - [x, x, {_dim: {{ d }}}]
          {% endfor %}
      {% endraw %}
"""
    groups = {"default": {"backbone": "femto", "dims": [0]}, "femto": {"dims": [48, 96]}}
    assert render(text, groups) == {"FLOW": [["x", "x", {"_dim": 48}], ["x", "x", {"_dim": 96}]]}


def test_jinja_json_and_text_blocks_render() -> None:
    assert render("v:\n  _jinja_json_: '{\"a\": {{ n }}}'\n", {"default": {"n": 3}}) == {"v": {"a": 3}}
    assert render("v:\n  _jinja_: 'x{{ n }}'\n", {"default": {"n": 3}}) == {"v": "x3"}


def test_jinja_pipe_casts_the_rendered_text() -> None:
    text = "v:\n  _jinja_: '{{ n * 2 }}'\n  _jinja_pipe_: int\n"
    assert render(text, {"default": {"n": 3}}) == {"v": 6}


def test_a_jinja_pipe_may_not_call_arbitrary_functions() -> None:
    with pytest.raises(CompileError) as exc:
        render("v:\n  _jinja_: 'ls'\n  _jinja_pipe_: [[_obj_, {_addr_: os.system}]]\n")
    assert codes(exc) == ["E0305"]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("{{ [2, 2, 6, 2] | cumsum }}", [2, 4, 10, 12]),
        ("{{ 'a.b' | regex_escape }}", "a\\.b"),
        ("{{ 'conv1.weight' | regex_replace('[0-9]+', 'N') }}", "convN.weight"),
        ("{{ 'a1b22c333' | regex_findall('[0-9]+') }}", ["1", "22", "333"]),
        ("{{ 'stage2.block1' | regex_search('block[0-9]') }}", "block1"),
        ("{{ 'ABC' | regex_search('b', 'IGNORECASE') }}", "B"),
    ],
)
def test_the_extra_jinja_filters(expression: str, expected: object) -> None:
    text = "v:\n  _jinja_yaml_: |-\n    x: {{ value }}\n"
    rendered = render(text.replace("{{ value }}", expression.replace("'", '"')))
    assert rendered == {"v": {"x": expected}}


def test_raise_error_aborts_rendering_with_the_templates_message() -> None:
    text = "v:\n  _jinja_: \"{{ 'depth must be positive' | raise_error }}\"\n"
    with pytest.raises(CompileError) as exc:
        render(text)
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0301"
    assert "depth must be positive" in diag.message
    assert diag.span.line == 2


def test_an_undefined_jinja_variable_is_an_error_with_a_did_you_mean() -> None:
    with pytest.raises(CompileError) as exc:
        render("v:\n  _jinja_: '{{ widht }}'\n", {"default": {"width": 1, "depth": 2}})
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.span.line) == ("E0302", 2)
    assert diag.hint == "did you mean `width`?"


def test_an_undefined_jinja_variable_without_a_close_match_lists_the_variables() -> None:
    with pytest.raises(CompileError) as exc:
        render("v:\n  _jinja_: '{{ zzz }}'\n", {"default": {"width": 1, "depth": 2}})
    assert exc.value.diagnostics[0].hint == "variables available here: depth, width"


def test_a_jinja_syntax_error_points_into_the_block() -> None:
    with pytest.raises(CompileError) as exc:
        render("a: 1\nv:\n  _jinja_yaml_: |-\n    x: 1\n    {% if %}\n")
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0300"
    assert diag.span.line == 5


def test_invalid_yaml_rendered_by_a_block_is_reported_at_the_block_with_an_excerpt() -> None:
    with pytest.raises(CompileError) as exc:
        render("a: 1\nv:\n  _jinja_yaml_: |-\n    x: [{{ n }}\n", {"default": {"n": 1}})
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0100"
    assert diag.span.line == 3
    assert "x: [1" in diag.message


def test_values_rendered_by_a_block_carry_the_position_of_the_block() -> None:
    data = parse_yaml("a: 1\nFLOW:\n  - _jinja_yaml_: '- [x, y]'\n", "t.yaml")
    flow = expand(data, Parameters())["FLOW"]
    assert flow.item_span(0).line == 3
    assert flow[0].span.note == "in the output of this Jinja block"


def test_a_group_that_does_not_exist_is_an_error_with_a_did_you_mean() -> None:
    with pytest.raises(CompileError) as exc:
        render("_jinja_group_: femtoo\n_jinja_yaml_: 'a: 1'\n", {"default": {}, "femto": {}})
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0308"
    assert diag.hint == "did you mean `femto`?"


@pytest.mark.parametrize(
    "escape",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ().__class__.__base__ }}",
    ],
)
def test_the_jinja_sandbox_refuses_attribute_escapes(escape: str) -> None:
    with pytest.raises(CompileError) as exc:
        render(f'v:\n  _jinja_: "{escape}"\n')
    assert codes(exc) == ["E0303"]


def test_jinja_cannot_build_huge_ranges() -> None:
    with pytest.raises(CompileError) as exc:
        render("v:\n  _jinja_: '{{ range(10**9) | list }}'\n")
    assert codes(exc) == ["E0314"]  # the size guard, before Jinja's own MAX_RANGE
    assert "argument 1000000000 is larger than 100,000" in str(exc.value)


def test_a_block_beside_other_keys_must_render_a_mapping() -> None:
    with pytest.raises(CompileError) as exc:
        render("v:\n  other: 1\n  _jinja_yaml_: '- 1'\n")
    assert codes(exc) == ["E0312"]


def test_a_block_inside_a_list_must_render_a_list() -> None:
    with pytest.raises(CompileError) as exc:
        render("v:\n  - _jinja_yaml_: 'a: 1'\n")
    assert codes(exc) == ["E0313"]


def test_a_jinja_syntax_error_in_an_inline_block_points_at_its_own_line() -> None:
    with pytest.raises(CompileError) as exc:
        render('a: 1\nv:\n  _jinja_yaml_: "x: {% if %}"\n')
    assert exc.value.diagnostics[0].span.line == 3


def test_a_block_scalar_value_starts_on_the_line_after_its_indicator() -> None:
    data = parse_yaml("a: 1\nv: |-\n  text\nw: inline\n", "t.yaml")
    assert data.value_span("v").line == 3
    assert data.value_span("w") == Span("t.yaml", 4, 4)


# --------------------------------------------------------------------------- bounds (scmc/limits.py)

ROOT = Path(__file__).resolve().parents[1]


def read_fails(path: Path) -> tuple[str, str, str]:
    with pytest.raises(CompileError) as exc:
        read_template(path)
    (diag,) = exc.value.diagnostics
    return diag.code, diag.message, diag.hint


def test_a_fifo_given_as_the_template_is_refused_without_opening_it(tmp_path: Path) -> None:
    import os
    import time

    fifo = tmp_path / "t.yaml"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    start = time.monotonic()
    code, message, hint = read_fails(fifo)
    assert time.monotonic() - start < 5
    assert (code, message) == ("E0004", f"{display_path(fifo)} is a named pipe (FIFO), not a template file")
    assert hint.startswith("templates are read from regular files only")


def test_a_device_given_as_the_template_is_refused() -> None:
    assert read_fails(Path("/dev/zero"))[:2] == ("E0004", "/dev/zero is a character device, not a template file")


def test_a_huge_sparse_file_is_refused_by_its_size_before_reading(tmp_path: Path) -> None:
    sparse = tmp_path / "big.yaml"
    with open(sparse, "wb") as handle:
        handle.truncate(100 * 2**30)  # 100 GiB of holes: reading it would never finish
    code, message, hint = read_fails(sparse)
    assert (code, message) == ("E0005", f"{display_path(sparse)} is 107,374,182,400 bytes, too large for a template")
    assert hint.endswith("the limit is 1,000,000; set SCMC_MAX_TEMPLATE_BYTES to raise it")


def three_mb_flow(path: Path) -> Path:
    step = "  - [x, x, l{}, [_obj_, {{_addr_: torch.nn.Identity}}, _call_]]\n"
    lines = ["INPUTS: [x]\nFLOW:\n"]
    size, i = 0, 0
    while size < 3_000_000:
        lines.append(step.format(i))
        size += len(lines[-1])
        i += 1
    path.write_text("".join(lines))
    return path


def test_a_3_mb_flow_list_is_refused_at_once_and_the_limit_can_be_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    path = three_mb_flow(tmp_path / "flow.yaml")
    start = time.monotonic()
    assert read_fails(path)[0] == "E0005"
    assert time.monotonic() - start < 2  # ruamel would take ~16 s to compose it on a slow machine
    monkeypatch.setenv("SCMC_MAX_TEMPLATE_BYTES", "10_000")
    small = tmp_path / "small.yaml"
    small.write_text("FLOW: []\n" + "#" * 20_000 + "\n")
    assert read_fails(small)[0] == "E0005"
    monkeypatch.setenv("SCMC_MAX_TEMPLATE_BYTES", "100000")
    assert read_template(small).data == {"FLOW": []}


@pytest.mark.parametrize("setting", ["lots", "-1", "0", "1.5", "inf"])
def test_a_limit_setting_that_is_not_a_positive_number_is_an_error(setting: str, monkeypatch) -> None:
    from scmc.limits import limit

    monkeypatch.setenv("SCMC_MAX_YAML_DEPTH", setting)
    with pytest.raises(CompileError) as exc:
        limit("SCMC_MAX_YAML_DEPTH")
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0009"
    assert diag.message == f"SCMC_MAX_YAML_DEPTH={setting!r} is not a positive integer (the default is 64)"


def test_the_limits_table_in_docs_security_md_matches_scmc_limits() -> None:
    import re

    from scmc.limits import LIMITS

    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    section = text[text.index("## Limits") :]
    rows = dict(re.findall(r"^\| `(SCMC_MAX_\w+)` \| ([^|]+?) \|", section, re.M))
    assert set(rows) == set(LIMITS)
    for env, spec in LIMITS.items():
        shown = f"{spec.default:,}" if spec.integer else f"{spec.default:g}"
        assert rows[env] == shown, env
        assert re.search(rf"^\| `{env}` \| [^|]+ \| {spec.code} \|", section, re.M), env


def test_yaml_nesting_beyond_the_limit_is_e0106_with_the_number() -> None:
    text = "a: " + "[" * 65 + "]" * 65 + "\n"
    with pytest.raises(CompileError) as exc:
        parse_yaml(text, "t.yaml")
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.message) == ("E0106", "the YAML nests more than 64 levels deep")
    assert parse_yaml("a: " + "[" * 60 + "]" * 60 + "\n", "t.yaml")  # within the limit


def test_a_p_value_with_a_5000_digit_integer_is_refused() -> None:
    with pytest.raises(CompileError) as exc:
        parse_override("width=" + "9" * 5000)
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0211"
    assert diag.message == (
        "the value in `-p width=" + "9" * 54 + "... (5,006 characters)` "
        "is not usable: an integer of 5,000 digits is too long (the limit is 1,000; set SCMC_MAX_INT_DIGITS to raise it)"
    )


def test_the_jinja_time_limit_is_one_budget_for_the_whole_build(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from scmc.load import build_budget

    monkeypatch.setenv("SCMC_MAX_JINJA_SECONDS", "1")
    slow = "v:\n  _jinja_: '{% for i in range(300) %}{% for j in range(1000) %}{% endfor %}{% endfor %}x'\n"
    data = parse_yaml(slow, "t.yaml")
    start = time.monotonic()
    with build_budget():
        with pytest.raises(CompileError) as exc:
            for _ in range(200):  # each call is well under a second; together they are not
                expand(data, Parameters())
    assert time.monotonic() - start < 30
    (diag,) = exc.value.diagnostics
    assert diag.code == "E0311"
    assert diag.message == "Jinja rendering in this build took longer than 1 s (stopped in this block)"
    assert diag.hint.endswith("the limit is 1; set SCMC_MAX_JINJA_SECONDS to raise it")


def test_the_rendered_output_of_a_build_is_bounded_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from scmc.load import build_budget

    monkeypatch.setenv("SCMC_MAX_JINJA_BUILD_CHARS", "100000")
    data = parse_yaml("v:\n  _jinja_: \"{{ 'a' * 40000 }}\"\n", "t.yaml")
    with build_budget():
        expand(data, Parameters())
        expand(data, Parameters())
        with pytest.raises(CompileError) as exc:
            expand(data, Parameters())
    assert exc.value.diagnostics[0].message == (
        "Jinja block too large: the blocks of this build render more than 100,000 characters"
    )


JINJA_MEMORY = """\
import resource, sys, time
from scmc.diagnostics import CompileError
from scmc.load import Parameters, expand, parse_yaml

start = time.monotonic()
try:
    expand(parse_yaml(sys.argv[1], "t.yaml"), Parameters())
    print("rendered")
except CompileError as exc:
    print(exc.diagnostics[0].code, exc.diagnostics[0].message)
print(time.monotonic() - start)
try:  # VmHWM: the peak of this process image (ru_maxrss would carry over the parent's peak across exec)
    status = open("/proc/self/status").read()
    print(int(status.split("VmHWM:")[1].split()[0]) // 1024)
except (OSError, IndexError):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.parametrize(
    "expression, message",
    [
        (
            "range(8000) | map('center', 100000) | list | length",
            "Jinja block too large: a lazy sequence (map, select, ...) makes items of more than 1,000,000 "
            "characters and items (at least 1,000,010)",
        ),
        (
            "('a\\n' * 400000) | indent(100000) | length",
            "Jinja block too large: `indent` would build a string longer than 1,000,000",
        ),
        (
            "range(100000) | join('a' * 999999) | length",
            "Jinja block too large: `join` would build a string longer than 1,000,000",
        ),
    ],
)
def test_jinja_size_guards_fire_before_allocating(expression: str, message: str) -> None:
    """Issue 19: these built 1.3 GB (or ran out of memory) before a guard looked at the result."""
    import json
    import os
    import subprocess
    import sys

    text = "v:\n  _jinja_: " + json.dumps("{{ " + expression + " }}") + "\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime" / "src")])}
    run = subprocess.run(
        [sys.executable, "-c", JINJA_MEMORY, text], capture_output=True, text=True, timeout=120, env=env
    )
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stderr
    assert lines[0] == f"E0314 {message}"
    assert float(lines[1]) < 30
    assert int(lines[2]) < 300  # MB of peak resident memory, the interpreter and ruamel included


# --------------------------------------------------------------------------- -p precedence, whole builds

WIDTH_MULT = """\
PARAMETERS:
  DEFAULT: {backbone: atto}
  SHARED: {width_mult: 1.0, num_classes: 10}
  atto: {width: 8}
  small: {width: 16}
INPUTS: [x]
INPUT_SHAPES: {x: [4]}
FLOW:
  - _jinja_yaml_: |-
      - _jinja_group_: {{ backbone }}
      {% raw %}
        _jinja_yaml_: |-
          - [x, h, fc, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ (width * width_mult) | int }}}}]]
      {% endraw %}
      - [h, y, head, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: {{ num_classes }}}}]]
"""


def build_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    from click.testing import CliRunner

    from scmc.cli import main

    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(main, ["build", *args, "-o", "out", "--no-cache", "-q"])


@pytest.mark.parametrize("spelling", ["small: {width_mult: 0.75}", "small.width_mult=0.75"])
def test_a_group_value_given_on_the_command_line_wins_over_shared(spelling: str, tmp_path: Path, monkeypatch) -> None:
    """Issue 16: this built the unscaled network (or stopped with E0212) while the header claimed the value."""
    (tmp_path / "net.yaml").write_text(WIDTH_MULT)
    result = build_in(tmp_path, monkeypatch, "net.yaml", "-p", "backbone=small", "-p", spelling)
    assert result.exit_code == 0, result.output
    import json

    src = tmp_path / "out" / "src" / "net_small"
    assert "torch.nn.Linear(in_features=4, out_features=12, bias=True)" in (src / "model.py").read_text()  # 16 * 0.75
    manifest = json.loads((src / "manifest.json").read_text())
    assert manifest["rendered_groups"] == {"small": {"width": 16, "width_mult": 0.75, "num_classes": 10}}


def test_a_default_value_for_a_shared_key_applies_to_the_default_group(tmp_path: Path, monkeypatch) -> None:
    """Issue 18: `-p 'DEFAULT: {num_classes: 8}'` stopped with E0202; structcast-model applies it."""
    import json

    (tmp_path / "net.yaml").write_text(WIDTH_MULT)
    result = build_in(tmp_path, monkeypatch, "net.yaml", "-p", "DEFAULT: {num_classes: 8}")
    assert result.exit_code == 0, result.output
    src = tmp_path / "out" / "src" / "net_atto"
    assert "torch.nn.Linear(in_features=8, out_features=8, bias=True)" in (src / "model.py").read_text()
    assert json.loads((src / "manifest.json").read_text())["resolved_parameters"]["num_classes"] == 8


def test_a_value_for_a_group_the_build_does_not_use_is_an_error_naming_the_used_group(tmp_path, monkeypatch) -> None:
    """Issue 13: `-p small.width=4` built atto without a word."""
    (tmp_path / "net.yaml").write_text(WIDTH_MULT)
    result = build_in(tmp_path, monkeypatch, "net.yaml", "-p", "small.width=4")
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        "net.yaml:5:3: error[E0217]: `-p small.width=4` sets group `small`, which this build does not use: "
        "the blocks of this build render with group `atto`"
    )
    assert "= help: select it with `-p backbone=small`, or leave out `-p small.width=4`" in result.output
    assert not (tmp_path / "out").exists()


def test_a_dataset_preset_with_a_wrongly_typed_value_is_a_diagnostic(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "net.yaml").write_text(WIDTH_MULT)
    (tmp_path / "data.yaml").write_text(
        "PARAMETERS:\n  DEFAULT: {batch_size: big}\n_jinja_yaml_: |-\n  kind: digits\n  batch_size: {{ batch_size }}\n"
    )
    result = build_in(tmp_path, monkeypatch, "net.yaml", "--dataset", "data.yaml")
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[0] == (
        "data.yaml:3:1: error[E1203]: `batch_size`: Input should be a valid integer, unable to parse string as an "
        "integer (in the output of this Jinja block)"
    )
    assert "internal compiler error" not in result.output


def test_a_recursion_error_anywhere_is_a_diagnostic_naming_the_template_not_exit_70(tmp_path: Path) -> None:
    """The command line's last resort: a stage without a bound of its own overflows the stack."""
    import os
    import subprocess
    import sys

    (tmp_path / "net.yaml").write_text(WIDTH_MULT)
    code = "import sys; sys.setrecursionlimit(150); from scmc.cli import run; run(['build', 'net.yaml', '-o', 'out', '--no-cache'])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime" / "src")])}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "internal compiler error" not in run.stderr
    assert run.stderr.splitlines()[0] == "error[E0008]: compiling net.yaml recursed too deeply"
    assert not (tmp_path / "out").exists()


def test_jinja_nesting_is_refused_beyond_the_limit_and_rendered_within_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def nested(levels: int) -> str:
        return "v:\n  _jinja_: '" + "{% if 1 %}" * levels + "ok" + "{% endif %}" * levels + "'\n"

    assert render(nested(16)) == {"v": "ok"}
    with pytest.raises(CompileError) as exc:
        render(nested(17))
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.message) == ("E0315", "Jinja tags or brackets nest more than 16 levels deep")
    assert diag.hint.endswith("(the limit is 16; set SCMC_MAX_JINJA_NESTING to raise it)")
    monkeypatch.setenv("SCMC_MAX_JINJA_NESTING", "18")
    assert render(nested(17)) == {"v": "ok"}


def test_every_key_of_an_upstream_p_mapping_must_apply_not_only_one_of_them() -> None:
    with pytest.raises(CompileError) as exc:
        overridden("DEFAULT: {backbone: femto, num_clases: 3}")
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.message) == (
        "E0213",
        "`-p DEFAULT: {backbone: femto, num_clases: 3}` sets `num_clases`, which no template of this build defines",
    )
    assert diag.hint.startswith("did you mean `num_classes`?")


def test_an_unknown_group_in_an_upstream_p_mapping_is_an_error_naming_it() -> None:
    with pytest.raises(CompileError) as exc:
        overridden("femtoo: {depths: [1]}")
    (diag,) = exc.value.diagnostics
    assert (diag.code, diag.message) == (
        "E0214",
        "`-p femtoo: {depths: [1]}` names group `femtoo`, which no template defines",
    )
    assert diag.hint == "did you mean `femto`?"
