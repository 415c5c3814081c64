"""`-s NAME=DIMS:DTYPE`: integer inputs (token ids) for shape inference."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import cli, import_package

TEMPLATE = """\
INPUTS: [tokens]
OUTPUTS: [out]
FLOW:
  - [tokens, _, embed, [_obj_, {_addr_: torch.nn.Embedding}, {_call_: {num_embeddings: 100, embedding_dim: 8}}]]
  - [_, out, proj, [_obj_, {_addr_: torch.nn.LazyLinear}, {_call_: {out_features: 4}}]]
"""


def write_template(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(TEMPLATE)
    return path


def test_an_int64_shape_materializes_an_embedding_over_token_ids(tmp_path: Path) -> None:
    write_template(tmp_path)
    result = cli(tmp_path, "tokens.yaml", "-s", "tokens=16:int64", "-o", "pkg", "--name", "tokens_model", "-q")
    assert result.exit_code == 0, result.output
    model = import_package(tmp_path / "pkg", "tokens_model").Model()
    assert model.proj.in_features == 8  # concrete after the build
    assert model(torch.randint(0, 100, (2, 16))).shape == (2, 16, 4)


def test_the_colon_spelling_takes_a_dtype_too(tmp_path: Path) -> None:
    write_template(tmp_path)
    result = cli(tmp_path, "tokens.yaml", "-s", "tokens:16:int64", "-o", "pkg", "--name", "tokens_colon", "-q")
    assert result.exit_code == 0, result.output


def test_an_unknown_dtype_is_a_usage_error_listing_the_choices(tmp_path: Path) -> None:
    write_template(tmp_path)
    result = cli(tmp_path, "tokens.yaml", "-s", "tokens=16:int65", "-o", "pkg")
    assert result.exit_code == 2
    assert "dtype `int65` is not supported; use one of float32, float16, bfloat16, float64, int64, int32, bool" in (
        result.output
    )
    assert not (tmp_path / "pkg").exists()


def test_a_float_dummy_for_an_embedding_is_a_located_error_not_a_traceback(tmp_path: Path) -> None:
    write_template(tmp_path)
    result = cli(tmp_path, "tokens.yaml", "-s", "tokens=16", "-o", "pkg")
    assert result.exit_code == 1, result.output
    assert "tokens.yaml:4:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pkg").exists()
