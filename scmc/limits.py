"""The bounds on the loader's, Jinja's and the backward stage's work, in one table.

Every limit is a number with a documented default, the diagnostic code it raises and an
environment variable that raises (or lowers) it for one run, e.g.
``SCMC_MAX_JINJA_SECONDS=120 scmc build ...``. ``docs/security.md`` (section "Limits") lists
the same rows; ``tests/test_load.py`` checks that the two agree.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    env: str  # the environment variable that sets it
    default: float
    code: str  # the diagnostic a template that goes beyond it gets
    what: str  # what is counted, as docs/security.md says it
    integer: bool = True


LIMITS: dict[str, Limit] = {
    limit.env: limit
    for limit in (
        Limit("SCMC_MAX_TEMPLATE_BYTES", 1_000_000, "E0005", "bytes of one template file (checked before reading)"),
        Limit("SCMC_MAX_YAML_DEPTH", 64, "E0106", "levels of nesting of YAML collections"),
        Limit("SCMC_MAX_YAML_VALUES", 200_000, "E0105", "values one YAML text expands to (aliases repeat values)"),
        Limit(
            "SCMC_MAX_INT_DIGITS", 1_000, "E0107", "digits of an integer in a template, a rendered block or a -p value"
        ),
        Limit("SCMC_MAX_JINJA_SECONDS", 30.0, "E0311", "seconds of Jinja rendering in the whole build", integer=False),
        Limit("SCMC_MAX_JINJA_BUILD_CHARS", 5_000_000, "E0314", "characters all Jinja blocks of a build render"),
        Limit("SCMC_MAX_JINJA_BLOCK_CHARS", 500_000, "E0314", "characters one Jinja block renders"),
        Limit("SCMC_MAX_JINJA_VALUE", 1_000_000, "E0314", "characters or items one Jinja operation builds"),
        Limit("SCMC_MAX_JINJA_ARGUMENT", 100_000, "E0314", "an integer argument of a Jinja filter or method"),
        Limit("SCMC_MAX_JINJA_BITS", 65_536, "E0314", "bits of an integer `**` builds in Jinja"),
        Limit("SCMC_MAX_JINJA_NESTING", 16, "E0315", "nested brackets or block tags in a Jinja template"),
        Limit("SCMC_MAX_JINJA_PASSES", 64, "E0310", "nesting of values and Jinja passes (`{% raw %}`) in expand"),
        Limit("SCMC_MAX_REGEX_LENGTH", 1_000, "E1009", "characters of a regular expression in a backward template"),
    )
}


def limit(env: str) -> float:
    """The current value of a limit: its environment variable if set, else the default."""
    spec = LIMITS[env]
    raw = os.environ.get(env, "").strip()
    if not raw:
        return spec.default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or (spec.integer and value != int(value)):
        kind = "a positive integer" if spec.integer else "a positive number of seconds"
        from scmc.diagnostics import fail

        raise fail(
            "E0009",
            f"{env}={raw!r} is not {kind} (the default is {spec.default:,g})",
            hint="unset it to use the default, or give a larger number to raise the limit",
        )
    return int(value) if spec.integer else value


def int_limit(env: str) -> int:
    """:func:`limit` for a limit that counts (every one but the seconds of Jinja rendering)."""
    assert LIMITS[env].integer, env
    return int(limit(env))


def exceeded(env: str) -> str:
    """The end of a diagnostic's hint: how to raise the limit ``env``."""
    return f"the limit is {shown(env)}; set {env} to raise it"


def shown(env: str) -> str:
    """The current value of a limit as messages write it: 1,000,000 or 30."""
    value = limit(env)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"
