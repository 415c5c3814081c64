"""`scmc.names.Namespace`, the one issuer of generated names, and the rule that keeps it so.

The first part checks the Namespace itself: exact claims and their clashes, keywords and reserved
words, names that NFKC normalization makes one (`ℌ` is `H` to Python), dunders, each numbering,
nested scopes and determinism. The second part scans scmc/ with ``ast``: a loop that keeps
changing a name while it is in a set of taken names (``while name in taken: name = f"{base}{i}"``)
is a private collision loop, and only scmc/names.py may have one.
"""

from __future__ import annotations

import ast
import keyword
import random
import unicodedata
from pathlib import Path

import pytest

from scmc.names import (
    ATTRIBUTE,
    JOINED,
    SUFFIXED,
    UNDERSCORED,
    NameClash,
    Namespace,
    Numbering,
    is_name,
)

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- claim


def test_claim_keeps_the_exact_name_and_records_it() -> None:
    ns = Namespace(["torch"])
    assert ns.claim("head") == "head"
    assert "head" in ns
    assert ns.issued == ("head",)


def test_claim_of_a_taken_name_is_a_clash() -> None:
    ns = Namespace(["torch"])
    ns.claim("head")
    with pytest.raises(NameClash, match="`head` is already taken"):
        ns.claim("head")
    with pytest.raises(NameClash, match="`torch` is already taken"):
        ns.claim("torch")
    assert ns.issued == ("head",)


@pytest.mark.parametrize("word", ["class", "lambda", "None", "True", "def"])
def test_keywords_cannot_be_claimed(word: str) -> None:
    with pytest.raises(NameClash, match="keyword"):
        Namespace().claim(word)


@pytest.mark.parametrize("text", ["", "2x", "a b", "a-b", "a.b"])
def test_non_identifiers_cannot_be_claimed(text: str) -> None:
    with pytest.raises(NameClash, match="not a Python identifier"):
        Namespace().claim(text)


def test_a_name_that_nfkc_changes_cannot_be_claimed() -> None:
    with pytest.raises(NameClash, match="read by Python as `H`"):
        Namespace().claim("ℌ")


def test_nfkc_look_alikes_are_one_name() -> None:
    ns = Namespace(["ℌead"])  # Python reads this template name as `Head`
    assert "Head" in ns
    with pytest.raises(NameClash, match="already taken"):
        ns.claim("Head")
    assert ns.fresh("Head") == "Head_2"
    assert ns.fresh("ℌead") == "Head_3"


def test_debug_is_always_taken() -> None:
    assert "__debug__" in Namespace()
    with pytest.raises(NameClash):
        Namespace().claim("__debug__")


# --------------------------------------------------------------------------- fresh


def test_fresh_returns_the_base_while_it_is_free() -> None:
    ns = Namespace()
    assert ns.fresh("conv") == "conv"
    assert ns.fresh("norm") == "norm"
    assert ns.issued == ("conv", "norm")


@pytest.mark.parametrize(
    "numbering, expected",
    [
        (SUFFIXED, ["conv", "conv_2", "conv_3", "conv_4"]),
        (ATTRIBUTE, ["conv", "conv_1", "conv_2", "conv_3"]),
        (JOINED, ["conv", "conv2", "conv3", "conv4"]),
        (UNDERSCORED, ["conv", "conv_", "conv__", "conv___"]),
        (Numbering("", 0), ["conv", "conv0", "conv1", "conv2"]),
    ],
)
def test_numbering(numbering: Numbering, expected: list[str]) -> None:
    ns = Namespace(numbering=numbering)
    assert [ns.fresh("conv") for _ in expected] == expected
    other = Namespace()  # the same numbering given per call
    assert [other.fresh("conv", numbering) for _ in expected] == expected


def test_fresh_skips_reserved_claimed_and_issued_names() -> None:
    ns = Namespace(["conv", "conv_2"], numbering=SUFFIXED)
    ns.claim("conv_3")
    assert ns.fresh("conv") == "conv_4"
    assert ns.fresh("conv") == "conv_5"
    # a numbered name made from another base is taken like any other
    assert ns.fresh("conv_5") == "conv_5_2"


def test_fresh_fills_the_first_gap() -> None:
    ns = Namespace(["conv", "conv_2", "conv_4"], numbering=ATTRIBUTE)
    assert [ns.fresh("conv") for _ in range(4)] == ["conv_1", "conv_3", "conv_5", "conv_6"]


@pytest.mark.parametrize("word", ["class", "lambda", "None", "import"])
def test_keywords_are_numbered_like_any_taken_name(word: str) -> None:
    assert Namespace().fresh(word) == f"{word}_2"
    assert Namespace(numbering=UNDERSCORED).fresh(word) == f"{word}_"


def test_reserved_builtins_are_avoided_when_given() -> None:
    ns = Namespace(["self", "torch", "super", "list"], numbering=JOINED)
    assert [ns.fresh(n + "_") for n in ("self", "torch")] == ["self_", "torch_"]
    assert ns.fresh("list") == "list2"
    assert Namespace().fresh("list") == "list"  # builtins are taken only where a scope says so


@pytest.mark.parametrize(
    "base, expected",
    [
        ("__init__", "init_"),
        ("__class__", "class_"),
        ("__x", "x_"),
        ("__", "value_"),
        ("___", "value_"),
        ("_private", "_private"),
    ],
)
def test_dunder_and_mangled_bases_become_their_stem(base: str, expected: str) -> None:
    assert Namespace().fresh(base) == expected


def test_a_taken_underscore_continues_as_value() -> None:
    ns = Namespace(["_"])
    assert [ns.fresh("_"), ns.fresh("_"), ns.fresh("_", UNDERSCORED)] == ["value", "value_2", "value_"]
    assert Namespace().fresh("_") == "_"


def test_a_dunder_stem_that_is_taken_is_numbered() -> None:
    ns = Namespace(["init_"], numbering=JOINED)
    assert ns.fresh("__init__") == "init_2"


@pytest.mark.parametrize(
    "base, expected",
    [
        ("", "name"),
        ("3d", "_3d"),
        ("a b", "a_b"),
        ("kernel-size", "kernel_size"),
        ("ℌead", "Head"),
        ("ﬁlter", "filter"),
        ("e\u0301", "\u00e9"),  # composed by NFKC
        ("x\u0301", "x\u0301"),  # nothing to compose with: a combining mark continues an identifier
        ("\u0301x", "_\u0301x"),  # but cannot start one
    ],
)
def test_fresh_spells_any_base_as_an_identifier(base: str, expected: str) -> None:
    name = Namespace().fresh(base)
    assert is_name(name)
    assert name == expected


def test_random_bases_give_distinct_valid_names() -> None:
    rng = random.Random(11)
    alphabet = "ab_0 -.ℌH\u0301é_ﬁ"
    reserved = ["self", "torch", "a", "a_2", "b"]
    ns = Namespace(reserved)
    seen: set[str] = set()
    for _ in range(2000):
        base = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        name = ns.fresh(base, rng.choice([SUFFIXED, ATTRIBUTE, JOINED, UNDERSCORED]))
        assert is_name(name), (base, name)
        assert not name.startswith("__"), (base, name)
        assert not keyword.iskeyword(name)
        key = unicodedata.normalize("NFKC", name)
        assert key not in seen and key not in reserved, (base, name)
        seen.add(key)
    assert len(ns.issued) == 2000


def test_deterministic() -> None:
    def run() -> tuple[str, ...]:
        ns = Namespace(["x", "x_2", "ℌ"], numbering=JOINED)
        for base in ["x", "x", "__x", "H", "conv", "conv", "class", "", "3d"]:
            ns.fresh(base)
        ns.fresh("conv", ATTRIBUTE)
        ns.claim("head")
        return ns.issued

    first = run()
    assert first == run()
    assert first == ("x2", "x3", "x_", "H2", "conv", "conv2", "class2", "name", "_3d", "conv_1", "head")


# --------------------------------------------------------------------------- scopes


def test_a_child_scope_sees_the_outer_names_and_keeps_its_own() -> None:
    module = Namespace(["torch"], numbering=JOINED)
    module.claim("Block")
    forward = module.child()
    assert forward.numbering is JOINED
    assert forward.fresh("Block") == "Block2"
    assert forward.fresh("torch_") == "torch_"
    assert "torch_" not in module and "Block2" not in module
    other = module.child()
    assert other.fresh("Block") == "Block2"  # sibling scopes do not see each other
    assert forward.issued == ("Block2", "torch_")


# --------------------------------------------------------------------------- the rule


def _tested_names(expr: ast.AST, ops: tuple[type, ...]) -> set[str]:
    """Names X compared as `X in S` (or `f(X) in S`) with one of OPS anywhere in EXPR."""
    found: set[str] = set()
    for node in ast.walk(expr):
        if not isinstance(node, ast.Compare) or not any(isinstance(op, ops) for op in node.ops):
            continue
        left = node.left
        if isinstance(left, ast.Name):
            found.add(left.id)
        elif isinstance(left, ast.Call):
            found.update(a.id for a in left.args if isinstance(a, ast.Name))
    return found


def _builds_text(expr: ast.AST) -> bool:
    return any(
        isinstance(n, ast.JoinedStr)
        or (isinstance(n, ast.Constant) and isinstance(n.value, str))
        or (isinstance(n, ast.Attribute) and n.attr == "format")
        for n in ast.walk(expr)
    )


def _rebound(loop: ast.While | ast.For) -> set[str]:
    """Names the loop binds anew on each turn."""
    names: set[str] = set()
    if isinstance(loop, ast.For) and isinstance(loop.target, ast.Name) and _builds_text(loop.iter):
        names.add(loop.target.id)
    for stmt in loop.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    names.update(t.id for t in ast.walk(target) if isinstance(t, ast.Name))
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def collision_loops(source: str) -> list[int]:
    """Lines of the loops in SOURCE that search for a name nobody has: `while X in taken:` that
    rebinds X, or a loop that rebinds X and leaves it with `if X not in taken: break`."""
    lines = []
    for loop in ast.walk(ast.parse(source)):
        if not isinstance(loop, (ast.While, ast.For)):
            continue
        searched: set[str] = set()
        if isinstance(loop, ast.While):
            searched |= _tested_names(loop.test, (ast.In,))
        for stmt in loop.body:
            for node in ast.walk(stmt):
                if isinstance(node, ast.If) and any(isinstance(b, ast.Break) for b in node.body):
                    searched |= _tested_names(node.test, (ast.NotIn,))
        if searched & _rebound(loop):
            lines.append(loop.lineno)
    return lines


def test_only_names_py_has_a_collision_loop() -> None:
    found = {}
    for path in sorted((ROOT / "scmc").rglob("*.py")):
        lines = collision_loops(path.read_text(encoding="utf-8"))
        if lines:
            found[path.relative_to(ROOT).as_posix()] = lines
    assert set(found) == {"scmc/names.py"}, (
        f"name-collision loops outside scmc/names.py: {found}; make the name with a `Namespace` "
        "(claim for a name that must be kept, fresh for a new one)"
    )


OLD_LOOPS = {
    "numbered": """
def f(base, taken):
    candidate, i = base, 2
    while candidate in taken or candidate in names:
        candidate = f"{base}_{i}"
        i += 1
""",
    "underscores": """
def f(p, own):
    new = p + "_"
    while new in own or new in mapping.values():
        new += "_"
""",
    "while_true_break": """
def f(base, taken, n):
    while True:
        candidate = base if n == 0 else f"{base}_{n}"
        n += 1
        if candidate not in taken:
            break
""",
    "normalized": """
def f(base, taken):
    name = base
    while key(name) in taken:
        name = name + "_"
""",
    "for_count": """
def f(base, taken):
    for name in (f"{base}{i}" for i in itertools.count(2)):
        if name not in taken:
            break
""",
}

UNRELATED_LOOPS = {
    "dotted_path": """
def f(path):
    while "." in path:
        path = path.rsplit(".", 1)[0]
""",
    "attribute_test": """
def f(node):
    while node.op == "call" and node.target in TRANSPARENT:
        node = node.args[0]
""",
    "stack": """
def f(stack, seen):
    while stack:
        item = stack.pop()
        if item in seen:
            continue
        seen.add(item)
""",
    "first_not_allowed": """
def f(items, allowed):
    for item in items:
        if item not in allowed:
            break
""",
    "membership_no_rebind": """
def f(key, table):
    while key in table:
        table.pop(key)
""",
}


@pytest.mark.parametrize("case", sorted(OLD_LOOPS))
def test_the_scan_finds_a_collision_loop(case: str) -> None:
    assert collision_loops(OLD_LOOPS[case]) == [3 if case in ("for_count", "while_true_break") else 4]


@pytest.mark.parametrize("case", sorted(UNRELATED_LOOPS))
def test_the_scan_leaves_other_loops_alone(case: str) -> None:
    assert collision_loops(UNRELATED_LOOPS[case]) == []


def test_a_numbering_must_spell_identifiers() -> None:
    with pytest.raises(ValueError, match="would not spell identifiers"):
        Numbering("-", 2)
    with pytest.raises(ValueError, match="would not spell identifiers"):
        Numbering("_", -1)


# --------------------------------------------------------------------------- a site


def test_auto_names_number_around_the_template_names() -> None:
    """lower/naming.auto_name through its Namespace: template names kept, others `conv, conv_1, ...`,
    a keyword or builtin class name spelled `<name>_layer` first."""
    from scmc.ir import ChildInst, Ctor
    from scmc.lower.naming import auto_name

    def child(address: str, attr: str = "") -> ChildInst:
        return ChildInst(attr, "module", Ctor(address, (), ()), name_given=bool(attr))

    children = [
        child("torch.nn.Conv2d"),
        child("torch.nn.Conv2d", "conv2d_1"),
        child("torch.nn.LazyConv2d"),
        child("torch.nn.Conv2d"),
        child("scmc_runtime.layers.List"),
        child("scmc_runtime.layers.List"),
    ]
    auto_name(children)
    assert [c.attr for c in children] == ["conv2d", "conv2d_1", "conv2d_2", "conv2d_3", "list_layer", "list_layer_1"]
