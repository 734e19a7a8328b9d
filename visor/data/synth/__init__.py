"""The procedural easy/hard benchmark: deterministic generators, LLaVA-format writer, streams.

Easy families are answerable from a glance at a low-resolution base view; hard families need the
full-resolution tiles (small print, charts, documents, dots, real handwriting). See
:mod:`visor.data.synth.config` for the sizes and why, :mod:`visor.data.synth.seeds` for the seed
scheme, :mod:`visor.data.synth.families` for the families, :mod:`visor.data.synth.generate` for the
on-disk format and streams, and :mod:`visor.data.synth.dense` for dense pre-training targets.
"""

from visor.data.synth.config import (
    COLORS,
    DEFAULT_CONFIG,
    EASY_FAMILIES,
    FAMILIES,
    HARD_FAMILIES,
    SHAPES,
    TRAINING_FAMILIES,
    SynthConfig,
    difficulty_of,
)
from visor.data.synth.dense import GLYPH_CLASSES, SHAPE_CLASSES, DenseTargets, dense_targets
from visor.data.synth.families import (
    ANSWER_WORDS,
    FAMILY_GRADERS,
    QUESTION_TEMPLATES,
    derive_answer,
    question_text,
)
from visor.data.synth.generate import (
    SynthDataset,
    SynthItem,
    SynthStream,
    generate_item,
    generate_items,
    item_id,
    write_split,
)
from visor.data.synth.render import Glyph, render_scene
from visor.data.synth.seeds import SPLITS, item_seed

__all__ = [
    "ANSWER_WORDS",
    "COLORS",
    "DEFAULT_CONFIG",
    "DenseTargets",
    "EASY_FAMILIES",
    "FAMILIES",
    "FAMILY_GRADERS",
    "GLYPH_CLASSES",
    "SHAPE_CLASSES",
    "Glyph",
    "HARD_FAMILIES",
    "TRAINING_FAMILIES",
    "QUESTION_TEMPLATES",
    "SHAPES",
    "SPLITS",
    "SynthConfig",
    "SynthDataset",
    "SynthItem",
    "SynthStream",
    "dense_targets",
    "derive_answer",
    "difficulty_of",
    "generate_item",
    "generate_items",
    "item_id",
    "item_seed",
    "question_text",
    "render_scene",
    "write_split",
]
