"""Draw a scene description into a PIL image, recording where every small glyph lands.

A *scene* is a JSON-serialisable dict that fully determines the image: ``render_scene(scene)`` is the
only drawing code, generators only sample scenes. So an item stored with its scene can be re-rendered
byte for byte, its answer re-derived from it, and its dense targets recomputed, without the image.

Scene keys (all optional but ``size`` and ``background``), drawn in this order:

``rects``  ``{"box": [x0, y0, x1, y1], "fill": [r, g, b], "outline": [r, g, b] | None}`` (document panels)
``shapes`` ``{"kind": circle|square|triangle|diamond, "color": name, "cx", "cy", "size"}`` where
           ``size`` is the half-extent: the shape lies inside the box ``cx +- size, cy +- size``
``bars``   ``{"box": [x0, y0, x1, y1], "color": name, "label": str, "value": int}`` (chart bars)
``lines``  ``{"xy": [x0, y0, x1, y1], "color": [r, g, b], "width": int}`` (chart axes)
``dots``   ``{"cx", "cy", "r", "color": [r, g, b]}``
``texts``  ``{"text", "x", "y", "size", "color": [r, g, b], "role": str}``; drawn one character at a
           time from the top-left origin ``(x, y)`` with PIL's bundled font at ``size``, advancing by
           the character's advance width plus ``gap`` (default 1) pixels
``scans``  ``{"index", "x", "y", "size", "color": [r, g, b]}``: a ``load_digits`` scan scaled to
           ``size`` x ``size`` pixels (bilinear) and used as the ink alpha of ``color``

Text uses ``ImageFont.load_default(size=...)`` (PIL's embedded font, no font files needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visor.data.synth.config import COLORS, SHAPES
from visor.data.synth.handwriting import scan_ink, scan_label

#: the character recorded for a dot in glyph lists and dense targets
DOT_CHAR = "\u2022"


@dataclass(frozen=True)
class Glyph:
    """One small readable mark: a printed character, a handwritten digit or a dot.

    ``box`` is ``(x0, y0, x1, y1)`` in full-resolution pixels (x1, y1 exclusive) of its ink;
    ``source`` is ``"print"``, ``"hand"`` or ``"dot"``.
    """

    char: str
    box: tuple[int, int, int, int]
    source: str

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def to_dict(self) -> dict[str, Any]:
        return {"char": self.char, "box": list(self.box), "source": self.source}


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont:
    """PIL's bundled font at ``size`` (cached)."""
    return ImageFont.load_default(size=size)


def _rgb(color: Any) -> tuple[int, int, int]:
    if isinstance(color, str):
        return COLORS[color]
    return tuple(int(c) for c in color)  # type: ignore[return-value]


def shape_polygon(kind: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape kind (``None`` for a circle)."""
    if kind == "square":
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "diamond":
        return [(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)]
    if kind == "circle":
        return None
    raise ValueError(f"unknown shape kind {kind!r}")


def shape_area(kind: str, s: float) -> float:
    """Area of a shape of half-extent ``s``."""
    return {"circle": float(np.pi), "square": 4.0, "triangle": 2.0, "diamond": 2.0}[kind] * s * s


def _draw_shape(draw: ImageDraw.ImageDraw, shape: dict, fill: Any) -> None:
    cx, cy, s = shape["cx"], shape["cy"], shape["size"]
    poly = shape_polygon(shape["kind"], cx, cy, s)
    if poly is None:
        draw.ellipse((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon(poly, fill=fill)


@lru_cache(maxsize=4096)
def _glyph_mask(char: str, size: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Anti-aliased coverage mask of one character and its ink box relative to the draw origin.

    Rendering each character once and pasting its mask is ~3x faster than ``ImageDraw.text`` per call.
    """
    f = font(size)
    x0, y0, x1, y1 = (int(v) for v in f.getbbox(char))
    mask = Image.new("L", (max(x1 - x0, 1), max(y1 - y0, 1)), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), char, font=f, fill=255)
    return mask, (x0, y0, x1, y1)


@lru_cache(maxsize=4096)
def _advance(char: str, size: int) -> int:
    return int(round(font(size).getlength(char)))


def text_layout(text: str, x: int, y: int, size: int, gap: int = 1) -> list[tuple[str, int, int]]:
    """Per-character draw origins ``(char, x, y)`` of a text entry (spaces included)."""
    out = []
    cx = x
    for ch in text:
        out.append((ch, cx, y))
        cx += _advance(ch, size) + gap
    return out


def text_width(text: str, size: int, gap: int = 1) -> int:
    """Width in pixels of ``text`` drawn by :func:`render_scene` (from origin to end of last advance)."""
    return sum(_advance(ch, size) for ch in text) + gap * max(len(text) - 1, 0)


def text_height(size: int) -> int:
    """Height of the ink box of a capital or digit at ``size``, measured from the draw origin."""
    return _text_height(size)


@lru_cache(maxsize=64)
def _text_height(size: int) -> int:
    return int(font(size).getbbox("0H")[3])


def render_scene(scene: dict) -> tuple[Image.Image, list[Glyph]]:
    """Draw ``scene`` (module doc) and return the RGB image and its glyphs in drawing order."""
    w, h = scene["size"]
    image = Image.new("RGB", (w, h), _rgb(scene["background"]))
    draw = ImageDraw.Draw(image)
    glyphs: list[Glyph] = []

    for rect in scene.get("rects", ()):
        outline = rect.get("outline")
        draw.rectangle(tuple(rect["box"]), fill=_rgb(rect["fill"]), outline=_rgb(outline) if outline else None)
    for shape in scene.get("shapes", ()):
        _draw_shape(draw, shape, _rgb(shape["color"]))
    for bar in scene.get("bars", ()):
        draw.rectangle(tuple(bar["box"]), fill=_rgb(bar["color"]))
    for line in scene.get("lines", ()):
        draw.line(tuple(line["xy"]), fill=_rgb(line["color"]), width=int(line.get("width", 1)))
    for dot in scene.get("dots", ()):
        cx, cy, r = dot["cx"], dot["cy"], dot["r"]
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_rgb(dot["color"]))
        glyphs.append(Glyph(DOT_CHAR, (int(np.floor(cx - r)), int(np.floor(cy - r)),
                                       int(np.ceil(cx + r)), int(np.ceil(cy + r))), "dot"))
    for text in scene.get("texts", ()):
        size = int(text["size"])
        fill = _rgb(text["color"])
        for ch, x, y in text_layout(text["text"], int(text["x"]), int(text["y"]), size, int(text.get("gap", 1))):
            if ch.isspace():
                continue
            mask, (bx0, by0, bx1, by1) = _glyph_mask(ch, size)
            image.paste(fill, (x + bx0, y + by0), mask)
            glyphs.append(Glyph(ch, (x + bx0, y + by0, x + bx1, y + by1), "print"))
    for scan in scene.get("scans", ()):
        _paste_scan(image, scan)
        x, y, s = int(scan["x"]), int(scan["y"]), int(scan["size"])
        glyphs.append(Glyph(str(scan_label(int(scan["index"]))), (x, y, x + s, y + s), "hand"))
    return image, glyphs


def _paste_scan(image: Image.Image, scan: dict) -> None:
    ink = scan_ink(int(scan["index"]))
    size = int(scan["size"])
    alpha = Image.fromarray(np.round(ink * 255.0).astype(np.uint8), mode="L")
    if size != 8:
        alpha = alpha.resize((size, size), Image.Resampling.BILINEAR)
    solid = Image.new("RGB", (size, size), _rgb(scan["color"]))
    image.paste(solid, (int(scan["x"]), int(scan["y"])), alpha)


def render_kind_map(scene: dict) -> np.ndarray:
    """Per-pixel shape kind of the scene's shapes: 0 = none (background, bars, text), else ``1 + index``
    into :data:`visor.data.synth.config.SHAPES`; later shapes cover earlier ones, as drawn. ``(height, width)``."""
    w, h = scene["size"]
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for shape in scene.get("shapes", ()):
        _draw_shape(draw, shape, 1 + SHAPES.index(shape["kind"]))
    return np.asarray(mask, dtype=np.uint8)


def render_color_map(scene: dict) -> np.ndarray:
    """Per-pixel colour class of the scene's coloured regions (shapes and bars): 0 = none, else
    ``1 + index`` into :data:`visor.data.synth.config.COLORS`. Shape ``(height, width)``, uint8."""
    w, h = scene["size"]
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    names = list(COLORS)
    for shape in scene.get("shapes", ()):
        _draw_shape(draw, shape, 1 + names.index(shape["color"]))
    for bar in scene.get("bars", ()):
        draw.rectangle(tuple(bar["box"]), fill=1 + names.index(bar["color"]))
    return np.asarray(mask, dtype=np.uint8)
