"""Task families of the procedural benchmark: scene samplers, question templates, answer derivation.

Each family has three pieces:

* a sampler ``(rng, config, split) -> (scene, answer)`` that draws a scene description (see
  :mod:`visor.data.synth.render`) plus a ``query`` (the family's question parameters and template
  index) and returns the answer it intended;
* :func:`question_text` which words the question from ``scene["query"]``;
* :func:`derive_answer` which re-derives the answer from the scene's *drawn content only* (shape
  geometry, printed strings and their positions, dot lists, the dataset labels of handwriting scans),
  never from the sampler's variables. Tests check the two agree on every generated item.

Easy families (answerable from a glance at the base view): ``color`` (colour of the largest shape),
``shape`` (kind of the largest shape), ``count`` (large shapes, 1-4, among small distractors),
``presence`` (is a given kind present, yes/no), ``side`` (left/right of the one large shape).
Hard families (need the full-resolution tiles): ``code`` (read a 3-5 character printed code),
``doc`` (look up a key in a small-print key/value panel), ``chart`` (read the value printed above a
bar given its small category label), ``dots`` (count 5-15 small dots packed in a small region),
``handwriting`` (read a number written with real ``load_digits`` scans of the split's own pool).
Training only (``TRAINING_FAMILIES``, outside the default round robin): ``kind_color`` (colour of the shape of
a named kind).

Large shapes in ``color``/``shape`` differ clearly: the largest has >= 1.3x the area of the next and
no smaller half-extent, so the answer is unambiguous at a glance.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from visor.data.synth.config import (
    BAR_LABELS,
    COLORS,
    DOC_KEYS,
    SHAPES,
    SynthConfig,
)
from visor.data.synth.handwriting import scan_label, scans_by_digit
from visor.data.synth.render import shape_area, text_height, text_width

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

#: grader name per family (graders live in ``visor.eval.graders``)
FAMILY_GRADERS: dict[str, str] = {
    "color": "exact",
    "shape": "exact",
    "count": "exact",
    "presence": "yesno",
    "side": "exact",
    "code": "exact",
    "doc": "anls",
    "chart": "relaxed",
    "dots": "exact",
    "handwriting": "exact",
    "kind_color": "exact",
}

#: question templates per family; ``{kind}``, ``{key}``, ``{label}`` are filled from the query
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What colour is the largest shape?", "What is the colour of the biggest shape?"),
    "shape": ("What kind of shape is the largest one?", "Which shape is the biggest?"),
    "count": ("How many large shapes are there?", "How many big shapes are in the image?"),
    "presence": ("Is there a {kind} in the image?", "Does the image contain a {kind}?"),
    "side": ("On which side is the large shape?", "Is the large shape on the left or the right?"),
    "code": ("What is the code printed in the image?", "Read the small code."),
    "doc": ("In the document, what is the value of {key}?", "What does the document list for {key}?"),
    "chart": ("What is the value of bar {label}?", "How high is bar {label} in the chart?"),
    "dots": ("How many small dots are there?", "Count the small dots."),
    "handwriting": ("What number is handwritten in the image?", "Read the handwritten number."),
    "kind_color": ("What colour is the {kind}?", "What is the colour of the {kind}?"),
}

#: every answer word of the closed-vocabulary families (codes and numbers are open, char-level)
ANSWER_WORDS: tuple[str, ...] = COLOR_NAMES + SHAPES + ("yes", "no", "left", "right")

PAPER = (255, 255, 255)
PANEL_OUTLINE = (150, 150, 150)
AXIS = (90, 90, 90)


class _Retry(Exception):
    """A placement attempt failed; the sampler draws again from the same stream."""


# ----------------------------------------------------------------------------------------------
# helpers


def _ints(rng: np.random.Generator, lo: int, hi: int, n: int | None = None):
    """Uniform integers in the closed range [lo, hi]."""
    if n is None:
        return int(rng.integers(lo, hi + 1))
    return [int(v) for v in rng.integers(lo, hi + 1, size=n)]


def _dark(rng: np.random.Generator) -> list[int]:
    return [int(v) for v in rng.integers(0, 60, size=3)]


def _place_boxes(rng: np.random.Generator, halves: list[int], size: int, margin: int = 3, gap: int = 4,
                 tries: int = 60) -> list[tuple[int, int]]:
    """Centres for squares of half-extent ``halves`` inside the image, pairwise ``gap`` apart."""
    centres: list[tuple[int, int]] = []
    for s in halves:
        for _ in range(tries):
            cx = _ints(rng, margin + s, size - 1 - margin - s)
            cy = _ints(rng, margin + s, size - 1 - margin - s)
            if all(abs(cx - ox) >= s + os + gap or abs(cy - oy) >= s + os + gap
                   for (ox, oy), os in zip(centres, halves)):
                centres.append((cx, cy))
                break
        else:
            raise _Retry
    return centres


def _base_scene(family: str, cfg: SynthConfig) -> dict:
    return {"family": family, "size": [cfg.image_size, cfg.image_size], "background": list(cfg.background)}


def _shapes(kinds, colors, sizes, centres) -> list[dict]:
    return [{"kind": k, "color": c, "cx": x, "cy": y, "size": s}
            for k, c, s, (x, y) in zip(kinds, colors, sizes, centres)]


def _retrying(sampler: Callable) -> Callable:
    def wrapped(rng: np.random.Generator, cfg: SynthConfig, split: str):
        for _ in range(200):
            try:
                return sampler(rng, cfg, split)
            except _Retry:
                continue
        raise RuntimeError(f"{sampler.__name__}: could not place the scene; sizes too large for the image?")

    wrapped.__name__ = sampler.__name__
    wrapped.__doc__ = sampler.__doc__
    return wrapped


# ----------------------------------------------------------------------------------------------
# easy families


def _largest_scene(rng: np.random.Generator, cfg: SynthConfig, distinct_kinds: bool) -> tuple[list[dict], int]:
    n = _ints(rng, 2, 3)
    kinds = [SHAPES[i] for i in _ints(rng, 0, len(SHAPES) - 1, n)]
    sizes = _ints(rng, cfg.large_min, cfg.large_max, n)
    areas = [shape_area(k, s) for k, s in zip(kinds, sizes)]
    order = sorted(range(n), key=lambda i: -areas[i])
    top, second = order[0], order[1]
    if areas[top] < 1.3 * areas[second] or sizes[top] < max(sizes[i] for i in order[1:]):
        raise _Retry
    if distinct_kinds and any(kinds[i] == kinds[top] for i in order[1:]):
        raise _Retry
    colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:n]]
    centres = _place_boxes(rng, sizes, cfg.image_size)
    return _shapes(kinds, colors, sizes, centres), top


@_retrying
def sample_color(rng, cfg, split):
    """Colour of the largest of 2-3 large shapes."""
    shapes, top = _largest_scene(rng, cfg, distinct_kinds=False)
    scene = _base_scene("color", cfg) | {"shapes": shapes}
    scene["query"] = {"template": _ints(rng, 0, 1)}
    return scene, shapes[top]["color"]


@_retrying
def sample_shape(rng, cfg, split):
    """Kind of the largest of 2-3 large shapes (the others are of other kinds)."""
    shapes, top = _largest_scene(rng, cfg, distinct_kinds=True)
    scene = _base_scene("shape", cfg) | {"shapes": shapes}
    scene["query"] = {"template": _ints(rng, 0, 1)}
    return scene, shapes[top]["kind"]


@_retrying
def sample_count(rng, cfg, split):
    """1-4 large shapes among 0-3 small distractor shapes."""
    k = _ints(rng, 1, 4)
    m = _ints(rng, 0, 3)
    sizes = _ints(rng, cfg.large_min, min(cfg.large_max, cfg.large_min + 10), k) + \
        _ints(rng, cfg.small_min, cfg.small_max, m)
    kinds = [SHAPES[i] for i in _ints(rng, 0, len(SHAPES) - 1, k + m)]
    colors = [COLOR_NAMES[i] for i in _ints(rng, 0, len(COLOR_NAMES) - 1, k + m)]
    centres = _place_boxes(rng, sizes, cfg.image_size)
    scene = _base_scene("count", cfg) | {"shapes": _shapes(kinds, colors, sizes, centres),
                                         "large_min": cfg.large_min}
    scene["query"] = {"template": _ints(rng, 0, 1)}
    return scene, str(k)


@_retrying
def sample_presence(rng, cfg, split):
    """Is a given kind among 1-3 large shapes? Yes and no are equally likely."""
    n = _ints(rng, 1, 3)
    query = SHAPES[_ints(rng, 0, len(SHAPES) - 1)]
    yes = bool(rng.random() < 0.5)
    others = [k for k in SHAPES if k != query]
    kinds = [others[i] for i in _ints(rng, 0, len(others) - 1, n)]
    if yes:
        kinds[_ints(rng, 0, n - 1)] = query
    sizes = _ints(rng, cfg.large_min, min(cfg.large_max, cfg.large_min + 14), n)
    colors = [COLOR_NAMES[i] for i in _ints(rng, 0, len(COLOR_NAMES) - 1, n)]
    centres = _place_boxes(rng, sizes, cfg.image_size)
    scene = _base_scene("presence", cfg) | {"shapes": _shapes(kinds, colors, sizes, centres),
                                            "large_min": cfg.large_min}
    scene["query"] = {"template": _ints(rng, 0, 1), "kind": query}
    return scene, "yes" if yes else "no"


@_retrying
def sample_kind_color(rng, cfg, split):
    """Colour of the shape of a named kind, among 2-3 large shapes of distinct kinds and colours (training only)."""
    n = _ints(rng, 2, 3)
    kinds = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:n]]
    sizes = _ints(rng, cfg.large_min, min(cfg.large_max, cfg.large_min + 14), n)
    centres = _place_boxes(rng, sizes, cfg.image_size)
    target = _ints(rng, 0, n - 1)
    scene = _base_scene("kind_color", cfg) | {"shapes": _shapes(kinds, colors, sizes, centres)}
    scene["query"] = {"template": _ints(rng, 0, 1), "kind": kinds[target]}
    return scene, colors[target]


@_retrying
def sample_side(rng, cfg, split):
    """One large shape clearly left or right of the midline, plus 0-3 small distractors."""
    size = cfg.image_size
    s = _ints(rng, cfg.large_min, min(cfg.large_max, size // 4))
    left = bool(rng.random() < 0.5)
    lo, hi = 3 + s, size // 2 - 12
    if hi < lo:
        raise RuntimeError("image too small for the side family")
    cx = _ints(rng, lo, hi)
    if not left:
        cx = size - 1 - cx
    cy = _ints(rng, 3 + s, size - 4 - s)
    m = _ints(rng, 0, 3)
    small = _ints(rng, cfg.small_min, cfg.small_max, m)
    kinds = [SHAPES[i] for i in _ints(rng, 0, len(SHAPES) - 1, m + 1)]
    colors = [COLOR_NAMES[i] for i in _ints(rng, 0, len(COLOR_NAMES) - 1, m + 1)]
    # place distractors around the fixed large shape
    centres: list[tuple[int, int]] = [(cx, cy)]
    halves = [s]
    for h in small:
        for _ in range(60):
            x, y = _ints(rng, 3 + h, size - 4 - h), _ints(rng, 3 + h, size - 4 - h)
            if all(abs(x - ox) >= h + oh + 4 or abs(y - oy) >= h + oh + 4 for (ox, oy), oh in zip(centres, halves)):
                centres.append((x, y))
                halves.append(h)
                break
        else:
            raise _Retry
    scene = _base_scene("side", cfg) | {"shapes": _shapes(kinds, colors, halves, centres),
                                        "large_min": cfg.large_min}
    scene["query"] = {"template": _ints(rng, 0, 1)}
    return scene, "left" if left else "right"


# ----------------------------------------------------------------------------------------------
# hard families


def _text(text: str, x: int, y: int, cfg: SynthConfig, color: list[int], role: str) -> dict:
    return {"text": text, "x": x, "y": y, "size": cfg.text_size, "gap": cfg.glyph_gap, "color": color, "role": role}


@_retrying
def sample_code(rng, cfg, split):
    """A printed code of ``code_len`` characters from ``code_charset`` at a random place."""
    n = _ints(rng, *cfg.code_len)
    code = "".join(cfg.code_charset[i] for i in _ints(rng, 0, len(cfg.code_charset) - 1, n))
    w, h = text_width(code, cfg.text_size, cfg.glyph_gap), text_height(cfg.text_size)
    x = _ints(rng, 3, cfg.image_size - 3 - w)
    y = _ints(rng, 3, cfg.image_size - 3 - h)
    scene = _base_scene("code", cfg) | {"texts": [_text(code, x, y, cfg, _dark(rng), "code")]}
    scene["query"] = {"template": _ints(rng, 0, 1)}
    return scene, code


@_retrying
def sample_doc(rng, cfg, split):
    """A white panel of ``key: value`` rows in small print; ask for one key's value."""
    n = _ints(rng, *cfg.doc_rows)
    keys = [DOC_KEYS[i] for i in rng.permutation(len(DOC_KEYS))[:n]]
    lo, hi = 10 ** (cfg.doc_value_digits - 1), 10 ** cfg.doc_value_digits - 1
    values = [str(v) for v in _ints(rng, lo, hi, n)]
    rows = [f"{k}: {v}" for k, v in zip(keys, values)]
    th = text_height(cfg.text_size)
    row_h, pad = th + 3, 4
    width = max(text_width(r, cfg.text_size, cfg.glyph_gap) for r in rows) + 2 * pad
    height = n * row_h - 3 + 2 * pad
    px = _ints(rng, 2, cfg.image_size - 3 - width)
    py = _ints(rng, 2, cfg.image_size - 3 - height)
    color = _dark(rng)
    texts = [_text(r, px + pad, py + pad + i * row_h, cfg, color, "doc_row") for i, r in enumerate(rows)]
    scene = _base_scene("doc", cfg) | {
        "rects": [{"box": [px, py, px + width, py + height], "fill": list(PAPER), "outline": list(PANEL_OUTLINE)}],
        "texts": texts,
    }
    ask = _ints(rng, 0, n - 1)
    scene["query"] = {"template": _ints(rng, 0, 1), "key": keys[ask]}
    return scene, values[ask]


@_retrying
def sample_chart(rng, cfg, split):
    """A bar chart: small category letters under the bars, small values above; ask one bar's value. The
    axis has no scale, and its top stands for a random value, so only the printed value answers."""
    n = _ints(rng, *cfg.bars)
    labels = [BAR_LABELS[i] for i in rng.permutation(len(BAR_LABELS))[:n]]
    vlo, vhi = cfg.bar_value_range
    values = _ints(rng, vlo, vhi, n)
    th = text_height(cfg.text_size)
    bar_w = max(12, text_width(str(vhi), cfg.text_size, cfg.glyph_gap) + 2)
    gap = 6
    chart_h = max(24, min(cfg.image_size - 2 * th - 24, int(0.45 * cfg.image_size)))
    width = n * (bar_w + gap) + gap
    x0 = _ints(rng, 3, cfg.image_size - 3 - width)
    top_room = th + 4
    base = _ints(rng, 3 + top_room + chart_h, cfg.image_size - 4 - th - 3)
    # the axis top stands for a random value in [vhi, 2 vhi], so a bar's height does not give its value away
    # (at one-digit values a height read off the blurred base view would); its printed label does
    scale = _ints(rng, vhi, 2 * vhi)
    color = COLOR_NAMES[_ints(rng, 0, len(COLOR_NAMES) - 1)]
    ink = _dark(rng)
    bars, texts = [], []
    for i, (label, value) in enumerate(zip(labels, values)):
        bx0 = x0 + gap + i * (bar_w + gap)
        bh = max(1, int(round(value / max(scale, 1) * chart_h)))
        bars.append({"box": [bx0, base - bh, bx0 + bar_w - 1, base - 1], "color": color,
                     "label": label, "value": value})
        vs = str(value)
        texts.append(_text(vs, bx0 + (bar_w - text_width(vs, cfg.text_size, cfg.glyph_gap)) // 2,
                           base - bh - th - 2, cfg, ink, "bar_value"))
        texts.append(_text(label, bx0 + (bar_w - text_width(label, cfg.text_size, cfg.glyph_gap)) // 2,
                           base + 2, cfg, ink, "bar_label"))
    lines = [{"xy": [x0, base, x0 + width, base], "color": list(AXIS), "width": 1},
             {"xy": [x0, base - chart_h - 2, x0, base], "color": list(AXIS), "width": 1}]
    scene = _base_scene("chart", cfg) | {"bars": bars, "lines": lines, "texts": texts,
                                         "chart": {"height": chart_h, "scale": scale}}
    ask = _ints(rng, 0, n - 1)
    scene["query"] = {"template": _ints(rng, 0, 1), "label": labels[ask]}
    return scene, str(values[ask])


@_retrying
def sample_dots(rng, cfg, split):
    """``dot_count`` small dots of radius in ``dot_radius`` (half-pixel steps), centres at least
    ``dot_spacing`` apart, packed in a square whose side is ``dot_spacing * (dot_region_scale * sqrt(n) + 1)``."""
    n = _ints(rng, *cfg.dot_count)
    # the region grows with the count so the packing density (and so the difficulty) stays even
    region = int(np.ceil(cfg.dot_spacing * (cfg.dot_region_scale * np.sqrt(n) + 1)))
    region = min(max(region, 4 * cfg.dot_spacing), cfg.image_size - 8)
    rx = _ints(rng, 3, cfg.image_size - 3 - region)
    ry = _ints(rng, 3, cfg.image_size - 3 - region)
    r_lo, r_hi = cfg.dot_radius
    radii = [r_lo + 0.5 * k for k in range(int(round((r_hi - r_lo) / 0.5)) + 1)]  # half-pixel steps
    m = int(np.ceil(r_hi)) + 1
    pts: list[tuple[int, int]] = []
    for _ in range(n):
        for _ in range(200):
            x, y = _ints(rng, rx + m, rx + region - m), _ints(rng, ry + m, ry + region - m)
            if all((x - a) ** 2 + (y - b) ** 2 >= cfg.dot_spacing ** 2 for a, b in pts):
                pts.append((x, y))
                break
        else:
            raise _Retry
    color = _dark(rng)
    rs = [radii[i] for i in _ints(rng, 0, len(radii) - 1, n)]
    scene = _base_scene("dots", cfg) | {"dots": [{"cx": x, "cy": y, "r": r, "color": color}
                                                 for (x, y), r in zip(pts, rs)]}
    scene["query"] = {"template": _ints(rng, 0, 1)}
    return scene, str(n)


@_retrying
def sample_handwriting(rng, cfg, split):
    """A number of ``hand_digits`` digits written with real scans from the split's own pool."""
    n = _ints(rng, *cfg.hand_digits)
    digits = [_ints(rng, 1 if (i == 0 and n > 1) else 0, 9) for i in range(n)]
    pools = scans_by_digit(split)
    scans = [pools[d][_ints(rng, 0, len(pools[d]) - 1)] for d in digits]
    s, g = cfg.hand_size, cfg.hand_gap
    width = n * s + (n - 1) * g
    x = _ints(rng, 3, cfg.image_size - 3 - width)
    y = _ints(rng, 3, cfg.image_size - 3 - s)
    ink = [int(v) for v in rng.integers(0, 50, size=2)] + [_ints(rng, 60, 140)]
    scene = _base_scene("handwriting", cfg) | {
        "scans": [{"index": idx, "x": x + i * (s + g), "y": y, "size": s, "color": ink} for i, idx in enumerate(scans)]
    }
    scene["query"] = {"template": _ints(rng, 0, 1)}
    return scene, "".join(str(d) for d in digits)


SAMPLERS: dict[str, Callable[[np.random.Generator, SynthConfig, str], tuple[dict, str]]] = {
    "color": sample_color,
    "shape": sample_shape,
    "count": sample_count,
    "presence": sample_presence,
    "side": sample_side,
    "code": sample_code,
    "doc": sample_doc,
    "chart": sample_chart,
    "dots": sample_dots,
    "handwriting": sample_handwriting,
    "kind_color": sample_kind_color,
}


# ----------------------------------------------------------------------------------------------
# questions and answer derivation


def question_text(scene: dict) -> str:
    """The question of a scene, from its family's template set and ``scene["query"]``."""
    query = scene["query"]
    template = QUESTION_TEMPLATES[scene["family"]][query["template"]]
    return template.format(**{k: v for k, v in query.items() if k != "template"})


def other_queries(scene: dict) -> list[dict]:
    """The other questions the same scene answers, as ``query`` dicts (template 0): every other key of a
    document, every other bar of a chart, every other shape kind for presence, every other drawn kind for
    kind_color; none for the families whose scene holds one answer. With :func:`derive_answer` they give extra training turns per image
    (``DataSpec.questions_per_image``): more supervision for one pass over the visual tokens."""
    family, query = scene["family"], scene.get("query", {})
    if family == "doc":
        keys = [t["text"].partition(": ")[0] for t in scene["texts"] if t["role"] == "doc_row"]
        return [{"template": 0, "key": k} for k in keys if k != query.get("key")]
    if family == "chart":
        labels = [t["text"] for t in scene["texts"] if t["role"] == "bar_label"]
        return [{"template": 0, "label": label} for label in labels if label != query.get("label")]
    if family == "presence":
        return [{"template": 0, "kind": k} for k in SHAPES if k != query.get("kind")]
    if family == "kind_color":
        return [{"template": 0, "kind": s["kind"]} for s in scene["shapes"] if s["kind"] != query.get("kind")]
    return []


def _largest(shapes: list[dict]) -> dict:
    return max(shapes, key=lambda s: shape_area(s["kind"], s["size"]))


def _text_center(text: dict, cfg_gap: int = 1) -> tuple[float, float]:
    w = text_width(text["text"], int(text["size"]), int(text.get("gap", cfg_gap)))
    return text["x"] + w / 2.0, text["y"] + text_height(int(text["size"])) / 2.0


def derive_answer(scene: dict) -> str:
    """Re-derive the answer from what the scene draws (see module doc)."""
    family = scene["family"]
    query = scene.get("query", {})
    if family == "color":
        return _largest(scene["shapes"])["color"]
    if family == "shape":
        return _largest(scene["shapes"])["kind"]
    if family == "count":
        return str(sum(1 for s in scene["shapes"] if s["size"] >= scene["large_min"]))
    if family == "presence":
        found = any(s["kind"] == query["kind"] and s["size"] >= scene["large_min"] for s in scene["shapes"])
        return "yes" if found else "no"
    if family == "kind_color":
        (shape,) = [s for s in scene["shapes"] if s["kind"] == query["kind"]]
        return shape["color"]
    if family == "side":
        (large,) = [s for s in scene["shapes"] if s["size"] >= scene["large_min"]]
        return "left" if large["cx"] < scene["size"][0] / 2 else "right"
    if family == "code":
        (code,) = [t["text"] for t in scene["texts"] if t["role"] == "code"]
        return code
    if family == "doc":
        for t in scene["texts"]:
            key, _, value = t["text"].partition(": ")
            if key == query["key"]:
                return value
        raise ValueError(f"key {query['key']!r} not in the document")
    if family == "chart":
        (label,) = [t for t in scene["texts"] if t["role"] == "bar_label" and t["text"] == query["label"]]
        lx, _ = _text_center(label)
        (bar,) = [b for b in scene["bars"] if b["box"][0] <= lx <= b["box"][2]]
        above = [t for t in scene["texts"] if t["role"] == "bar_value"
                 and bar["box"][0] <= _text_center(t)[0] <= bar["box"][2] and t["y"] < bar["box"][1]]
        (value,) = above
        return value["text"]
    if family == "dots":
        return str(len(scene["dots"]))
    if family == "handwriting":
        scans = sorted(scene["scans"], key=lambda s: s["x"])
        return "".join(str(scan_label(int(s["index"]))) for s in scans)
    raise ValueError(f"unknown synth family {family!r}")
