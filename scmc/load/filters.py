"""The Jinja filters scmc adds to structcast's environment."""

from __future__ import annotations

import re
import sys
from typing import Any


class TemplateRaised(Exception):
    """The `raise_error` filter was used: the template itself refused these parameters."""


def _cumsum(values: Any) -> list[Any]:
    from itertools import accumulate

    return list(accumulate(values))


def _flags(flags: Any) -> int:
    if flags is None:
        return 0
    if isinstance(flags, str):
        flags = [flags]
    value = 0
    for name in flags:
        value |= re.RegexFlag[str(name).upper()]
    return value


def _regex_escape(value: str) -> str:
    return re.escape(value)


def _regex_replace(value: str, pattern: str, replacement: str = "", flags: Any = None) -> str:
    return re.compile(pattern, _flags(flags)).sub(replacement, value)


def _regex_findall(value: str, pattern: str, flags: Any = None) -> list[str]:
    return re.compile(pattern, _flags(flags)).findall(value)


def _regex_search(value: str, pattern: str, flags: Any = None) -> str | None:
    match = re.compile(pattern, _flags(flags)).search(value)
    return match.group(0) if match else None


def _raise_error(message: Any) -> None:
    raise TemplateRaised(str(message))


def _print_value(value: Any) -> Any:
    print(value, file=sys.stderr)  # stderr: stdout may carry formatted output
    return value


FILTERS = {
    "cumsum": _cumsum,
    "regex_escape": _regex_escape,
    "regex_replace": _regex_replace,
    "regex_findall": _regex_findall,
    "regex_search": _regex_search,
    "raise_error": _raise_error,
    "print_value": _print_value,
}
