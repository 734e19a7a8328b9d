"""Is the procedural benchmark's hard content illegible at the base view, and its easy content not?

For every family, simple non-learned "oracles" that know where to look answer test-split items from
three views of the same image: the full-resolution image (what anyres tiles show), and the image
downscaled (bicubic, as the LLaVA-OV image processor resizes) to each base-view size and, for the
glyph readers, scaled back up. The oracles:

* printed glyphs (code, doc, chart): a 1-nearest-neighbour classifier on normalised 14x14 crops
  centred on each glyph's known box (from the scene; pixels beyond the box plus the blur radius are
  blanked so neighbours do not vote), trained on glyph crops of *train-split*
  items seen through the **same view** ("matched": it knows the blur; the strongest simple reader)
  and, as a second line, trained on full-resolution crops ("clean"). The item's answer is then
  re-derived from the scene with every printed string replaced by what the oracle read
  (``derive_answer``), and graded with the family's grader (doc: ANLS, chart: relaxed accuracy);
* handwriting: the same 1-NN on crops of the scans, trained on train-split items (disjoint scans);
* dots: the better of (a) counting connected components of dark pixels, threshold tuned on train
  items per view, and (b) total ink divided by a per-view fitted ink-per-dot (the shortcut that dot
  sizes are varied to defeat);
* easy families: pixels classified to the nearest palette colour at the base view itself; colour =
  most pixels, count = components above an area threshold, side = centroid of the largest component,
  shape / presence = fill ratio and top/bottom width profile of components.

Prints a table (exact/graded accuracy per family and view) and, last, one JSON line.
Runs in well under a minute on two cores: ``python benchmarks/synth_legibility.py [--n-test 150]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections import defaultdict

import numpy as np
from PIL import Image
from scipy import ndimage

from visor.data.synth import EASY_FAMILIES, HARD_FAMILIES, SHAPES, SynthConfig, derive_answer, generate_items
from visor.data.synth.config import COLORS
from visor.eval.graders import grade

CROP = 14


def view(image: Image.Image, base: int | None, back: bool = True) -> np.ndarray:
    """Grey float image as seen through a base view of side ``base`` (None = full resolution)."""
    if base is None:
        return np.asarray(image.convert("L"), dtype=np.float32)
    small = image.resize((base, base), Image.Resampling.BICUBIC)
    if back:
        small = small.resize(image.size, Image.Resampling.BICUBIC)
    return np.asarray(small.convert("L"), dtype=np.float32)


def crop(grey: np.ndarray, box: tuple[int, int, int, int], margin: int) -> np.ndarray:
    """Normalised CROP x CROP window centred on a glyph; pixels farther than ``margin`` from the glyph's
    box are set to the background, so neighbouring glyphs do not vote."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    wx, wy = int(round(cx - CROP / 2)), int(round(cy - CROP / 2))
    bg = float(np.median(grey))
    pad = np.pad(grey, CROP, mode="constant", constant_values=bg)
    c = pad[wy + CROP: wy + 2 * CROP, wx + CROP: wx + 2 * CROP].copy()
    ys, xs = np.mgrid[wy: wy + CROP, wx: wx + CROP]
    outside = (xs < x0 - margin) | (xs >= x1 + margin) | (ys < y0 - margin) | (ys >= y1 + margin)
    c[outside] = bg
    c = c.reshape(-1) - c.mean()
    return c / (np.linalg.norm(c) + 1e-6)


class NearestNeighbour:
    """1-NN by cosine similarity of normalised crops (brute force, chunked)."""

    def __init__(self, feats: np.ndarray, labels: list[str]):
        self.feats = feats.astype(np.float32)
        self.labels = np.asarray(labels)

    def predict(self, feats: np.ndarray) -> list[str]:
        out = []
        for i in range(0, len(feats), 2048):
            sims = feats[i: i + 2048].astype(np.float32) @ self.feats.T
            out.extend(self.labels[sims.argmax(1)].tolist())
        return out


def glyph_crops(items, base, sources):
    feats, labels, owners = [], [], []
    for k, it in enumerate(items):
        grey = view(it.image, base)
        margin = 0 if base is None else int(np.ceil(it.image.size[0] / base))  # blur spreads ink by ~1 base pixel
        for g in it.glyphs:
            if g.source in sources:
                feats.append(crop(grey, g.box, margin))
                labels.append(g.char)
                owners.append(k)
    return np.stack(feats), labels, owners


def read_scene(item, chars: list[str]) -> str:
    """The item's answer re-derived with printed text replaced by the oracle's characters."""
    scene = copy.deepcopy(item.scene)
    it = iter(chars)
    for text in scene.get("texts", ()):
        text["text"] = "".join(ch if ch.isspace() else next(it) for ch in text["text"])
    try:
        return derive_answer(scene)
    except (ValueError, KeyError):  # e.g. the asked key/label was misread: nothing to answer
        return ""


def hard_glyph_families(train, test, views, results):
    for fam, sources in (("code", {"print"}), ("doc", {"print"}), ("chart", {"print"}), ("handwriting", {"hand"})):
        tr = [it for it in train if it.family == fam]
        te = [it for it in test if it.family == fam]
        if not tr or not te:
            continue
        # the full-resolution reader, also tried on blurred views ("clean")
        clean = NearestNeighbour(*glyph_crops(tr, None, sources)[:2])
        for name, base in views.items():
            f_te, l_te, own = glyph_crops(te, base, sources)
            matched = NearestNeighbour(*glyph_crops(tr, base, sources)[:2])
            for reader_name, reader in (("matched", matched), ("clean", clean)):
                pred = reader.predict(f_te)
                per_item = defaultdict(list)
                for k, p in zip(own, pred):
                    per_item[k].append(p)
                scores = []
                for k, it in enumerate(te):
                    if fam == "handwriting":
                        xs = [g.box[0] for g in it.glyphs]
                        answer = "".join(ch for _, ch in sorted(zip(xs, per_item[k])))
                    else:
                        answer = read_scene(it, per_item[k])
                    scores.append(grade(it.grader, answer, it.answer))
                glyph_acc = float(np.mean([p == t for p, t in zip(pred, l_te)]))
                results[(fam, name, reader_name)] = (float(np.mean(scores)), glyph_acc)


def dark_mask(grey: np.ndarray, frac: float) -> np.ndarray:
    bg = np.median(grey)
    return (bg - grey) > frac * bg


def dots_family(train, test, views, results):
    tr = [it for it in train if it.family == "dots"]
    te = [it for it in test if it.family == "dots"]
    fracs = np.linspace(0.05, 0.6, 12)
    for name, base in views.items():
        g_tr = [view(it.image, base) for it in tr]
        g_te = [view(it.image, base) for it in te]
        y_tr = np.array([int(it.answer) for it in tr])
        y_te = np.array([int(it.answer) for it in te])

        def components(greys, frac):
            return np.array([ndimage.label(dark_mask(g, frac))[1] for g in greys])

        best = max(fracs, key=lambda f: np.mean(components(g_tr, f) == y_tr))
        acc_cc = float(np.mean(components(g_te, best) == y_te))
        ink_tr = np.array([np.clip(np.median(g) - g, 0, None).sum() for g in g_tr])
        ink_te = np.array([np.clip(np.median(g) - g, 0, None).sum() for g in g_te])
        per_dot = float(np.sum(ink_tr * y_tr) / np.sum(y_tr * y_tr))
        acc_ink = float(np.mean(np.round(ink_te / per_dot) == y_te))
        results[("dots", name, "matched")] = (max(acc_cc, acc_ink), None)
        results[("dots", name, "clean")] = (acc_cc, None)


# ---------------------------------------------------------------------------------------------- easy

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
NAMES = list(COLORS)


def colour_labels(image: Image.Image, base: int | None) -> np.ndarray:
    """Per-pixel palette index (-1 = background) of the view, at the view's own resolution."""
    im = image if base is None else image.resize((base, base), Image.Resampling.BICUBIC)
    rgb = np.asarray(im, dtype=np.float32)
    bg = np.asarray(SynthConfig().background, dtype=np.float32)
    pal = np.concatenate([bg[None], PALETTE])
    d = ((rgb[:, :, None, :] - pal[None, None]) ** 2).sum(-1)
    return d.argmin(-1) - 1


def shape_kind(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h = box.shape[0]
    fill = box.mean()
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    top, bottom = box[h // 4].mean(), box[(3 * h) // 4].mean()
    return "triangle" if bottom > 1.4 * top else "diamond"


def easy_answers(item, base: int | None, min_area: float) -> str:
    labels = colour_labels(item.image, base)
    scale = (base or item.image.size[0]) / item.image.size[0]
    comps = []
    for c in range(len(NAMES)):
        lab, n = ndimage.label(labels == c)
        for k in range(1, n + 1):
            m = lab == k
            comps.append((int(m.sum()), c, m))
    comps.sort(key=lambda t: -t[0])
    large = [t for t in comps if t[0] >= min_area * scale * scale]
    fam = item.family
    if fam == "color":
        return NAMES[comps[0][1]] if comps else ""
    if fam == "shape":
        return shape_kind(comps[0][2]) if comps else ""
    if fam == "count":
        return str(len(large))
    if fam == "presence":
        return "yes" if any(shape_kind(m) == item.scene["query"]["kind"] for _, _, m in large) else "no"
    if fam == "side":
        if not comps:
            return ""
        xs = np.nonzero(comps[0][2])[1]
        return "left" if xs.mean() < comps[0][2].shape[1] / 2 else "right"
    raise ValueError(fam)


def easy_families(test, views, results):
    cfg = SynthConfig()
    min_area = 0.5 * 2 * cfg.large_min ** 2  # half the area of the smallest large triangle
    for fam in EASY_FAMILIES:
        te = [it for it in test if it.family == fam]
        for name, base in views.items():
            acc = float(np.mean([grade(it.grader, easy_answers(it, base, min_area), it.answer) for it in te]))
            results[(fam, name, "matched")] = (acc, None)
            results[(fam, name, "clean")] = (acc, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=300, help="train items per hard family (oracle fitting)")
    parser.add_argument("--n-test", type=int, default=150, help="test items per family")
    parser.add_argument("--bases", type=int, nargs="+", default=[96, 64], help="base-view sizes to test")
    parser.add_argument("--image-size", type=int, default=None, help="override SynthConfig.image_size")
    parser.add_argument("--text-size", type=int, default=None, help="override SynthConfig.text_size")
    args = parser.parse_args(argv)
    t0 = time.time()
    overrides = {k: v for k, v in (("image_size", args.image_size), ("text_size", args.text_size)) if v is not None}
    cfg = dataclasses.replace(SynthConfig(), **overrides)
    train = list(generate_items("train", args.n_train * len(HARD_FAMILIES), seed=0, config=cfg, families=HARD_FAMILIES))
    fams = EASY_FAMILIES + HARD_FAMILIES
    test = list(generate_items("test", args.n_test * len(fams), seed=0, config=cfg, families=fams))
    views = {f"full{cfg.image_size}": None} | {f"base{b}": b for b in args.bases}
    results: dict = {}
    easy_families(test, views, results)
    hard_glyph_families(train, test, views, results)
    dots_family(train, test, views, results)

    chance = {"code": "~0", "doc": "~1/4 key", "chart": "~1/4 bar", "dots": "1/11", "handwriting": "1/90",
              "color": "~1/3", "shape": "~1/3", "count": "1/4", "presence": "1/2", "side": "1/2"}
    header = f"{'family':<12}{'diff':<6}" + "".join(f"{v:>22}" for v in views) + f"{'chance':>11}"
    print(f"image {cfg.image_size}px, text {cfg.text_size}, hand {cfg.hand_size}px; "
          f"cells: item score matched-reader (clean-reader) [glyph acc]; {args.n_test} test items/family")
    print(header)
    out = {"image_size": cfg.image_size, "text_size": cfg.text_size, "n_test_per_family": args.n_test, "views": list(views), "families": {}}
    means = defaultdict(lambda: defaultdict(list))
    for fam in fams:
        diff = "easy" if fam in EASY_FAMILIES else "hard"
        cells, rec = [], {}
        for v in views:
            score, gacc = results[(fam, v, "matched")]
            clean, _ = results[(fam, v, "clean")]
            cell = f"{100 * score:5.1f}" + (f" ({100 * clean:5.1f})" if fam in HARD_FAMILIES else "")
            if gacc is not None:
                cell += f" [{100 * gacc:3.0f}]"
            cells.append(f"{cell:>22}")
            rec[v] = {"score": round(score, 4), "clean_reader": round(clean, 4)}
            if gacc is not None:
                rec[v]["glyph_acc"] = round(gacc, 4)
            means[diff][v].append(score)
        out["families"][fam] = rec
        print(f"{fam:<12}{diff:<6}" + "".join(cells) + f"{chance[fam]:>11}")
    for diff in ("easy", "hard"):
        row = {v: round(float(np.mean(means[diff][v])), 4) for v in views}
        out[f"{diff}_mean"] = row
        print(f"{diff + ' mean':<18}" + "".join(f"{100 * row[v]:22.1f}" for v in views))
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
