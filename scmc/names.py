"""Generated names: snake_case attribute names, the identifier test, and `Namespace`, which
issues every name the compiler makes up.

Standard library only, so every stage (lowering, the passes, the pipeline) can use it
without depending on the lowering.
"""

from __future__ import annotations

import keyword
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable

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


class NameClash(ValueError):
    """`Namespace.claim` of a name that is already taken or that Python would not read as itself."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"`{name}` {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class Numbering:
    """How `Namespace.fresh` spells the k-th alternative (k = 1, 2, ...) to a base that is taken:
    `base{sep}{first + k - 1}`, or with `underscores` the base followed by k more `_`.

    The generated code has several spellings, and each is part of what a package exposes (attribute
    names are state_dict keys, constructor arguments are keywords, class names are importable), so
    each kind of name keeps its own: the constants below name them."""

    sep: str = "_"
    first: int = 2
    underscores: bool = False

    def __post_init__(self) -> None:
        if not ("a" + self.sep + "1").isidentifier() or self.first < 0:
            raise ValueError(f"Numbering({self.sep!r}, {self.first}) would not spell identifiers")

    def alternative(self, base: str, k: int) -> str:
        return base + "_" * k if self.underscores else f"{base}{self.sep}{self.first + k - 1}"


SUFFIXED = Numbering("_", 2)  # name, name_2, name_3: the default (stage attributes, lifted arguments, optimizer steps)
ATTRIBUTE = Numbering("_", 1)  # conv, conv_1, conv_2: attributes of unnamed layers (state_dict keys)
JOINED = Numbering("", 2)  # BasicBlock, BasicBlock2 (classes); x_, x_2 (forward locals); fc_out, fc_out2
UNDERSCORED = Numbering(underscores=True)  # torch_, torch__: constructor arguments renamed off a global


def _key(name: str) -> str:
    return unicodedata.normalize("NFKC", name)


def _spelling(base: str) -> str:
    """BASE spelled as an identifier, as close to it as can be: NFKC-normalized, each character an
    identifier cannot hold as `_`, a dunder or name-mangled base (`__init__`, `__x`) as its stem and
    a `_` (`init_`), a `_` before a leading digit. A keyword stays as it is: every Namespace has the
    keywords taken, so it gets numbered like any other taken name."""
    text = "".join(c if ("a" + c).isidentifier() else "_" for c in _key(base))
    if _key(text) != text:  # characters that NFKC combines with their neighbours: spell them in ASCII
        text = "".join(c if c.isascii() and ("a" + c).isidentifier() else "_" for c in text)
    if text.startswith("__"):
        text = (text.strip("_") or "value") + "_"
    text = text or "name"
    if not text[0].isidentifier():  # a digit or a combining mark
        text = "_" + text
    return text


class Namespace:
    """One scope of generated code (a file, a class, a forward, an argument list): the names taken in
    it and the names it has issued. Every generated identifier comes from one (tests/test_namespace.py
    fails on a collision loop anywhere else in scmc/).

    Names are compared as Python compares them, NFKC-normalized (`ℌ` is `H`); keywords are always
    taken. `reserve` marks names as taken without a check (the file's imports, builtins, reserved
    words, template names that may repeat), `claim` takes one exact name that must be kept and raises
    `NameClash` if it cannot be, and `fresh` makes up a new one from a base. Deterministic: what it
    returns depends only on the calls made, in their order."""

    def __init__(self, taken: Iterable[str] = (), numbering: Numbering = SUFFIXED):
        self.numbering = numbering
        self._taken: set[str] = {*keyword.kwlist, "__debug__"}
        self._issued: list[str] = []
        self.reserve(taken)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._taken

    @property
    def issued(self) -> tuple[str, ...]:
        """The names `claim` and `fresh` returned, in order."""
        return tuple(self._issued)

    def reserve(self, names: Iterable[str]) -> None:
        for name in names:
            self._taken.add(_key(name))

    def child(self) -> Namespace:
        """A scope inside this one: it sees every name taken here; what it issues stays in it."""
        inner = Namespace(numbering=self.numbering)
        inner._taken = set(self._taken)
        return inner

    def claim(self, name: str) -> str:
        """Take NAME exactly; `NameClash` if Python would not read it as itself or it is taken."""
        if not is_name(name):
            reason = "is not a Python identifier"
            if isinstance(name, str) and name.isidentifier() and _key(name) != name:
                reason = f"is read by Python as `{_key(name)}`"
            elif isinstance(name, str) and keyword.iskeyword(name):
                reason = "is a Python keyword"
            raise NameClash(str(name), reason)
        if name in self:
            raise NameClash(name, "is already taken")
        self._taken.add(name)
        self._issued.append(name)
        return name

    def fresh(self, base: str, numbering: Numbering | None = None) -> str:
        """A name taken nowhere in this scope: BASE spelled as an identifier (`_spelling`) if it is free,
        else its first free alternative under NUMBERING (the namespace's own by default); a taken
        `_` continues as `value`."""
        stem = _spelling(base)
        spell = numbering or self.numbering
        if stem == "_" and stem in self:  # numbered, `_` would become a dunder-like `__2`
            stem = "value"
        candidate, k = stem, 0
        while _key(candidate) in self._taken:
            k += 1
            candidate = spell.alternative(stem, k)
        self._taken.add(candidate)
        self._issued.append(candidate)
        return candidate
