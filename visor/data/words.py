"""Worded scenes: the keyed families of the procedural benchmark stated in text, for language pre-training.

The tiny baselines answer every family that needs a word of the question matched against the context (a shape
by its kind, a document row by its key, a bar by its label) at the pick-at-random floor, and the same lookup
stated in words stays there too (``docs/training-log.md``, "The lookup is missing from the language model, not
from the image"): a language model trained from scratch on one answer token per image never forms
content-addressed retrieval, which the real LLaVA-OneVision inherits from its language model's text
pre-training. This module is the text side of that pre-training, at the benchmark's scale: each item states a
scene in words and asks several questions about it, each answered by finding the named key in the context
and copying what stands beside it. The questions are the benchmark's own templates
(``visor.data.synth.families.QUESTION_TEMPLATES``), so the words a later image question uses are the ones the
retrieval was learned on.

Families (``WORDED_FAMILIES``):

* ``kind_color``  "red circle, blue square." -> "What colour is the square?" -> "blue" (every listed kind asked);
* ``presence``    "red circle, blue square." -> "Is there a diamond in the image?" -> "no" (every kind asked);
* ``doc``         "gate: 4, bay: 7." -> "In the document, what is the value of gate?" -> "4";
* ``chart``       "bar A: 3, bar C: 8." -> "What is the value of bar C?" -> "8";
* ``recall``      a longer list of arbitrary benchmark words and numbers, "gate 47, blue 3, ...", ->
  "What is the value of blue?" -> "3": more pairs than any scene holds, keys drawn from the whole
  vocabulary, so position or key identity never stands in for the lookup;
* ``copy``        a list of 6-20 distinct benchmark words, "gate blue left high." -> "Read the list." -> the list
  again: every answer token is found by matching the token before it in the context, the copying
  ("induction") circuit that content-addressed lookup is built from. A fresh tiny language model trained on
  repeated random sequences (``benchmarks/induction_transfer.py``) forms it within ~500-750 steps, and on this
  family alone within ~200 steps of batch 32, but not as a third of a mix in 1,000 (``docs/training-log.md``).

Sizes follow the procedural benchmark's config (``SynthConfig.doc_rows``, ``bars``, value ranges) so a worded
document is the document an image shows. Items are deterministic in (split, seed, index) with the benchmark's
seed scheme (``visor.data.synth.seeds``): splits never share an item.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from visor.data.synth.config import BAR_LABELS, DEFAULT_CONFIG, DOC_KEYS, SHAPES, SynthConfig
from visor.data.synth.families import COLOR_NAMES, QUESTION_TEMPLATES
from visor.data.synth.generate import weighted_cycle
from visor.data.synth.seeds import check_split, item_seed

WORDED_FAMILIES: tuple[str, ...] = ("kind_color", "presence", "doc", "chart", "recall", "copy")
#: the prefix of a worded family's name in evaluation summaries, so they never mix with the image families
FAMILY_PREFIX = "words_"
RECALL_QUESTION = "What is the value of {key}?"
COPY_QUESTION = "Read the list."
#: number of key/value pairs of a ``recall`` scene
RECALL_PAIRS: tuple[int, int] = (4, 12)
#: number of words of a ``copy`` list
COPY_WORDS: tuple[int, int] = (6, 20)


@functools.lru_cache(maxsize=1)
def recall_keys() -> tuple[str, ...]:
    """Lowercase benchmark words that are not words of the recall question itself (sorted, fixed)."""
    from visor.data.tokenizer import benchmark_words

    question = set(RECALL_QUESTION.lower().replace("?", "").split())
    return tuple(w for w in benchmark_words() if w.islower() and w not in question
                 and w not in ("system", "user", "assistant"))


@dataclass(frozen=True)
class WordedItem:
    """A scene in words and its questions; the first question is the item's own (the one evaluation asks)."""

    id: str
    family: str  # one of WORDED_FAMILIES
    context: str
    questions: tuple[tuple[str, str], ...]  # (question, answer)

    @property
    def eval_family(self) -> str:
        return FAMILY_PREFIX + self.family

    def conversations(self, max_questions: int | None = None) -> list[dict[str, str]]:
        """LLaVA-format turns: the context and the first question in the first human turn, each further question
        in a turn of its own (up to ``max_questions`` in all; ``None``: every question)."""
        questions = self.questions[:max_questions] if max_questions else self.questions
        turns: list[dict[str, str]] = []
        for k, (question, answer) in enumerate(questions):
            turns.append({"from": "human", "value": f"{self.context} {question}" if k == 0 else question})
            turns.append({"from": "gpt", "value": answer})
        return turns


def _int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _shapes(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    kinds = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:n]]
    return kinds, colors


def _template(family: str, rng: np.random.Generator) -> str:
    templates = QUESTION_TEMPLATES[family]
    return templates[_int(rng, 0, len(templates) - 1)]


def _scene(family: str, rng: np.random.Generator, config: SynthConfig) -> tuple[str, list[tuple[str, str]]]:
    """``(context, [(question, answer), ...])`` with every question the scene answers, in a random order."""
    if family == "kind_color":
        kinds, colors = _shapes(rng, _int(rng, 2, len(SHAPES)))
        context = ", ".join(f"{c} {k}" for c, k in zip(colors, kinds)) + "."
        qa = [(_template(family, rng).format(kind=k), c) for k, c in zip(kinds, colors)]
    elif family == "presence":
        kinds, colors = _shapes(rng, _int(rng, 1, 3))
        context = ", ".join(f"{c} {k}" for c, k in zip(colors, kinds)) + "."
        qa = [(_template(family, rng).format(kind=k), "yes" if k in kinds else "no") for k in SHAPES]
    elif family == "doc":
        n = _int(rng, *config.doc_rows)
        keys = [DOC_KEYS[i] for i in rng.permutation(len(DOC_KEYS))[:n]]
        lo, hi = 10 ** (config.doc_value_digits - 1), 10 ** config.doc_value_digits - 1
        values = [str(_int(rng, lo, hi)) for _ in keys]
        context = ", ".join(f"{k}: {v}" for k, v in zip(keys, values)) + "."
        qa = [(_template(family, rng).format(key=k), v) for k, v in zip(keys, values)]
    elif family == "chart":
        labels = [BAR_LABELS[i] for i in rng.permutation(len(BAR_LABELS))[:_int(rng, *config.bars)]]
        values = [str(_int(rng, *config.bar_value_range)) for _ in labels]
        context = ", ".join(f"bar {label}: {v}" for label, v in zip(labels, values)) + "."
        qa = [(_template(family, rng).format(label=label), v) for label, v in zip(labels, values)]
    elif family == "copy":  # one question: the list back, word for word
        pool = recall_keys()  # distinct words, so the word before each one names it (no numbers: ten digits repeat)
        context = " ".join(pool[int(i)] for i in rng.permutation(len(pool))[:_int(rng, *COPY_WORDS)]) + "."
        qa = [(COPY_QUESTION, context)]
    elif family == "recall":
        pool = recall_keys()
        keys = [pool[i] for i in rng.permutation(len(pool))[:_int(rng, *RECALL_PAIRS)]]
        values = [str(_int(rng, 1, 99)) for _ in keys]
        context = ", ".join(f"{k} {v}" for k, v in zip(keys, values)) + "."
        qa = [(RECALL_QUESTION.format(key=k), v) for k, v in zip(keys, values)]
    else:
        raise ValueError(f"unknown worded family {family!r}; known: {', '.join(WORDED_FAMILIES)}")
    order = rng.permutation(len(qa))
    return context, [qa[int(i)] for i in order]


def worded_cycle(families: Sequence[str] | None = None, weights: Mapping[str, int] | None = None) -> tuple[str, ...]:
    """The order in which item indices visit the worded ``families`` (default all); raises ``ValueError`` on an
    unknown family or a bad weight (``visor.data.synth.generate.weighted_cycle``)."""
    families = tuple(families) if families else WORDED_FAMILIES
    unknown = sorted(set(families) - set(WORDED_FAMILIES))
    if unknown:
        raise ValueError(f"unknown worded families {unknown}; known: {', '.join(WORDED_FAMILIES)}")
    return weighted_cycle(families, weights)


def worded_item(split: str, index: int, seed: int = 0, families: Sequence[str] | None = None,
                weights: Mapping[str, int] | None = None, config: SynthConfig = DEFAULT_CONFIG) -> WordedItem:
    """Item ``index`` of ``split``: its family from the (weighted) round robin over ``families`` (default all),
    its scene from ``numpy.random.default_rng(item_seed(split, seed, index))`` alone."""
    check_split(split)
    cycle = worded_cycle(families, weights)
    family = cycle[index % len(cycle)]
    context, qa = _scene(family, np.random.default_rng(item_seed(split, seed, index)), config)
    return WordedItem(id=f"words-{split}-{seed}-{index:07d}", family=family, context=context, questions=tuple(qa))


def worded_eval_items(split: str, n: int, seed: int = 0, families: Sequence[str] | None = None,
                      config: SynthConfig = DEFAULT_CONFIG) -> list:
    """``n`` items as ``visor.eval.harness.EvalItem`` (no image; the first question; exact match), family
    ``words_<family>``, difficulty ``"words"`` (so the image families' easy and hard means never include them)."""
    from visor.eval.harness import EvalItem

    items = []
    for index in range(n):
        item = worded_item(split, index, seed=seed, families=families, config=config)
        items.append(EvalItem(id=item.id, family=item.eval_family, difficulty="words", grader="exact", images=[],
                              turns=item.conversations(1)[:1], answers=[item.questions[0][1]]))
    return items
