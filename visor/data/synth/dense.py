"""Dense per-patch targets for pre-training a vision tower to read (see ``PROBES.md``).

A probe found that one label per patch makes adjacent glyphs collide (a 6 px glyph pitch puts two
glyph centres in one 8 px patch), while one label per *half* patch does not. So
:func:`dense_targets` returns, per patch of a ``patch_size`` grid:

* ``left`` / ``right``: the glyph class whose centre lies in the left / right half of the patch
  (0 = none; if two centres share a half, the one nearer the half's centre wins);
* ``color``: the most frequent colour class of the patch's pixels (0 = no coloured region, else
  ``1 + index`` into ``COLORS``), from shapes and chart bars;
* ``dots``: how many dot centres lie in the patch (dots are packed closer than a half patch, so a
  count is the lossless label for them; they also appear as the dot class in ``left``/``right``);
* ``shape``: the most frequent shape kind of the patch's pixels (0 = none, else ``1 + index`` into
  ``SHAPES``): a patch inside a large shape looks the same for every kind, so the label asks the tower to
  use its context (the outline), which colour and glyph labels never do.

Glyph classes are :data:`GLYPH_CLASSES` (index 0 = none): digits, capitals, lower case, ASCII
punctuation and the dot mark; handwritten digits share the printed digits' classes (``Glyph.source``
tells them apart). ``image_size`` computes the targets for the image resized to that size (glyph
centres scale with it), e.g. a base view, or a tile grid of a different total size.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image

from visor.data.synth.config import COLORS, SHAPES
from visor.data.synth.render import DOT_CHAR, Glyph, render_color_map, render_kind_map, render_scene

GLYPH_CLASSES: tuple[str, ...] = ("",) + tuple(
    string.digits + string.ascii_uppercase + string.ascii_lowercase + string.punctuation
) + (DOT_CHAR,)
GLYPH_INDEX: dict[str, int] = {c: i for i, c in enumerate(GLYPH_CLASSES)}
COLOR_CLASSES: tuple[str, ...] = ("",) + tuple(COLORS)
SHAPE_CLASSES: tuple[str, ...] = ("",) + tuple(SHAPES)


@dataclass
class DenseTargets:
    """Per-patch label grids of shape ``(rows, cols)`` (int64) plus the glyphs they came from."""

    left: np.ndarray
    right: np.ndarray
    color: np.ndarray
    dots: np.ndarray
    shape: np.ndarray
    patch_size: int
    glyphs: list[Glyph]

    @property
    def grid(self) -> tuple[int, int]:
        return self.left.shape  # type: ignore[return-value]


def glyph_class(char: str) -> int:
    """Class index of a glyph character (``KeyError`` with the known set for anything else)."""
    try:
        return GLYPH_INDEX[char]
    except KeyError:
        raise KeyError(f"no glyph class for {char!r}; classes are {''.join(GLYPH_CLASSES[1:])}") from None


def dense_targets(item: Union["SynthItem", dict], patch_size: int,  # noqa: F821
                  image_size: tuple[int, int] | None = None) -> DenseTargets:
    """Half-patch glyph labels and per-patch colour labels of an item (or of a bare scene dict).

    ``image_size`` = ``(width, height)`` of the image the model sees (default: the scene's size); it
    must be a multiple of ``patch_size`` on both sides.
    """
    if isinstance(item, dict):
        scene = item
        _, glyphs = render_scene(scene)
    else:
        scene, glyphs = item.scene, item.glyphs
    sw, sh = scene["size"]
    w, h = image_size if image_size is not None else (sw, sh)
    p = int(patch_size)
    if w % p or h % p:
        raise ValueError(f"image size {(w, h)} is not a multiple of patch size {p}")
    rows, cols = h // p, w // p
    fx, fy = w / sw, h / sh

    left = np.zeros((rows, cols), dtype=np.int64)
    right = np.zeros((rows, cols), dtype=np.int64)
    dots = np.zeros((rows, cols), dtype=np.int64)
    best = np.full((rows, cols, 2), np.inf)
    for g in glyphs:
        cx, cy = g.center
        x, y = cx * fx, cy * fy
        c, r = int(x // p), int(y // p)
        if not (0 <= r < rows and 0 <= c < cols):
            continue
        if g.source == "dot":
            dots[r, c] += 1
        half = 0 if (x - c * p) < p / 2 else 1
        hx = c * p + (0.25 if half == 0 else 0.75) * p
        d = (x - hx) ** 2 + (y - (r + 0.5) * p) ** 2
        if d < best[r, c, half]:
            best[r, c, half] = d
            (left if half == 0 else right)[r, c] = glyph_class(g.char)

    def majority(class_map: np.ndarray, n_classes: int) -> np.ndarray:  # per patch, its most frequent class
        if (w, h) != (sw, sh):
            class_map = np.asarray(Image.fromarray(class_map).resize((w, h), Image.Resampling.NEAREST))
        blocks = class_map.reshape(rows, p, cols, p).transpose(0, 2, 1, 3).reshape(rows, cols, p * p)
        counts = np.stack([(blocks == k).sum(-1) for k in range(n_classes)], axis=-1)
        return counts.argmax(-1).astype(np.int64)

    color = majority(render_color_map(scene), len(COLOR_CLASSES))
    shape = majority(render_kind_map(scene), len(SHAPE_CLASSES))
    return DenseTargets(left=left, right=right, color=color, dots=dots, shape=shape, patch_size=p, glyphs=list(glyphs))
