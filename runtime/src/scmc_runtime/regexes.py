"""Regular expressions of a backward template (layer groups, weight decay), checked before use.

A pattern that could backtrack catastrophically (nested or overlapping repeats, alternatives
that overlap under a repeat) is refused, as is one over ``MAX_REGEX_LENGTH`` characters: the
parameter names are matched in the training process, so a template's regex must not be able to
stall it. scmc applies the same check at build time (``SCMC_MAX_REGEX_LENGTH``, E1009).
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence, Tuple, Union

__all__ = ["MAX_REGEX_LENGTH", "REGEX_FIELDS", "Regexes", "compile_all", "regex_problem"]

Regexes = Union[str, "re.Pattern[str]", Sequence[Union[str, "re.Pattern[str]"]], None]

REGEX_FIELDS = ("layer_group_regexes", "weight_decay_regexes", "no_weight_decay_regexes")
MAX_REGEX_LENGTH = 1000  # scmc checks against SCMC_MAX_REGEX_LENGTH at build time; this is the runtime's own bound


def regex_problem(pattern: str, max_length: int = MAX_REGEX_LENGTH) -> Optional[str]:
    """Why ``pattern`` may not be matched against parameter names, or None when it is safe.

    Python's ``re`` backtracks: ``(a+)+$`` takes 2**n steps on ``aaa...ab``, and a match runs in C,
    where no timeout can stop it. So a pattern is refused when it is longer than ``max_length``,
    does not compile, uses a backreference, or repeats (``*``, ``+``, ``{m,}``) something that can
    itself match in more than one way: a nested repetition, or alternatives that can start with the
    same character. A nested repetition is accepted when the outer body also needs a character the
    inner one cannot match (``(?:\\w+\\.)*``: the dot ends each round), which keeps every
    ``layer_group_regexes`` pattern of the shipped templates."""
    if not isinstance(pattern, str):
        return f"a regular expression must be a string, not {type(pattern).__name__}"
    if len(pattern) > max_length:
        return f"it is {len(pattern):,} characters long (the limit is {max_length:,})"
    try:
        import re._parser as sre_parse  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - Python < 3.11
        import sre_parse  # type: ignore[no-redef]
    try:
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"it does not compile: {exc}"
    return _pattern_problem(tree, sre_parse)


_ALPHABET = [chr(c) for c in range(256)]


def _first_chars(items: Any, c: Any) -> Optional[set]:
    """The characters the sequence ``items`` can start with (None: any, or the empty string)."""
    for op, av in items:
        chars = _op_chars(op, av, c)
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            inner = _first_chars(av[2], c)
            if inner is None:
                return None
            return None if av[0] == 0 else inner  # an optional item: unsure (counted as overlapping)
        if op is c.SUBPATTERN:
            return _first_chars(av[-1], c)
        if op is c.BRANCH:
            out: set = set()
            for branch in av[1]:
                first = _first_chars(branch, c)
                if first is None:
                    return None
                out |= first
            return out
        if op in (c.AT,):
            continue
        return chars
    return None


def _op_chars(op: Any, av: Any, c: Any) -> Optional[set]:
    """The characters one single-character item matches (None: not a single-character item)."""
    if op is c.LITERAL:
        return {chr(av)}
    if op is c.NOT_LITERAL:
        return {ch for ch in _ALPHABET if ord(ch) != av}
    if op is c.ANY:
        return set(_ALPHABET)
    if op is c.IN:
        out: set = set()
        negate = False
        for item_op, item_av in av:
            if item_op is c.NEGATE:
                negate = True
            elif item_op is c.LITERAL:
                out.add(chr(item_av))
            elif item_op is c.RANGE:
                out |= {chr(x) for x in range(item_av[0], min(item_av[1], 255) + 1)}
            elif item_op is c.CATEGORY:
                out |= _category(item_av, c)
        return set(_ALPHABET) - out if negate else out
    return None


def _category(category: Any, c: Any) -> set:
    tests = {
        c.CATEGORY_DIGIT: str.isdigit,
        c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdigit(),
        c.CATEGORY_SPACE: str.isspace,
        c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
        c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
        c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
    }
    test = tests.get(category)
    return {ch for ch in _ALPHABET if test(ch)} if test else set(_ALPHABET)


def _repeats(items: Any, c: Any) -> List[Tuple[Any, Any]]:
    """Every repetition of more than one round inside ``items``, at any depth."""
    found = []
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            if av[1] > 1:
                found.append((op, av))
            found.extend(_repeats(av[2], c))
        elif op is c.SUBPATTERN:
            found.extend(_repeats(av[-1], c))
        elif op is c.BRANCH:
            for branch in av[1]:
                found.extend(_repeats(branch, c))
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found.extend(_repeats(av[1], c))
    return found


def _pattern_problem(items: Any, sre_parse: Any) -> Optional[str]:
    c = sre_parse  # the opcode names (LITERAL, MAX_REPEAT, ...) are re-exported there
    for op, av in items:
        if op in (c.GROUPREF, getattr(c, "GROUPREF_EXISTS", None)):
            return "it uses a backreference, which can take exponential time"
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)) and av[1] > 1:
            body = av[2]
            inner = _repeats(body, c)
            if inner:
                inner_chars: set = set()
                for _, inner_av in inner:
                    chars = _first_chars(inner_av[2], c)
                    inner_chars |= set(_ALPHABET) if chars is None else _all_chars(inner_av[2], c)
                separated = any(
                    (chars := _op_chars(item_op, item_av, c)) is not None and not (chars & inner_chars)
                    for item_op, item_av in body
                )
                if not separated:
                    return "it repeats a repetition (like `(a+)+`), which can take exponential time"
            for sub_op, sub_av in body:
                if (sub_op is c.BRANCH and _branch_overlap(sub_av[1], c)) or (
                    sub_op is c.SUBPATTERN and _branches_overlap(sub_av[-1], c)
                ):
                    return "it repeats alternatives that can match the same text (like `(a|ab)*`)"
        for child in _children(op, av, c):
            problem = _pattern_problem(child, sre_parse)
            if problem:
                return problem
    return None


def _all_chars(items: Any, c: Any) -> set:
    """Every character ``items`` can match anywhere (the whole alphabet when unsure)."""
    out: set = set()
    for op, av in items:
        chars = _op_chars(op, av, c)
        if chars is not None:
            out |= chars
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            out |= _all_chars(av[2], c)
        elif op is c.SUBPATTERN:
            out |= _all_chars(av[-1], c)
        elif op is c.BRANCH:
            for branch in av[1]:
                out |= _all_chars(branch, c)
        elif op is not c.AT:
            return set(_ALPHABET)
    return out


def _branches_overlap(items: Any, c: Any) -> bool:
    return any(op is c.BRANCH and _branch_overlap(av[1], c) for op, av in items)


def _branch_overlap(branches: Any, c: Any) -> bool:
    firsts = [_first_chars(b, c) for b in branches]
    for i, a in enumerate(firsts):
        for b in firsts[i + 1 :]:
            if a is None or b is None or a & b:
                return True
    return False


def _children(op: Any, av: Any, c: Any) -> List[Any]:
    if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
        return [av[2]]
    if op is c.SUBPATTERN:
        return [av[-1]]
    if op is c.BRANCH:
        return list(av[1])
    if op in (c.ASSERT, c.ASSERT_NOT):
        return [av[1]]
    return []


def compile_all(regexes: Regexes) -> List["re.Pattern[str]"]:
    if regexes is None:
        return []
    if isinstance(regexes, (str, re.Pattern)):
        regexes = [regexes]
    out = []
    for r in regexes:
        pattern = r.pattern if isinstance(r, re.Pattern) else r
        problem = regex_problem(pattern)
        if problem:
            raise ValueError(f"regular expression {pattern[:80]!r} is refused: {problem}")
        out.append(r if isinstance(r, re.Pattern) else re.compile(r))
    return out
