"""Reducers by name, for ``--reduce NAME[:AMOUNT]``.

AMOUNT is a kept fraction (``0.25``), a reduction factor with ``x`` (``4x`` = keep a quarter) or a
percentage (``25%``); left out, the reducer's published default applies. What the fraction counts, per
reducer:

==========  =========  ==================================================  ===============================
name        stage      AMOUNT                                              default
==========  =========  ==================================================  ===============================
pooling     pre-LLM    kept fraction of each grid's tokens (VISOR-TR)      2x (0.5)
visionzip   pre-LLM    kept fraction of grid tokens, per base view / tile  128/576, dominant:contextual 5.4:1
vispruner   pre-LLM    kept fraction of grid tokens, per base view / tile  128/576, important ratio 0.5
hired       pre-LLM    kept fraction of the image's grid tokens            0.2, alpha 0.5
fastv       in-LLM     kept fraction 1 - R after layer K                   K=2, R=50% (0.5)
pdrop       in-LLM     lambda, kept fraction at each stage                 layers L/4, L/2, 3L/4; 0.5
==========  =========  ==================================================  ===============================

A pre-LLM selector (VisionZip, VisPruner, HiRED) numbers the shortened prompt afresh, as the methods' own code does;
``NAME:AMOUNT@original`` keeps each kept token at the position it had in the full prompt instead
(``visor.compression.apply``; ``benchmarks/selection_positions.py``). Pooling resamples, so it has no such positions.

Pre-LLM reducers always keep the ``image_newline`` tokens on top of the budget. A budget is never above
the tokens available nor below one token per unit (``kept_tokens``); AMOUNT outside (0, 1] is an error.
"""

from __future__ import annotations

from visor.compression.base import PreLLMReducer, Reducer
from visor.compression.in_llm import FastV, PyramidDrop
from visor.compression.pre_llm import HiRED, Pooling, VisionZip, VisPruner
from visor.compression.spec import parse_reduce_spec

REDUCERS: dict[str, type[Reducer]] = {
    cls.name: cls for cls in (Pooling, VisionZip, VisPruner, HiRED, FastV, PyramidDrop)
}
ALIASES = {"pyramiddrop": "pdrop", "pool": "pooling", "tr": "pooling"}


def reducer_names() -> list[str]:
    return list(REDUCERS)


def get_reducer_class(name: str) -> type[Reducer]:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in REDUCERS:
        raise ValueError(f"unknown reducer {name!r}; known: {', '.join(REDUCERS)}")
    return REDUCERS[key]


def build_reducer(spec, **options) -> Reducer | None:
    """A reducer from ``"NAME[:AMOUNT]"`` (or a ``Reducer``, returned as is; None stays None).

    ``options`` go to the reducer's constructor (e.g. ``layer=3`` for FastV, ``alpha=0.3`` for HiRED).
    """
    if spec is None or isinstance(spec, Reducer):
        if options:
            raise ValueError("reducer options need a reducer name, not an instance")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a reducer is a 'NAME[:AMOUNT]' string or a Reducer, got {type(spec).__name__}")
    spec, _, positions = spec.partition("@")
    name = spec.partition(":")[0]
    cls = get_reducer_class(name)
    _, keep = parse_reduce_spec(spec, default_keep=cls.default_keep)
    reducer = cls(keep, **options)
    if positions:
        if not isinstance(reducer, PreLLMReducer):
            raise ValueError(f"'@{positions}' applies to pre-LLM selectors only; {cls.name} prunes inside the LLM and "
                             "numbers positions as its authors' code does")
        reducer.with_positions(positions.strip().lower())
    return reducer
