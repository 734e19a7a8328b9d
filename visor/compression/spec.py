"""Parse token-reduction specs such as ``pooling:2x`` or ``visionzip:0.25``.

A spec is ``NAME[:AMOUNT]``. AMOUNT says how many visual tokens survive, in one of three spellings:

* a kept fraction in (0, 1]: ``0.25`` keeps a quarter;
* a reduction factor with an ``x`` suffix, >= 1: ``2x`` keeps half, ``4x`` a quarter;
* a kept percentage: ``25%``.

Only the syntax is checked here; ``visor.compression.registry.build_reducer`` resolves NAME (and lists
what AMOUNT means for each reducer).
"""

from __future__ import annotations

import math
import re

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


def parse_amount(text: str) -> float:
    """Parse AMOUNT (``0.25``, ``4x`` or ``25%``) into the kept fraction, in (0, 1]."""
    raw = text.strip().lower()
    try:
        if raw.endswith("x"):
            factor = float(raw[:-1])
            if not math.isfinite(factor) or factor < 1:
                raise ValueError(f"a reduction factor must be >= 1 (e.g. '2x'), got {text!r}")
            return 1.0 / factor
        if raw.endswith("%"):
            keep = float(raw[:-1]) / 100.0
        else:
            keep = float(raw)
    except ValueError as err:
        if "must be" in str(err):
            raise
        raise ValueError(
            f"cannot parse reduction amount {text!r}: use a kept fraction like '0.25', "
            f"a factor like '4x', or a percentage like '25%'"
        ) from err
    if not (math.isfinite(keep) and 0 < keep <= 1):
        raise ValueError(f"a kept fraction must be in (0, 1], got {text!r}")
    return keep


def parse_reduce_spec(text: str, default_keep: float | None = None) -> tuple[str, float]:
    """Parse ``NAME[:AMOUNT]`` into ``(name, keep_fraction)``.

    ``default_keep`` is used when AMOUNT is left out; without it a missing AMOUNT is an error.
    """
    name, sep, amount = text.strip().partition(":")
    name = name.strip().lower()
    if not _NAME.match(name):
        raise ValueError(f"bad reducer spec {text!r}: expected NAME[:AMOUNT], e.g. 'pooling:2x' or 'pooling:0.25'")
    if not sep or not amount.strip():
        if default_keep is None:
            raise ValueError(f"reducer spec {text!r} needs an amount, e.g. '{name}:2x' or '{name}:0.25'")
        return name, float(default_keep)
    return name, parse_amount(amount)


def kept_tokens(n_tokens: int, keep_fraction: float) -> int:
    """Tokens left after keeping ``keep_fraction`` of ``n_tokens`` (rounded half up, at least one)."""
    if n_tokens <= 0:
        raise ValueError(f"token count must be positive, got {n_tokens}")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    return max(1, math.floor(n_tokens * keep_fraction + 0.5))
