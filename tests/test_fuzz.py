"""Fuzzing the compiler with generated templates: a package whose forward runs, or diagnostics.

Hypothesis writes random layer graphs: allow-listed layers (Linear, LazyLinear, ReLU,
Identity, Dropout, Flatten, LayerNorm, the runtime's Add and Concatenate), user layers with
``PARAM`` nested in each other, Jinja blocks and loops, and names drawn partly from a hostile
pool (keywords, builtins, dunders, unicode, quotes, Jinja braces, names that generated code
reads). Whatever it writes, ``scmc build`` must either produce a package whose model runs
forward on inputs of the declared INPUT_SHAPES, or exit 1 with located diagnostics: never a
traceback, never an internal compiler error (exit 70).

CI runs a fixed, derandomized set of examples (``SCMC_FUZZ_EXAMPLES``, default 40);
``make fuzz`` runs 1000 random ones.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scmc.cli import main
from tests.conftest import import_package

EXAMPLES = int(os.environ.get("SCMC_FUZZ_EXAMPLES", "40"))
LONG_RUN = "SCMC_FUZZ_EXAMPLES" in os.environ

PLAIN_NAMES = ["h", "feat", "out", "y", "z", "hidden", "_", "a1", "tmp", "x2", "block", "proj", "größe", "π"]
HOSTILE_NAMES = [
    "class",
    "def",
    "lambda",
    "None",
    "True",  # keywords
    "print",
    "list",
    "id",
    "super",
    "int",
    "len",  # builtins
    "__init__",
    "__class__",
    "__dict__",
    "_private",  # dunders and private names
    "self",
    "torch",
    "forward",
    "training",
    "Model",
    "typing",
    "List",
    "operator",
    "scmc_runtime",  # read by generated code
    "ℌ",
    "ﬁ",
    "a b",
    "1x",
    "",
    "it's",
    'q"uote',
    '"""',
    "a\\b",
    "{{ x }}",
    "{% raw %}",
    "a.b",
    "x-y",  # not names
]


def names(hostile: float = 0.12, plain: list[str] = PLAIN_NAMES) -> st.SearchStrategy[str]:
    """A plain name, or with probability about `hostile` one from the hostile pool (plain names
    first, so that Hypothesis shrinks towards them)."""
    copies = max(1, round(len(HOSTILE_NAMES) * (1 - hostile) / hostile / len(plain)))
    return st.sampled_from(plain * copies + HOSTILE_NAMES)


def q(value) -> str:
    """A YAML flow scalar or collection (JSON is YAML)."""
    return json.dumps(value)


@dataclass
class Graph:
    """A layer graph being written: its steps and the width of each flow value (None: unknown)."""

    lines: list[str] = field(default_factory=list)
    widths: dict[str, int | None] = field(default_factory=dict)
    layer_names: int = 0


def obj(address: str, call=None) -> list:
    return ["_obj_", {"_addr_": address}, "_call_" if call is None else {"_call_": call}]


@st.composite
def leaf_step(draw, graph: Graph, width_var: str | None = None) -> tuple[list, str, int | None]:
    """One step calling an allow-listed layer on an existing value; returns (step, output, width)."""
    source = draw(st.sampled_from(sorted(graph.widths)))
    width = graph.widths[source]
    kind = draw(
        st.sampled_from(
            ["linear", "lazylinear", "relu", "identity", "dropout", "flatten", "layernorm", "add", "concat"]
        )
    )
    out_width = width
    inputs: object = source
    if kind == "linear":
        wrong = draw(st.integers(0, 9)) == 0
        in_features = (width or 4) + (1 if wrong else 0)
        out_width = draw(st.integers(1, 6))
        layer = obj("torch.nn.Linear", {"in_features": in_features, "out_features": out_width})
    elif kind == "lazylinear":
        out_width = draw(st.integers(1, 6))
        layer = obj(
            "torch.nn.LazyLinear",
            {"out_features": f"@{width_var}@" if width_var and draw(st.booleans()) else out_width},
        )
        if layer[2]["_call_"]["out_features"] == f"@{width_var}@":
            out_width = None  # the parameter decides
    elif kind == "relu":
        layer = obj("torch.nn.ReLU")
    elif kind == "identity":
        layer = obj("torch.nn.Identity")
    elif kind == "dropout":
        layer = obj("torch.nn.Dropout", {"p": draw(st.sampled_from([0.0, 0.1, 0.5, "eval: 1 / 4", 1.5]))})
    elif kind == "flatten":
        layer = obj("torch.nn.Flatten")
    elif kind == "layernorm":
        layer = obj("torch.nn.LayerNorm", {"normalized_shape": width or 4})
    elif kind == "add":
        other = draw(st.sampled_from(sorted(graph.widths)))
        inputs = [[source, other]]
        out_width = width if graph.widths[other] == width else None
        layer = obj("structcast_model.torch.layers.Add")
    else:
        other = draw(st.sampled_from(sorted(graph.widths)))
        inputs = [[source, other]]
        out_width = (width + graph.widths[other]) if width and graph.widths[other] else None
        layer = obj("structcast_model.torch.layers.Concatenate", {"dim": -1})
    output = draw(names())
    if draw(st.booleans()):
        name = draw(names()) + str(graph.layer_names)
        graph.layer_names += 1
        step = [inputs, output, name, layer]
    else:
        step = [inputs, output, layer]
    return step, output, out_width


@st.composite
def flow(draw, graph: Graph, user_layers: list[str], width_var: str | None, max_steps: int) -> None:
    """Steps appended to graph.lines: plain steps, user-layer calls, Jinja blocks and loops."""
    for _ in range(draw(st.integers(1, max_steps))):
        form = draw(
            st.sampled_from(["plain", "plain", "plain", "user", "user_kw", "jinja", "loop", "assign", "eval", "index"])
        )
        if form in ("user", "user_kw") and user_layers:
            source = draw(st.sampled_from(sorted(graph.widths)))
            width = draw(st.integers(1, 5))
            target = draw(st.sampled_from(user_layers))
            output = draw(names())
            inputs = {"inp": source} if form == "user_kw" else source
            step = [inputs, output, {"TYPE": target, "PARAM": {"DEFAULT": {"width": width}}}]
            graph.lines.append(f"- {q(step)}")
            graph.widths[output] = width
            continue
        if form == "assign":
            source = draw(st.sampled_from(sorted(graph.widths)))
            output = draw(names())
            graph.lines.append(f"- {q([source, output])}")
            graph.widths[output] = graph.widths[source]
            continue
        if form == "eval":
            source = draw(st.sampled_from(sorted(graph.widths)))
            output = draw(names())
            expr = draw(
                st.sampled_from(
                    [
                        f"{source} * 2",
                        f"{source} + 1.5",
                        f"-{source}",
                        f"{source}[:, :1]",
                        f"{source} ** 2 if True else {source}",
                        f"{source}.T",
                        "1 + 2",
                        f"{source} * 10**10**10",
                        f"__import__('os')",
                        f"{source} * math.pi",
                        f"torch.relu({source})",
                        f"torch.cat([{source}, {source}], -1)",
                    ]
                )
            )
            graph.lines.append(f"- {q(['eval: ' + expr, output])}")
            graph.widths[output] = 1 if ":1]" in expr else graph.widths[source]
            if "torch.cat" in expr and graph.widths[source]:
                graph.widths[output] = 2 * graph.widths[source]
            continue
        if form == "index":
            source = draw(st.sampled_from(sorted(graph.widths)))
            output = draw(names())
            graph.lines.append(f"- {q([source + '.' + draw(st.sampled_from(['0', '-1', 'key'])), output])}")
            graph.widths[output] = None
            continue
        step, output, out_width = draw(leaf_step(graph, width_var))
        text = q(step)
        if width_var:
            text = text.replace(f'"@{width_var}@"', "{{ " + width_var + " }}")
        if form == "plain":
            if width_var and "{{ " + width_var + " }}" in text:
                text = text.replace("{{ " + width_var + " }}", str(draw(st.integers(1, 5))))
                out_width = None
            graph.lines.append(f"- {text}")
        elif form == "jinja":
            graph.lines.append("- _jinja_yaml_: |-")
            graph.lines.append(f"    - {text}")
        else:  # a Jinja loop repeating a shape-preserving layer
            count = draw(st.integers(0, 3))
            graph.lines.append("- _jinja_yaml_: |-")
            graph.lines.append(f"    {{% for i in range({count}) %}}")
            if isinstance(step[0], str):
                graph.lines.append(f"    - {q([step[0], step[0], obj('torch.nn.ReLU')])}")
            graph.lines.append("    {% endfor %}")
            graph.lines.append(f"    - {text}")
        graph.widths[output] = out_width


@st.composite
def templates(draw) -> tuple[str, int]:
    """A whole template: root graph, up to three user layers (some using others), INPUT_SHAPES."""
    input_name = draw(st.one_of(st.just("x"), names(0.1)))
    in_width = draw(st.integers(1, 6))
    user_layers: list[str] = []
    blocks: list[str] = []
    for index in range(draw(st.integers(0, 3))):
        key = draw(names(0.15, ["Block", "Mlp", "Stage", "Head"]))
        key = f"{key}{index}" if key.isidentifier() else key
        graph = Graph(widths={"inp": None})
        draw(flow(graph, list(user_layers), "width", max_steps=3))
        written = [n for n in graph.widths if n != "inp"]
        lines = [f"{q(key)}:", f"  PARAMETERS: {q({'DEFAULT': {'width': draw(st.integers(1, 4))}})}"]
        if written and draw(st.booleans()):
            lines.append(f"  OUTPUTS: {q([written[-1]])}")
        lines.append("  FLOW:")
        lines += [f"    {line}" for line in graph.lines]
        blocks.append("\n".join(lines))
        user_layers.append(key)
    graph = Graph(widths={input_name: in_width})
    draw(flow(graph, user_layers, None, max_steps=5))
    written = [n for n in graph.widths if n != input_name]
    head = [f"INPUTS: {q([input_name])}", f"INPUT_SHAPES: {q({input_name: [in_width]})}"]
    if draw(st.booleans()):
        head.append("IMPORTS: [math, torch]")
    if written and draw(st.integers(0, 3)):
        head.append(f"OUTPUTS: {q([written[-1]])}")
    if draw(st.integers(0, 4)) == 0:
        head.append("STRUCTURED_OUTPUT: true")
    inference = []
    if draw(st.integers(0, 4)) == 0:  # an inference graph: the same steps, or a plain pass-through
        inference = [
            "INFERENCE_FLOW:",
            *(
                [f"  {line}" for line in graph.lines]
                if draw(st.booleans())
                else [f"  - {q([input_name, n])}" for n in written[-1:]]
            ),
        ]
    body = "\n".join([*head, "FLOW:", *[f"  {line}" for line in graph.lines], *inference, *blocks]) + "\n"
    return body, in_width


DIAGNOSTIC = re.compile(r"^fuzz\.yaml:\d+:\d+: error\[E\d{4}\]: ", re.M)
_counter = itertools.count()


def check_template(text: str, in_width: int) -> str:
    """Build `text`; returns "built" or "refused", failing on anything else."""
    import torch

    name = f"fuzz_{next(_counter)}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "fuzz.yaml").write_text(text, encoding="utf-8")
        previous = os.getcwd()
        os.chdir(tmp_path)
        try:
            result = CliRunner().invoke(main, ["build", "fuzz.yaml", "-o", str(tmp_path / "out"), "--name", name, "-q"])
        finally:
            os.chdir(previous)
        output = result.output
        assert result.exit_code in (0, 1), f"exit {result.exit_code} for\n{text}\n{output}"
        assert result.exception is None or isinstance(result.exception, SystemExit), f"{text}\n{output}"
        assert "Traceback" not in output and "internal compiler error" not in output, f"{text}\n{output}"
        if result.exit_code == 1:
            assert DIAGNOSTIC.search(output), f"no located diagnostic for\n{text}\n{output}"
            assert not (tmp_path / "out").exists()
            return "refused"
        package = import_package(tmp_path / "out", name)
        manifest = json.loads((tmp_path / "out" / "src" / name / "manifest.json").read_text())
        model = getattr(package, manifest["classes"]["model"])()
        shapes = manifest["input_shapes"]
        inputs = [torch.randn(3, *shapes[n]["shape"]) for n in shapes]
        for training in (False, True):
            model.train(training)
            try:
                with torch.no_grad():
                    model(*inputs)
            except Exception as exc:  # the build accepted it, so the generated model must run
                pytest.fail(
                    f"generated model fails in forward ({'training' if training else 'eval'}): "
                    f"{type(exc).__name__}: {exc}\n{text}\n{(tmp_path / 'out' / 'src' / name / 'model.py').read_text()}"
                )
        return "built"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG_RUN,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(templates())
def test_a_generated_template_builds_a_runnable_package_or_gives_diagnostics(case: tuple[str, int]) -> None:
    check_template(*case)


def test_the_fuzzer_writes_templates_that_build_as_well_as_templates_that_fail() -> None:
    """The generator is useful only if it reaches both outcomes (a fixed sample, derandomized)."""
    outcomes = []

    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(templates())
    def sample(case: tuple[str, int]) -> None:
        outcomes.append(check_template(*case))

    sample()
    assert "built" in outcomes and "refused" in outcomes, outcomes
