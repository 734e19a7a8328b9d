"""Graders: score one predicted answer against one or more reference answers, in [0, 1].

Registered by name (items carry a ``grader`` field; an unknown name raises
:class:`UnknownGraderError` listing the known ones):

``exact``    VQA-style exact match after :func:`normalize_answer`: lower case, punctuation removed
             (a period inside a number such as ``3.5`` and a comma between digits are kept, as the VQA
             evaluation does), number words ``zero``-``ten`` to digits, articles ``a``/``an``/``the``
             dropped, whitespace collapsed.
``anls``     Average Normalised Levenshtein Similarity, the DocVQA metric, per item:
             ``1 - lev(p, g) / max(len(p), len(g))`` on lower-cased, whitespace-collapsed strings, set
             to 0 when the normalised distance is ``>= 0.5`` (so a similarity of exactly 0.5 scores
             0); max over references; two empty strings score 1.
``relaxed``  ChartQA relaxed accuracy: when both parse as numbers, correct iff
             ``|p - g| <= 0.05 * |g|``; a trailing ``%`` divides by 100 (so ``45%`` matches ``0.45``,
             as in the ChartQA evaluation), thousands separators and surrounding spaces are ignored.
             A reference of 0 requires a prediction of exactly 0 (the original code fell back to a
             string compare there, so ``0.0`` failed against ``0``; we compare numerically).
             Otherwise an exact, case-insensitive string match.
``yesno``    The first word of the prediction, normalised, must equal the reference's (``yes``/``no``).
``choice``   Multiple choice: the leading option letter of the prediction equals the reference letter.

When normalisation empties a string (the one-letter answer ``"A"`` is an article), ``exact`` compares
the lower-cased raw strings instead, so an empty prediction never matches ``"A"``.

Aggregation (:func:`aggregate`) averages items per family, then families per difficulty ("easy_mean"
and "hard_mean" are macro averages over families, as the paper averages over benchmarks). Items
that could not be scored (skipped, failed) are passed with ``score=None``: they count as 0 in every
mean and are reported in ``n_skipped``, so they never leave a denominator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, Union

Answers = Union[str, Sequence[str]]
Grader = Callable[[str, Answers], float]

_GRADERS: dict[str, Grader] = {}


class UnknownGraderError(KeyError):
    """Raised for a grader name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register_grader(name: str) -> Callable[[Grader], Grader]:
    """Decorator registering ``fn(prediction, answers) -> float`` under ``name``."""

    def deco(fn: Grader) -> Grader:
        if name in _GRADERS:
            raise ValueError(f"grader {name!r} is already registered")
        _GRADERS[name] = fn
        return fn

    return deco


def grader_names() -> tuple[str, ...]:
    """Names of all registered graders."""
    return tuple(sorted(_GRADERS))


def get_grader(name: str) -> Grader:
    """The grader registered under ``name`` (:class:`UnknownGraderError` if none)."""
    try:
        return _GRADERS[name]
    except KeyError:
        raise UnknownGraderError(f"unknown grader {name!r}; known graders: {', '.join(grader_names())}") from None


def grade(name: str, prediction: str, answers: Answers) -> float:
    """Score ``prediction`` with the grader ``name``."""
    return float(get_grader(name)(prediction, answers))


def _as_list(answers: Answers) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    out = [str(a) for a in answers]
    if not out:
        raise ValueError("no reference answers")
    return out


# ----------------------------------------------------------------------------------------------
# normalisation (after the VQA evaluation script)

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = set(r""";/[]"{}()=+\_-><@`,?!*#%^&$~|'.:""")
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation (module doc)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_IN_NUMBER.sub("", text)
    text = _PERIOD_NOT_IN_NUMBER.sub("", text)
    text = "".join(" " if ch in _PUNCT and ch != "." else ch for ch in text)
    words = []
    for w in text.split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(w)
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# graders


def _norm_or_raw(text: str) -> str:
    """:func:`normalize_answer`, or the lower-cased stripped text when normalising empties it (so a
    one-letter answer ``"A"`` is not turned into the empty string by article removal)."""
    n = normalize_answer(text)
    return n if n or not str(text).strip() else " ".join(str(text).strip().lower().split())


@register_grader("exact")
def exact_match(prediction: str, answers: Answers) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0."""
    p = _norm_or_raw(prediction)
    return 1.0 if any(p == _norm_or_raw(a) for a in _as_list(answers)) else 0.0


_CHOICE = re.compile(r"^\W*\(?([A-Za-z])\b")


@register_grader("choice")
def multiple_choice(prediction: str, answers: Answers) -> float:
    """Multiple choice: the prediction's leading option letter (``"B"``, ``"(b)"``, ``"B. cat"``)
    equals the reference letter, case-insensitively."""
    m = _CHOICE.match(str(prediction))
    if m is None:
        return 0.0
    return 1.0 if any(m.group(1).lower() == str(a).strip().strip("()").lower() for a in _as_list(answers)) else 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_norm(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


@register_grader("anls")
def anls(prediction: str, answers: Answers, threshold: float = 0.5) -> float:
    """DocVQA ANLS of one item (module doc): max over references of the thresholded similarity."""
    p = _anls_norm(prediction)
    best = 0.0
    for a in _as_list(answers):
        g = _anls_norm(a)
        if not p and not g:
            return 1.0
        nl = levenshtein(p, g) / max(len(p), len(g))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def edit_similarity(prediction: str, answers: Answers) -> float:
    """1 - normalised edit distance to the closest reference (ANLS without its 0.5 cut-off): partial
    credit that shows a model starting to read (``"KKN"`` for ``"KKA"`` scores 2/3) before exact match
    moves. A diagnostic reported next to the scores, not a grader."""
    return anls(prediction, answers, threshold=1.0)


def parse_number(text: str) -> float | None:
    """A float from ``text`` (``"1,234"``, ``"-3.5"``, ``"45%"`` -> 0.45), or ``None``."""
    t = str(text).strip().replace(" ", "")
    t = _COMMA_IN_NUMBER.sub("", t)
    scale = 1.0
    if t.endswith("%"):
        t, scale = t[:-1], 0.01
    try:
        value = float(t)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return value * scale


@register_grader("relaxed")
def relaxed_accuracy(prediction: str, answers: Answers, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (module doc)."""
    p_num = parse_number(prediction)
    for a in _as_list(answers):
        g_num = parse_number(a)
        if p_num is not None and g_num is not None:
            if g_num == 0.0:
                ok = p_num == 0.0
            else:
                ok = abs(p_num - g_num) <= tolerance * abs(g_num) + 1e-12
        else:
            ok = str(prediction).strip().lower() == str(a).strip().lower()
        if ok:
            return 1.0
    return 0.0


@register_grader("yesno")
def yes_no(prediction: str, answers: Answers) -> float:
    """1.0 if the prediction's first normalised word equals the reference's (``yes`` / ``no``)."""
    words = normalize_answer(prediction).split()
    first = words[0] if words else ""
    return 1.0 if any(first == normalize_answer(a) for a in _as_list(answers)) else 0.0


# ----------------------------------------------------------------------------------------------
# aggregation


@dataclass(frozen=True)
class ScoredItem:
    """One graded item; ``score`` is ``None`` for an item that could not be scored (counts as 0)."""

    family: str
    difficulty: str
    score: float | None


def aggregate(items: Iterable[ScoredItem | Mapping]) -> dict:
    """Per-family and easy/hard means.

    Accepts :class:`ScoredItem` or mappings with ``family``, ``difficulty``, ``score``. Returns
    ``{"per_family": {family: mean}, "per_family_n": {family: n}, "easy_mean", "hard_mean",
    "overall_mean", "n_items", "n_skipped"}``; a mean over no families is ``None``. Unscored items
    (``score is None``) count as 0 and in ``n_items``. A family must not appear under two difficulties.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    difficulty: dict[str, str] = {}
    n_items = n_skipped = 0
    for it in items:
        if isinstance(it, Mapping):
            fam, dif, score = it["family"], it["difficulty"], it.get("score")
        else:
            fam, dif, score = it.family, it.difficulty, it.score
        if difficulty.setdefault(fam, dif) != dif:
            raise ValueError(f"family {fam!r} appears as both {difficulty[fam]!r} and {dif!r}")
        n_items += 1
        if score is None:
            n_skipped += 1
            score = 0.0
        sums[fam] = sums.get(fam, 0.0) + float(score)
        counts[fam] = counts.get(fam, 0) + 1
    per_family = {f: sums[f] / counts[f] for f in sorted(sums)}

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "per_family": per_family,
        "per_family_n": {f: counts[f] for f in sorted(counts)},
        "easy_mean": mean([v for f, v in per_family.items() if difficulty[f] == "easy"]),
        "hard_mean": mean([v for f, v in per_family.items() if difficulty[f] == "hard"]),
        "overall_mean": mean(list(per_family.values())),
        "n_items": n_items,
        "n_skipped": n_skipped,
    }
