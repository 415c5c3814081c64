"""scmc.expr: the `eval:` grammar is checked, folded and renamed without Python's eval."""

from __future__ import annotations

import math

import pytest

import scmc.expr as X
from scmc.addresses import AllowList


def constant(text: str, imports: dict[str, str] | None = None) -> X.Expr:
    """An expression in a layer argument: no flow values."""
    return X.parse(text, X.Context(AllowList(), imports or {}, None))


def flow(text: str, imports: dict[str, str] | None = None, names: frozenset[str] = X.ANY_NAME) -> X.Expr:
    """An expression in a FLOW input: names may be flow values."""
    return X.parse(text, X.Context(AllowList(), imports or {}, names))


def fold(text: str, imports: dict[str, str] | None = None):
    return X.fold(constant(text, imports), AllowList())


def rejected(text: str, *, in_flow: bool = True, imports: dict[str, str] | None = None) -> X.ExprError:
    with pytest.raises(X.ExprError) as exc:
        (flow if in_flow else constant)(text, imports)
    return exc.value


# --------------------------------------------------------------------------- accepted and folded


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("7 // 2", 3),
        ("2.0**16", 65536.0),
        ("48 * 4", 192),
        ("-(3 - 5) % 4", 2),
        ("1 if 2 > 1 else 0", 1),
        ("[1, 2, 3][1:]", [2, 3]),
        ("(1, 2)", (1, 2)),
        ("{'a': 1}['a']", 1),
        ("not (1 < 2 < 3) or 4", 4),
        ("max(3, 7) + len([1, 2])", 9),
        ("int(7 / 2)", 3),
        ("1 << 3 | 1", 9),
        ("'conv' + str(2)", "conv2"),
    ],
)
def test_constant_expressions_fold_at_build_time(text: str, value: object) -> None:
    assert fold(text) == value


def test_names_from_imports_are_spelled_out_as_addresses_and_folded() -> None:
    expr = constant("sqrt(16) + pi", {"sqrt": "math.sqrt", "pi": "math.pi"})
    assert expr.source == "math.sqrt(16) + math.pi"
    assert expr.addresses == ("math.sqrt", "math.pi")
    assert X.fold(expr, AllowList()) == 4.0 + math.pi


def test_a_module_import_allows_dotted_names_below_it() -> None:
    expr = constant("math.floor(7 / 2)", {"math": "math"})
    assert expr.source == "math.floor(7 / 2)"
    assert X.fold(expr, AllowList()) == 3


def test_flow_names_are_recorded_in_order_of_first_use() -> None:
    expr = flow("b * 2 + a[0] + b")
    assert expr.names == ("b", "a")
    assert expr.addresses == ()


def test_in_a_flow_imports_and_builtins_are_not_taken_for_flow_values() -> None:
    expr = flow("relu(x) + len(y)", {"relu": "torch.relu"})
    assert expr.names == ("x", "y")
    assert expr.source == "torch.relu(x) + len(y)"
    assert expr.addresses == ("torch.relu",)


def test_a_known_set_of_flow_names_wins_over_a_builtin_of_the_same_name() -> None:
    assert flow("max + 1", names=frozenset({"max"})).names == ("max",)


def test_an_expression_over_flow_values_does_not_fold() -> None:
    with pytest.raises(X.NotConstant):
        X.fold(flow("x + 1"), AllowList())


def test_rename_changes_flow_names_but_not_imported_names() -> None:
    expr = flow("cat([_, feat], 1) + _", {"cat": "torch.cat"})
    assert X.rename(expr, {"_": "x", "feat": "feature"}) == "torch.cat([x, feature], 1) + x"
    assert X.rename(expr, {}) == expr.source


# --------------------------------------------------------------------------- rejected


@pytest.mark.parametrize(
    "text",
    [
        "(lambda t: t * 2)(x)",
        "[t for t in x]",
        "{t: 1 for t in x}",
        "(y := x)",
        "f'{x}'",
        "print(*x)",
        "b'raw'",
        "...",
    ],
)
def test_syntax_outside_the_grammar_is_refused(text: str) -> None:
    assert rejected(text).code == "E0502"


@pytest.mark.parametrize("text", ["__import__('os')", "x.__class__", "math._private", "__builtins__"])
def test_dunder_names_and_private_attributes_are_refused_as_such(text: str) -> None:
    error = rejected(text)
    assert error.code == "E0502"
    assert "dunder names and private attributes are refused" in error.message


def test_an_attribute_of_a_flow_value_that_is_not_a_tensor_attribute_is_refused_with_a_hint_to_index() -> None:
    error = rejected("h.grad[0]")
    assert error.code == "E0503"
    assert error.message == (
        "attribute access `h.grad` on flow value `h` is outside the `eval:` grammar: "
        "`grad` is not one of the tensor attributes a template may use"
    )
    assert "x[...]" in error.hint


def test_an_attribute_of_a_call_result_outside_the_tensor_attributes_is_refused() -> None:
    assert rejected("max(1, 2).numerator").code == "E0503"


def test_a_tensor_attribute_read_from_something_that_is_not_a_tensor_is_refused_when_folded() -> None:
    with pytest.raises(X.ExprError) as exc:
        fold("max(1, 2).real")
    assert (exc.value.code, exc.value.message) == (
        "E0503",
        "`.real` is read from a value of type `int`, not from a tensor",
    )


def test_a_module_used_without_imports_gets_a_hint_to_import_it() -> None:
    error = rejected("torch.cat([a, b], 1)")
    assert error.code == "E0504"
    assert error.hint == "add `IMPORTS: [torch]` to the template"


def test_an_unknown_name_in_a_layer_argument_suggests_jinja() -> None:
    error = rejected("width * 2", in_flow=False)
    assert error.code == "E0504"
    assert "{{ width }}" in error.hint


def test_an_unknown_name_in_a_layer_argument_gets_a_did_you_mean_from_imports() -> None:
    assert rejected("sqr(2)", in_flow=False, imports={"sqrt": "math.sqrt"}).hint == "did you mean `sqrt`?"


@pytest.mark.parametrize(
    ("address", "code"),
    [("os.system", "E0402"), ("builtins.eval", "E0402"), ("torch.hub.load", "E0403"), ("torch.load", "E0403")],
)
def test_imported_names_go_through_the_address_allow_list(address: str, code: str) -> None:
    assert rejected("f(1)", imports={"f": address}).code == code


def test_text_that_is_not_an_expression_is_refused() -> None:
    assert rejected("import os").code == "E0501"
    assert rejected("x +").code == "E0501"


def test_very_long_expressions_are_refused() -> None:
    assert rejected("1 + " * 1000 + "1").code == "E0500"


# --------------------------------------------------------------------------- resource guards


@pytest.mark.parametrize(
    "text", ["2 ** 100000", "10 ** 5000", "1 << 100000", "'x' * 100000", "[0] * 20000", "list(range(10 ** 6))"]
)
def test_folding_refuses_to_build_huge_values(text: str) -> None:
    with pytest.raises(X.ExprError) as exc:
        fold(text)
    assert exc.value.code == "E0505"


def test_a_fold_that_raises_is_a_build_error_naming_the_expression() -> None:
    with pytest.raises(X.ExprError) as exc:
        fold("1 // 0")
    assert exc.value.code == "E0507"
    assert "1 // 0" in exc.value.message
    assert "ZeroDivisionError" in exc.value.message


def test_evaluation_never_calls_python_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    def refuse(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert fold("sqrt(2 ** 4) * 3 // 2", {"sqrt": "math.sqrt"}) == 6.0


# --------------------------------------------------------------------------- literals


@pytest.mark.parametrize(
    ("value", "plain"),
    [
        (1, True),
        (1.5, True),
        ("s", True),
        (None, True),
        ([1, (2, "a")], True),
        ({"k": [1]}, True),
        (float("inf"), False),
        ({1.5: 1}, False),
        (object(), False),
    ],
)
def test_plain_literals_are_what_can_be_emitted_with_repr(value: object, plain: bool) -> None:
    assert X.is_plain_literal(value) is plain


def test_the_running_value_and_other_underscore_names_are_ordinary_flow_names() -> None:
    assert flow("_ + _skip").names == ("_", "_skip")


# --------------------------------------------------------------------------- capabilities and bounds


def test_tensor_attributes_and_allowed_methods_of_flow_values_are_in_the_grammar() -> None:
    expr = flow("torch.arange(tokens.shape[1], device=tokens.device) + x.view(2, -1).mean(-1)", {"torch": "torch"})
    assert expr.names == ("tokens", "x")
    assert expr.addresses == ("torch.arange",)


def test_tensor_methods_evaluate_on_tensors_only() -> None:
    import torch

    expr = flow("torch.arange(tokens.shape[1], device=tokens.device) + tokens.view(2, -1).size(1)", {"torch": "torch"})
    value = X.evaluate(expr, {"tokens": torch.zeros(2, 3)}, AllowList())
    assert value.tolist() == [3, 4, 5]


@pytest.mark.parametrize(
    "method", ["numpy", "tolist", "item", "storage", "untyped_storage", "data_ptr", "set_", "apply_", "cuda", "tofile"]
)
def test_methods_that_reach_storage_python_objects_or_devices_are_refused(method: str) -> None:
    error = rejected(f"x.{method}()")
    assert error.code == "E0503"
    assert f"`{method}` is not one of the tensor methods a template may use" in error.message


def test_an_allowed_method_name_read_as_an_attribute_without_calling_it_is_refused() -> None:
    assert rejected("x.view").code == "E0503"


@pytest.mark.parametrize(
    "text",
    ["-" * 500 + "1", "1" + "+1" * 400, "[" * 150 + "]" * 150, "(" * 300 + "1" + ")" * 300, "f(" * 120 + ")" * 120],
)
def test_expressions_nesting_deeper_than_the_limit_are_refused_before_any_recursive_pass(text: str) -> None:
    error = rejected(text)
    assert (error.code, error.message) == ("E0508", f"expression nests more than {X.MAX_DEPTH} levels deep")


def test_an_expression_at_the_nesting_limit_still_folds() -> None:
    assert fold("-" * 90 + "1") == 1


@pytest.mark.parametrize(
    "text",
    [
        "[[0] * 10000] * 3000",
        "[['x' * 5000] * 2] * 1000",
        "math.factorial(10 ** 6)",
        "math.comb(10 ** 6, 5 * 10 ** 5)",
        "math.perm(10 ** 5)",
        "(999 ** 999) ** 999",
        "(2 ** 40000) * (2 ** 40000)",
        "math.prod([2 ** 30000, 2 ** 30000, 2 ** 30000])",
        "torch.ones(400000000, device='cpu')",
        "torch.zeros((20000, 20000))",
        "torch.full([20000, 20000], 1.0)",
        "torch.arange(0, 10 ** 9)",
        "torch.eye(20000)",
        "torch.ones(1).new_ones(20000, 20000)",
        "torch.ones(1).repeat(20000, 20000)",
    ],
)
def test_folding_estimates_sizes_before_building(text: str) -> None:
    with pytest.raises(X.ExprError) as exc:
        fold(text, {"math": "math", "torch": "torch"})
    assert exc.value.code == "E0505"


def test_the_size_estimate_counts_items_through_nesting() -> None:
    assert X.nested_size([0] * 10000) == 10000
    assert X.nested_size([[0] * 10] * 3) == 33
    assert X.nested_size({"ab": "cde"}) == 5
    assert fold("len([0] * 10000)") == 10000
    assert fold("math.factorial(20)", {"math": "math"}) == math.factorial(20)


def test_a_huge_tensor_is_refused_whatever_device_it_names_and_a_small_one_stays_on_meta_while_building() -> None:
    import torch

    with torch.device("meta"):
        small = fold("torch.ones(4, device='cpu')", {"torch": "torch"})
    assert small.device.type == "meta"
    with pytest.raises(X.ExprError) as exc:
        fold("torch.ones(400000000, device='cpu')", {"torch": "torch"})
    assert exc.value.message == f"expression builds a tensor of 400000000 elements (more than {X.MAX_NUMEL})"


@pytest.mark.parametrize("text", ["x[0](1)", "max(1, 2)(3)", "(x if x else y)()"])
def test_only_named_functions_and_tensor_methods_are_called(text: str) -> None:
    assert rejected(text).code == "E0506"


def test_a_flow_value_is_never_called() -> None:
    import operator

    with pytest.raises(X.ExprError) as exc:
        X.evaluate(flow("f(2)", names=frozenset({"f"})), {"f": operator.attrgetter("real")}, AllowList())
    assert exc.value.code == "E0506" and "`f` is a flow value" in exc.value.message
