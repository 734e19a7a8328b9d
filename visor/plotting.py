"""Plotting helpers shared by every report that draws a PNG: a headless pyplot and label placement."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only; no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: label offsets from the point, in points, tried in order: beside it first, then further out (a leader line joins
#: every label to its point; beside it, the line is a tick)
_LABEL_OFFSETS = [(4, 4), (4, -10), (-4, 4), (-4, -10)] + [
    (dx, dy) for r in (16, 28, 40, 52) for dx, dy in ((6, r), (6, -r), (-6, r), (-6, -r), (r + 10, 0), (-r - 10, 0))]


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: float = 7) -> list:
    """Annotate each (x, y, text) point where its label overlaps no label placed before it, no marker, nor the legend.

    Greedy, in the order given, over ``_LABEL_OFFSETS`` (measured with the figure's renderer, so call it after
    the axes' limits and layout are final); a label that fits nowhere takes the candidate with the least
    overlap. A thin leader line joins each label to its point. Returns the annotations."""
    from matplotlib.text import Text

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    markers = [ax.transData.transform((x, y)) for x, y, _ in points]
    # a label keeps a few pixels away from every other marker, so a crowded point's label moves out on a leader line
    # instead of sitting beside a neighbour's marker where it would read as the neighbour's
    marker_boxes = [(mx - 9, my - 9, mx + 9, my + 9) for mx, my in markers]
    placed: list[tuple[float, float, float, float]] = []
    legend = ax.get_legend()
    if legend is not None:  # keep clear of the legend too
        box = legend.get_window_extent(renderer)
        placed.append((box.x0, box.y0, box.x1, box.y1))
    annotations = []

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    axes_box = ax.get_window_extent(renderer)
    for (x, y, text), own in zip(points, marker_boxes):
        best = None
        for dx, dy in _LABEL_OFFSETS:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                               arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35", "shrinkA": 1, "shrinkB": 4})
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text alone, not its leader line
            rect = (box.x0, box.y0, box.x1, box.y1)
            outside = max(0.0, axes_box.x0 - rect[0]) + max(0.0, rect[2] - axes_box.x1) + \
                max(0.0, axes_box.y0 - rect[1]) + max(0.0, rect[3] - axes_box.y1)
            cost = sum(overlap(rect, other) for other in placed) + \
                sum(overlap(rect, m) for m in marker_boxes if m is not own) + 100 * outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, rect)
            else:
                note.remove()
            if cost == 0:
                break
        placed.append(best[2])
        annotations.append(best[1])
    return annotations
