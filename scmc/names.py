"""Spelling of generated names: snake_case attribute names and the identifier test.

Standard library only, so every stage (lowering, the passes, the pipeline) can use it
without depending on the lowering.
"""

from __future__ import annotations

import keyword
import re
import unicodedata
from typing import Any

# Mixed-case acronyms that the camel-case split would cut (ReLU -> re_lu): spelled as torch does.
_ACRONYMS = (("PReLU", "Prelu"), ("ReLU", "Relu"), ("SiLU", "Silu"), ("GeLU", "Gelu"))


def to_snake(name: str) -> str:
    for acronym, word in _ACRONYMS:
        name = name.replace(acronym, word)
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return re.sub(r"\W+", "_", name).strip("_").lower() or "layer"


def is_name(text: Any) -> bool:
    """A Python identifier that is not a keyword and that Python reads as itself: identifiers are
    NFKC-normalized by the parser, so `ℌ` and `H` would be one name in generated code."""
    return (
        isinstance(text, str)
        and text.isidentifier()
        and not keyword.iskeyword(text)
        and unicodedata.normalize("NFKC", text) == text
    )
