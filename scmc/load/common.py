"""The template keys the loader knows (Jinja blocks, layer graphs) and how a message quotes a long text."""

from __future__ import annotations

JINJA_YAML = "_jinja_yaml_"
JINJA_JSON = "_jinja_json_"
JINJA_TEXT = "_jinja_"
JINJA_GROUP = "_jinja_group_"
JINJA_PIPE = "_jinja_pipe_"
JINJA_ALIASES = (JINJA_YAML, JINJA_JSON, JINJA_TEXT)
JINJA_KEYS = (*JINJA_ALIASES, JINJA_GROUP, JINJA_PIPE)


LAYER_GRAPH_KEYS = (
    "PARAMETERS",
    "IMPORTS",
    "INPUTS",
    "OUTPUTS",
    "STRUCTURED_OUTPUT",
    "FLOW",
    "INFERENCE_FLOW",
    "INPUT_SHAPES",
)


def shorten(text: str, width: int = 80) -> str:
    """``text`` as a message quotes it: a long -p value or rendered line is cut, saying how long it was."""
    return text if len(text) <= width else f"{text[: width - 20]}... ({len(text):,} characters)"
