"""`scmc graph`: the layer graph of a template or a package, drawn by Graphviz."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_scmc

CONVNEXT = "cfg/models/ConvNeXtV2.yaml"
SVG = "{http://www.w3.org/2000/svg}"

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (make install)")


def groups(root: ET.Element, kind: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == kind]


def texts(element: ET.Element) -> list[str]:
    return [t.text or "" for t in element.iter(f"{SVG}text")]


@needs_dot
def test_femto_renders_as_svg_with_clusters_shape_labelled_edges_and_collapsed_blocks(tmp_path: Path) -> None:
    out = tmp_path / "graph.svg"
    result = run_scmc(ROOT, "graph", CONVNEXT, "-p", "backbone=femto", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "clusters" in result.output
    svg = ET.parse(out).getroot()
    clusters = {g.findtext(f"{SVG}title") for g in groups(svg, "cluster")}
    # user layers are clusters, nested as they are: backbone > stem > its LayerNorm2d
    assert {"cluster_backbone", "cluster_backbone.stem", "cluster_backbone.stem.norm"} <= clusters
    assert "cluster_backbone.downsample3" in clusters
    edges = groups(svg, "edge")
    assert len(edges) >= 20
    edge_labels = {t for e in edges for t in texts(e)}
    # femto's stages at 224: 48x56x56, 96x28x28, 192x14x14, 384x7x7; the head's 1000 classes
    assert {"1x3x224x224", "1x48x56x56", "1x96x28x28", "1x192x14x14", "1x384x7x7", "1x1000"} <= edge_labels
    node_text = " ".join(t for g in groups(svg, "node") for t in texts(g))
    assert "Block x6" in node_text and "Block x2" in node_text  # femto's depths 2, 2, 6, 2, collapsed
    assert "block4 .. block9" in node_text
    assert "conv_dw" not in node_text  # inside the collapsed blocks


def test_dot_output_needs_no_dot_program_and_expand_opens_every_block(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no `dot` anywhere
    out = tmp_path / "graph.dot"
    result = run_scmc(ROOT, "graph", CONVNEXT, "-p", "backbone=atto", "--expand", "-o", str(out))
    assert result.exit_code == 0, result.output
    source = out.read_text()
    assert source.startswith("digraph Model {")
    assert "Block x" not in source
    # atto has 2 + 2 + 6 + 2 blocks, each its own cluster once expanded
    # clusters are the stages' members; their labels are the template's step names
    paths = [f"backbone.blocks{stage}.{j}" for stage, depth in enumerate((2, 2, 6, 2)) for j in range(depth)]
    assert all(f'"cluster_{path}"' in source for path in paths)
    assert all(f"block{i}: Block" in source for i in range(12))
    assert 'label="1x40x56x56"' in source  # atto's first stage

    shallow = tmp_path / "shallow.dot"
    result = run_scmc(ROOT, "graph", CONVNEXT, "-p", "backbone=atto", "--depth", "1", "-o", str(shallow))
    assert result.exit_code == 0, result.output
    text = shallow.read_text()
    assert "cluster_backbone" in text and "cluster_backbone.stem" not in text  # stem is one node now
    assert "stem\nStem" in text


def test_base_stays_readable_its_27_block_stage_is_one_node(tmp_path: Path) -> None:
    out = tmp_path / "base.dot"
    result = run_scmc(ROOT, "graph", CONVNEXT, "-p", "backbone=base", "-o", str(out), "-v")
    assert result.exit_code == 0, result.output
    nodes = int(result.output.split("(")[1].split()[0])
    assert nodes <= 30  # as many as femto's: the depth of a stage does not grow the picture
    assert "Block x27" in out.read_text() and 'label="1x1024x7x7"' in out.read_text()
    assert "collapsed block6 .. block32, Block x27" in result.output  # -v names what was collapsed


def test_a_missing_dot_program_is_one_line_naming_the_install_command(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    out = tmp_path / "graph.svg"
    result = run_scmc(ROOT, "graph", CONVNEXT, "-o", str(out))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error[E1400]:") and "apt-get install -y graphviz" in lines[0]
    assert "graph.dot" in lines[0]  # the way out that needs no Graphviz
    assert not out.exists()


@pytest.mark.parametrize(
    "target, expected",
    [
        ("cfg/models/NoSuchModel.yaml", "no such template or package directory"),
        ("cfg/models", "not a package built by scmc"),
    ],
)
def test_an_unknown_template_or_a_folder_that_is_not_a_package_is_one_line(tmp_path: Path, target, expected) -> None:
    result = run_scmc(ROOT, "graph", target, "-o", str(tmp_path / "g.dot"))
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "g.dot").exists()


def test_an_unknown_format_and_an_existing_file_are_refused_before_compiling(tmp_path: Path) -> None:
    result = run_scmc(ROOT, "graph", CONVNEXT, "-o", str(tmp_path / "graph.txt"))
    assert result.exit_code == 1 and "error[E1402]" in result.output and ".svg" in result.output
    existing = tmp_path / "graph.dot"
    existing.write_text("mine")
    result = run_scmc(ROOT, "graph", CONVNEXT, "-o", str(existing))
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    assert existing.read_text() == "mine"


def test_a_built_package_draws_like_its_template(tmp_path: Path, femto_package: Path) -> None:
    out = tmp_path / "package.dot"
    result = run_scmc(ROOT, "graph", str(femto_package), "-o", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "Block x6" in text and 'label="1x384x7x7"' in text


@needs_dot
def test_make_demo_writes_the_graph_and_the_inspect_table_next_to_the_package(
    tmp_path: Path, femto_package: Path, monkeypatch
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("scmc_demo_script", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    package = tmp_path / "convnextv2_femto"
    shutil.copytree(femto_package, package)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:{ROOT / 'runtime' / 'src'}")
    graph, table = demo.describe(package)
    assert graph == tmp_path / "convnextv2_femto.graph.svg" and table == tmp_path / "convnextv2_femto.inspect.txt"
    svg = ET.parse(graph).getroot()
    assert groups(svg, "cluster") and groups(svg, "edge")
    report = table.read_text()
    assert "parameters  5,233,240" in report and "training memory at batch 32" in report
    assert sorted(p.name for p in package.rglob("*")) == sorted(p.name for p in femto_package.rglob("*"))
