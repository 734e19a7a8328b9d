"""How sure a comparison of two evaluations is: a paired, family-stratified bootstrap.

Two methods evaluated on the same items differ by a few points on a few hundred items; whether such a gap
is a property of the methods or of the items drawn is what a confidence interval says. The means of this
project are macro averages over task families (:func:`visor.eval.graders.aggregate`), so the bootstrap
resamples items *within* each family (every family keeps its item count, as in the test split) and resamples
the *same* items for both methods (paired: an item both get right or both get wrong adds no noise to the gap).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class GapInterval:
    """``gap`` = macro mean of A minus macro mean of B over ``families``, in the scores' unit (fractions for
    accuracy); ``low``/``high`` bound its central ``level`` bootstrap interval; ``n_items`` items were paired."""

    gap: float
    low: float
    high: float
    level: float
    n_items: int


def scores_by_id(records: Iterable) -> dict[str, tuple[str, float]]:
    """Per-item ``{id: (family, score)}`` from evaluated items (``ItemResult``s or mappings with ``id``, ``family``,
    ``score``); an unscored item counts 0, as in :func:`visor.eval.graders.aggregate`."""
    def field(rec, name):
        return rec[name] if isinstance(rec, Mapping) else getattr(rec, name)

    return {field(rec, "id"): (field(rec, "family"), float(field(rec, "score") or 0.0)) for rec in records}


def read_scores(path: str | Path) -> dict[str, tuple[str, float]]:
    """:func:`scores_by_id` of a predictions JSONL (``visor eval`` / ``visor reproduce``)."""
    with open(path) as fh:
        return scores_by_id(json.loads(line) for line in fh if line.strip())


def paired_gap_interval(a: Mapping[str, tuple[str, float]], b: Mapping[str, tuple[str, float]],
                        families: Iterable[str], *, n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0) -> GapInterval:
    """Bootstrap interval of ``macro_mean(a) - macro_mean(b)`` over ``families`` (those of them that have items).

    ``a`` and ``b`` map item ids to ``(family, score)``; only ids in both are used (the same items), and an id
    must have the same family in both. Deterministic for a given ``seed``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    wanted = set(families)
    diffs: dict[str, list[float]] = {}
    for item_id in sorted(set(a) & set(b)):
        (fam_a, score_a), (fam_b, score_b) = a[item_id], b[item_id]
        if fam_a != fam_b:
            raise ValueError(f"item {item_id!r} is {fam_a!r} in one evaluation and {fam_b!r} in the other")
        if fam_a in wanted:
            diffs.setdefault(fam_a, []).append(score_a - score_b)
    if not diffs:
        raise ValueError(f"no item of {sorted(wanted)} in both evaluations")
    rng = np.random.default_rng(seed)
    point = float(np.mean([np.mean(d) for d in diffs.values()]))
    draws = np.zeros(n_boot)
    for fam in sorted(diffs):
        d = np.asarray(diffs[fam])
        draws += d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    draws /= len(diffs)
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return GapInterval(point, float(low), float(high), level, sum(len(d) for d in diffs.values()))


def difficulty_gap_in_points(a: Mapping[str, tuple[str, float]], b: Mapping[str, tuple[str, float]],
                             difficulty: str) -> GapInterval:
    """:func:`paired_gap_interval` over the procedural benchmark's ``"easy"`` or ``"hard"`` families, in
    percentage points (rounded to 1e-6, so that 35.2% - 25.2% counts as 10 points)."""
    from visor.data.synth.config import EASY_FAMILIES, HARD_FAMILIES

    iv = paired_gap_interval(a, b, EASY_FAMILIES if difficulty == "easy" else HARD_FAMILIES)
    return GapInterval(*(round(100 * v, 6) for v in (iv.gap, iv.low, iv.high)), iv.level, iv.n_items)


def verdict(intervals: Sequence[tuple[GapInterval, str, float]]) -> str:
    """Whether a target made of conditions ``gap <op> bound`` (all must hold; op ``">="`` or ``"<="``) holds
    at the interval's level: ``"yes"`` when every condition holds over its whole interval, ``"no"`` when some
    condition fails over its whole interval, else ``"undecided"`` (the items cannot tell)."""
    for _, op, _ in intervals:
        if op not in (">=", "<="):
            raise ValueError(f"op must be '>=' or '<=', got {op!r}")

    def surely(iv: GapInterval, op: str, bound: float) -> bool:
        return iv.low >= bound if op == ">=" else iv.high <= bound

    def surely_not(iv: GapInterval, op: str, bound: float) -> bool:
        return iv.high < bound if op == ">=" else iv.low > bound

    if any(surely_not(*c) for c in intervals):
        return "no"
    return "yes" if all(surely(*c) for c in intervals) else "undecided"
