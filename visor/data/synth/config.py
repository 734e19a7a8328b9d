"""Sizes, palettes and vocabularies of the procedural easy/hard benchmark.

Design choices (defaults; every size is a field of :class:`SynthConfig`):

* The image is ``image_size`` = 192 px per side, three times the 64 px base view (``base_size``), so
  LLaVA-OV's anyres tiling (grid pinpoints that are multiples of the base size; here a 3x3 grid of
  64 px tiles, 9 x 64 + 64 = 640 visual tokens at patch 8) has tiles that matter. The target model is
  a tiny LLaVA-OV with a SigLIP of image size 64 (or 96 with ``image_size=288``) and patch 8.
* Easy content is large: shapes have a half-extent of at least ``large_min`` = 22 px (a 44 px object,
  15 px in a 64 px base view), so a glance at the base view answers easy questions.
* Hard content is small: printed glyphs come from PIL's bundled font at ``text_size`` = 11 (digits
  6 px wide, ~8 px tall, the size a patch-8 ViT learned to read densely in ``PROBES.md``);
  handwritten digits are the 8x8 ``load_digits`` scans at their native ``hand_size`` = 8 px; dots
  have radius 1, 1.5 or 2 px (varied per dot, so total ink does not give the count away), centres
  at least ``dot_spacing`` = 6 px apart, packed in a square whose side grows with sqrt(count).
* What matters is the downscale factor, image side / base side = 3 (192 -> 64, or 288 -> 96).
  ``benchmarks/synth_legibility.py`` measured, at 3x: easy families stay at 100% for pixel oracles;
  a glyph reader trained on sharp glyphs falls from 100% to 0-14% on printed families; an ideal
  reader that knows each glyph's exact box *and* was fitted to the blur still reads 86-93% of
  printed items (the font is fixed, so a 2x3 px smudge keeps a signature), while dots fall to ~30%
  and handwriting to ~38%. At 2x (192 -> 96) everything printed stays readable: with a 96 px base
  view use ``image_size=288``. ``text_size`` is the knob: at 8 the ideal reader drops to ~30% at 3x
  (and stays at 100% at full resolution), at the price of 5 px glyphs for the model to learn.
* Answer spaces of hard families are small on purpose (PROBES.md: from scratch, a tiny model stayed
  at chance reading 3 digits): codes are 3-5 letters of a 10-letter alphabet and dot counts 5..15 (as
  the data issue specifies them); document values, chart values and handwritten numbers are one digit,
  documents have 2-4 rows and charts 2-4 bars. Version 1 of the benchmark had two-digit values and
  numbers, 3-5 rows and 3-5 bars: after ~20k training items each, the tiny baseline still answered
  those three families at a uniform guess (docs/training-log.md), so the fix went into the design, as
  the training issue asks, rather than into the targets. A single digit still needs the tiles (its
  glyph is as small as before); only the number of outcomes the model must tell apart shrank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: named colours of easy shapes, chart bars and the dense colour map (index + 1 = dense class id)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}

#: kinds of large shapes
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

#: keys of the small-print key/value "document" (lowercase words, so they never collide with codes)
DOC_KEYS: tuple[str, ...] = (
    "room", "age", "size", "gate", "seat", "unit", "box", "lot", "pin", "zone", "row", "bay",
)

#: category labels of chart bars
BAR_LABELS: str = "ABCDEFGH"

#: alphabet of printed codes: ten capitals whose shapes differ at small size
CODE_CHARSET: str = "ACEHKMNPRX"

EASY_FAMILIES: tuple[str, ...] = ("color", "shape", "count", "presence", "side")
HARD_FAMILIES: tuple[str, ...] = ("code", "doc", "chart", "dots", "handwriting")
FAMILIES: tuple[str, ...] = EASY_FAMILIES + HARD_FAMILIES

#: families for training mixes only: never in the benchmark's default round robin (``FAMILIES``), so test splits,
#: reports and the easy/hard means stay as they are; a recipe or ``--families`` names them explicitly.
#: ``kind_color`` ("What colour is the KIND?") asks for a shape by the kind the question names, as ``presence``
#: does, with a six-way answer the model already reads for the ``color`` family.
TRAINING_FAMILIES: tuple[str, ...] = ("kind_color",)
#: every family the generator knows
ALL_FAMILIES: tuple[str, ...] = FAMILIES + TRAINING_FAMILIES


def difficulty_of(family: str) -> str:
    """``"easy"`` or ``"hard"`` for a family name (``ValueError`` for an unknown one). Training-only families
    are easy: their content is large."""
    if family in EASY_FAMILIES or family in TRAINING_FAMILIES:
        return "easy"
    if family in HARD_FAMILIES:
        return "hard"
    raise ValueError(f"unknown synth family {family!r}; known: {', '.join(ALL_FAMILIES)}")


@dataclass(frozen=True)
class SynthConfig:
    """Every size of the procedural benchmark. Frozen so a config can key caches and be hashed.

    Pixel sizes refer to the full-resolution image. ``base_size`` is not used to draw; it records the
    base view the defaults were chosen for (benchmarks and dense targets read it).
    """

    image_size: int = 192
    base_size: int = 64
    background: tuple[int, int, int] = (245, 245, 240)
    # easy families: half-extent of large shapes and of small distractors (``count`` only)
    large_min: int = 22
    large_max: int = 44
    small_min: int = 4
    small_max: int = 6
    # printed text (codes, documents, chart labels)
    text_size: int = 11
    glyph_gap: int = 1
    code_charset: str = CODE_CHARSET
    code_len: tuple[int, int] = (3, 5)
    doc_rows: tuple[int, int] = (2, 4)
    doc_value_digits: int = 1
    bars: tuple[int, int] = (2, 4)
    bar_value_range: tuple[int, int] = (1, 9)
    # dots
    dot_count: tuple[int, int] = (5, 15)
    dot_radius: tuple[float, float] = (1.0, 2.0)
    dot_spacing: int = 6
    dot_region_scale: float = 1.6
    # handwriting: side of one scaled 8x8 scan, number of digits, gap between digits
    hand_size: int = 8
    hand_digits: tuple[int, int] = (1, 1)
    hand_gap: int = 1

    def __post_init__(self) -> None:
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        for name in ("code_len", "doc_rows", "bars", "bar_value_range", "dot_count", "hand_digits", "dot_radius"):
            lo, hi = getattr(self, name)
            if lo > hi or lo < 0:
                raise ValueError(f"{name} must be a (low, high) range with 0 <= low <= high, got {(lo, hi)}")
        if not 1 <= self.code_len[0]:
            raise ValueError("code_len must be at least 1")
        if self.hand_digits[0] < 1:
            raise ValueError("hand_digits must be at least 1")
        if not self.small_max < self.large_min <= self.large_max:
            raise ValueError("need small_max < large_min <= large_max")
        if len(set(self.code_charset)) != len(self.code_charset) or not self.code_charset:
            raise ValueError("code_charset must be non-empty without repeats")

    def with_image_size(self, image_size: int | None) -> "SynthConfig":
        """This config on a canvas of ``image_size`` px: large shapes scale with the canvas, so their size
        in the base view stays the same; everything small (glyphs, handwriting, dots, distractors) keeps its
        pixel size, so what the tiles must resolve stays what it was. ``image_size=128`` gives half-extents
        15-29 px for large shapes (a 2x downscale to a 64 px base view, against 3x at the default 192).
        ``None`` (no canvas named) returns this config unchanged."""
        if image_size is None or image_size == self.image_size:
            return self
        scale = image_size / self.image_size
        large_min = max(self.small_max + 1, round(self.large_min * scale))
        return dataclasses.replace(self, image_size=image_size, large_min=large_min,
                                   large_max=max(large_min, round(self.large_max * scale)))

    def to_dict(self) -> dict:
        """JSON-serialisable form (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SynthConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                raise TypeError(f"unknown SynthConfig field {key!r}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


DEFAULT_CONFIG = SynthConfig()

__all__ = [
    "BAR_LABELS",
    "CODE_CHARSET",
    "COLORS",
    "DEFAULT_CONFIG",
    "DOC_KEYS",
    "EASY_FAMILIES",
    "FAMILIES",
    "HARD_FAMILIES",
    "SHAPES",
    "SynthConfig",
    "difficulty_of",
]
