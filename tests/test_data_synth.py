"""The procedural benchmark: determinism, disjoint splits, answers correct by construction, dense targets."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visor.data.synth import (
    EASY_FAMILIES,
    FAMILIES,
    FAMILY_GRADERS,
    GLYPH_CLASSES,
    SHAPE_CLASSES,
    HARD_FAMILIES,
    SPLITS,
    SynthConfig,
    SynthDataset,
    SynthStream,
    TRAINING_FAMILIES,
    dense_targets,
    derive_answer,
    generate_item,
    generate_items,
    item_seed,
    render_scene,
    write_split,
)
from visor.data.synth.handwriting import SCAN_POOLS, scan_label, split_of_scan
from visor.data.synth.render import text_height
from visor.data.synth.seeds import split_of_seed
from visor.eval.graders import grade

PER_FAMILY = 12  # items per family in the by-construction checks


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def items():
    """PER_FAMILY items of every family from every split."""
    out = []
    for split in SPLITS:
        out += list(generate_items(split, PER_FAMILY * len(FAMILIES), seed=3))
    return out


def test_same_seed_gives_byte_identical_items_and_images():
    a = list(generate_items("train", 2 * len(FAMILIES), seed=11))
    b = list(generate_items("train", 2 * len(FAMILIES), seed=11))
    for x, y in zip(a, b):
        assert x == y  # every field but image/glyphs (compare=False)
        assert x.png_bytes() == y.png_bytes()
        assert x.glyphs == y.glyphs
    c = list(generate_items("train", 2 * len(FAMILIES), seed=12))
    assert sum(x.png_bytes() != z.png_bytes() for x, z in zip(a, c)) >= len(a) - 1


def test_item_does_not_depend_on_order_or_stream_position():
    seq = list(generate_items("val", 25, seed=5))
    alone = generate_item("val", 17, seed=5)
    assert alone == seq[17] and alone.png_bytes() == seq[17].png_bytes()
    ds = SynthDataset("val", 25, seed=5)
    assert len(ds) == 25 and ds[17] == seq[17] and ds[-1] == seq[24]
    with pytest.raises(IndexError):
        ds[25]
    stream = list(SynthStream("val", seed=5, n=25))
    assert stream == seq
    endless = iter(SynthStream("val", seed=5, start=20))
    assert [next(endless) for _ in range(3)] == seq[20:23]


def test_write_split_is_byte_identical(tmp_path: Path):
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    write_split(tmp_path / "a", "test", 12, seed=2)
    write_split(tmp_path / "b", "test", 12, seed=2)
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert da == db and len(da) == 12 + 2
    lines = (tmp_path / "a" / "test.jsonl").read_text().splitlines()
    assert len(lines) == 12
    rec = json.loads(lines[0])
    assert set(rec) == {"id", "image", "conversations", "family", "difficulty", "grader", "scene"}
    assert rec["conversations"][0]["value"].startswith("<image>\n")
    assert (tmp_path / "a" / rec["image"]).is_file()
    meta = json.loads((tmp_path / "a" / "test.meta.json").read_text())
    assert SynthConfig.from_dict(meta["config"]) == SynthConfig()


def test_splits_never_share_a_seed():
    seeds = {s: {item_seed(s, user, i) for user in (0, 1, 7, 2**24 - 1) for i in list(range(2000)) + [2**32 - 1]}
             for s in SPLITS}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"]) and not (seeds["val"] & seeds["test"])
    for s in SPLITS:
        assert {split_of_seed(v) for v in seeds[s]} == {s}
    assert generate_item("train", 4, seed=0).seed != generate_item("val", 4, seed=0).seed
    with pytest.raises(ValueError):
        item_seed("dev", 0, 0)
    with pytest.raises(ValueError):
        item_seed("train", 2**24, 0)


def test_handwriting_scans_never_shared_across_splits():
    bounds = sorted(SCAN_POOLS.values())
    assert bounds[0][0] == 0 and bounds[-1][1] == 1797
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, disjoint
    used = {}
    for split in SPLITS:
        scans = set()
        for it in generate_items(split, 60, seed=1, families=["handwriting"]):
            scans.update(s["index"] for s in it.scene["scans"])
        assert {split_of_scan(i) for i in scans} == {split}
        used[split] = scans
    assert not (used["train"] & used["val"] or used["train"] & used["test"] or used["val"] & used["test"])
    # every pool can write every digit
    for split, (lo, hi) in SCAN_POOLS.items():
        assert {scan_label(i) for i in range(lo, hi)} == set(range(10))


def test_every_answer_rederived_from_scene(items):
    seen = set()
    for it in items:
        seen.add(it.family)
        assert derive_answer(it.scene) == it.answer, (it.id, it.family)
        assert it.grader == FAMILY_GRADERS[it.family]
        assert it.difficulty == ("easy" if it.family in EASY_FAMILIES else "hard")
        assert grade(it.grader, it.answer, it.answer) == 1.0
        # the scene fully describes the image: re-rendering gives the same pixels and glyphs
        image, glyphs = render_scene(json.loads(json.dumps(it.scene)))
        assert _png(image) == it.png_bytes() and glyphs == it.glyphs
    assert seen == set(FAMILIES)


def test_answer_spaces(items):
    cfg = SynthConfig()
    by_family: dict[str, set[str]] = {}
    for it in items:
        by_family.setdefault(it.family, set()).add(it.answer)
        if it.family == "code":
            assert cfg.code_len[0] <= len(it.answer) <= cfg.code_len[1] and set(it.answer) <= set(cfg.code_charset)
        if it.family == "dots":
            assert cfg.dot_count[0] <= int(it.answer) <= cfg.dot_count[1]
        if it.family == "doc":
            assert it.answer.isdigit() and len(it.answer) == cfg.doc_value_digits and it.answer[0] != "0"
        if it.family == "chart":
            assert cfg.bar_value_range[0] <= int(it.answer) <= cfg.bar_value_range[1]
        if it.family == "handwriting":
            assert it.answer.isdigit() and cfg.hand_digits[0] <= len(it.answer) <= cfg.hand_digits[1]
    assert by_family["count"] <= {"1", "2", "3", "4"}
    assert by_family["presence"] == {"yes", "no"}
    assert by_family["side"] == {"left", "right"}


def test_wrong_answers_are_rejected(items):
    for it in items[: 3 * len(FAMILIES)]:
        wrong = {"yes": "no", "no": "yes", "left": "right", "right": "left"}.get(it.answer)
        if wrong is None:
            wrong = "".join(str((int(c) + 5) % 10) for c in it.answer) if it.answer.isdigit() else "zzzz"
        assert grade(it.grader, wrong, it.answer) == 0.0, (it.family, wrong, it.answer)


def test_chart_bar_heights_match_printed_values(items):
    for it in (i for i in items if i.family == "chart"):
        chart = it.scene["chart"]
        for bar in it.scene["bars"]:
            height = bar["box"][3] - bar["box"][1] + 1
            assert abs(height - bar["value"] / chart["scale"] * chart["height"]) <= 1
        printed = sorted(t["text"] for t in it.scene["texts"] if t["role"] == "bar_value")
        assert printed == sorted(str(b["value"]) for b in it.scene["bars"])


def test_hard_content_is_small_and_easy_content_large(items):
    cfg = SynthConfig()
    for it in items:
        if it.family in HARD_FAMILIES:
            assert it.glyphs, it.family
            for g in it.glyphs:
                x0, y0, x1, y1 = g.box
                assert x1 - x0 <= 12 and y1 - y0 <= 12, (it.family, g)
        elif it.family in ("color", "shape", "side"):
            assert max(s["size"] for s in it.scene["shapes"]) >= cfg.large_min
    assert text_height(cfg.text_size) <= 12


def test_glyphs_and_dense_targets(items):
    for it in (i for i in items if i.family in ("code", "handwriting")):
        assert "".join(g.char for g in it.glyphs) == it.answer
        d = dense_targets(it, 8)
        assert d.grid == (24, 24)
        # one line of glyphs: reading the labelled half-patches left to right spells the answer
        labelled = sorted((2 * c + half, GLYPH_CLASSES[v]) for r in range(24) for c in range(24)
                          for half, v in enumerate((d.left[r, c], d.right[r, c])) if v)
        assert "".join(ch for _, ch in labelled) == it.answer
    for it in (i for i in items if i.family == "dots"):
        d = dense_targets(it, 8)
        assert d.dots.sum() == int(it.answer)
    for it in (i for i in items if i.family == "color"):
        d = dense_targets(it, 8)
        assert d.color.max() > 0 and (d.left == 0).all()
        # a view resized to the base size scales the grid with it
        small = dense_targets(it.scene, 8, image_size=(64, 64))
        assert small.grid == (8, 8)
    for it in (i for i in items if i.family == "shape"):
        d = dense_targets(it, 8)
        kinds = {SHAPE_CLASSES[k] for k in np.unique(d.shape) if k}
        assert it.answer in kinds and kinds <= {s["kind"] for s in it.scene["shapes"]}
        assert ((d.shape > 0) <= (d.color > 0)).all()  # shapes are coloured; bars and text carry no kind


def test_dense_half_patches_separate_adjacent_glyphs():
    cfg = SynthConfig()
    for it in generate_items("train", 20, families=["code"]):
        d = dense_targets(it, 8)
        assert (d.left > 0).sum() + (d.right > 0).sum() == len(it.answer)
    assert cfg.text_size == 11


def test_config_validation_and_round_trip():
    cfg = SynthConfig(image_size=288, text_size=10)
    assert SynthConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        SynthConfig(code_len=(5, 3))
    with pytest.raises(ValueError):
        SynthConfig(image_size=32)
    with pytest.raises(TypeError):
        SynthConfig.from_dict({"bogus": 1})
    big = generate_item("train", 5, config=cfg, families=["code"])
    assert big.image.size == (288, 288) and derive_answer(big.scene) == big.answer
    with pytest.raises(ValueError):
        generate_item("train", 0, families=["nope"])


def test_family_round_robin_and_filter():
    fams = [it.family for it in generate_items("train", 2 * len(FAMILIES))]
    assert fams == list(FAMILIES) * 2
    only = [it.family for it in generate_items("train", 6, families=["dots", "side"])]
    assert only == ["dots", "side"] * 3


def test_training_family_kind_color():
    """``kind_color`` is generated only when named, answers by the named kind, and gives a turn per other kind."""
    from visor.data.synth.families import COLOR_NAMES, other_queries, question_text
    from visor.data.synth.config import SHAPES, difficulty_of

    assert "kind_color" in TRAINING_FAMILIES and "kind_color" not in FAMILIES
    assert difficulty_of("kind_color") == "easy"
    assert all(it.family in FAMILIES for it in generate_items("test", 3 * len(FAMILIES)))
    for split in SPLITS:
        for it in generate_items(split, 20, seed=5, families=["kind_color"]):
            shapes = it.scene["shapes"]
            kinds = [s["kind"] for s in shapes]
            assert 2 <= len(shapes) <= 3 and len(set(kinds)) == len(kinds)
            assert len({s["color"] for s in shapes}) == len(shapes)
            query = it.scene["query"]["kind"]
            assert query in kinds and query in it.question and it.answer in COLOR_NAMES
            assert it.answer == shapes[kinds.index(query)]["color"] == derive_answer(it.scene)
            image, _ = render_scene(json.loads(json.dumps(it.scene)))
            assert _png(image) == it.png_bytes()
            others = other_queries(it.scene)
            assert sorted(q["kind"] for q in others) == sorted(k for k in kinds if k != query)
            for q in others:
                scene = {**it.scene, "query": q}
                assert q["kind"] in question_text(scene)
                assert derive_answer(scene) == shapes[kinds.index(q["kind"])]["color"]
    mixed = [it.family for it in generate_items("train", 4, families=["presence", "kind_color"])]
    assert mixed == ["presence", "kind_color"] * 2
    assert set(SHAPES) == {it.scene["query"]["kind"] for it in generate_items("train", 60, families=["kind_color"])}


def test_family_weights_spread_each_family_over_the_cycle():
    from collections import Counter

    from visor.data.synth.generate import family_cycle

    cycle = family_cycle(None, {"code": 3, "dots": 2})
    assert len(cycle) == len(FAMILIES) + 3
    assert Counter(cycle) == Counter({**{f: 1 for f in FAMILIES}, "code": 3, "dots": 2})
    code_at = [i for i, f in enumerate(cycle) if f == "code"]
    assert min(b - a for a, b in zip(code_at, code_at[1:])) >= 3  # spread, not bunched
    assert family_cycle(["dots", "side"], {"dots": 2}) == ("dots", "side", "dots")
    assert family_cycle(["dots", "side"]) == ("dots", "side")
    items = [generate_item("train", i, families=["dots", "side"], weights={"dots": 2}) for i in range(6)]
    assert [it.family for it in items] == ["dots", "side", "dots"] * 2
    # the same index draws the same scene whatever the mix: only the family choice changes
    assert items[1].png_bytes() == generate_item("train", 1, families=["dots", "side"]).png_bytes()
    for bad, match in (({"nope": 2}, "outside the mix"), ({"code": 0}, "positive integer"), ({"code": 1.5}, "positive integer")):
        with pytest.raises(ValueError, match=match):
            family_cycle(None, bad)


def test_generation_is_fast():
    list(generate_items("train", len(FAMILIES)))  # warm caches (fonts, scans)
    n = 20 * len(FAMILIES)
    t = time.perf_counter()
    list(generate_items("train", n, seed=9))
    rate = n / (time.perf_counter() - t)
    assert rate > 200, f"{rate:.0f} items/s"  # typically thousands/s; lenient for a shared 2-core box


def test_cli_synth(tmp_path: Path, capsys):
    from visor.cli import data as data_cli

    parser = argparse.ArgumentParser(prog="visor")
    data_cli.register(parser.add_subparsers(dest="verb"))
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"text_size": 10}))
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "out"), "--split", "val", "--n", "4",
                              "--seed", "3", "--families", "code", "dots", "--config", str(cfg_file),
                              "--no-progress"])
    assert args.func(args) == 0
    lines = (tmp_path / "out" / "val.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["family"] for r in recs] == ["code", "dots", "code", "dots"]
    assert recs[0]["scene"]["texts"][0]["size"] == 10
    same = generate_item("val", 1, seed=3, config=dataclasses.replace(SynthConfig(), text_size=10),
                         families=["code", "dots"])
    assert (tmp_path / "out" / recs[1]["image"]).read_bytes() == same.png_bytes()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["data", "synth", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--out", "--split", "--n", "--seed", "--families", "--image-size", "--config", "--no-scene"):
        assert flag in help_text


def test_hard_glyphs_illegible_after_downscale():
    """Cheap proxy of benchmarks/synth_legibility.py: at the 64 px base view a printed code's ink
    contrast collapses."""
    it = generate_item("test", 0, families=["code"])
    arr = np.asarray(it.image.convert("L"), dtype=np.float32)
    small = np.asarray(it.image.convert("L").resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    bg = 242.0
    assert bg - arr.min() > 150
    assert bg - small.min() < 0.75 * (bg - arr.min())


def test_stream_and_dataset_work_with_torch_dataloader():
    torch_data = pytest.importorskip("torch.utils.data")
    expected = [it.answer for it in generate_items("train", 6, seed=8)]
    stream = SynthStream("train", seed=8, n=6, transform=lambda it: it.answer)
    loader = torch_data.DataLoader(stream.as_torch(), batch_size=None, num_workers=0)
    assert list(loader) == expected
    ds = SynthDataset("train", 6, seed=8, transform=lambda it: it.answer)
    assert list(torch_data.DataLoader(ds, batch_size=None)) == expected


def test_with_image_size_scales_large_shapes_and_keeps_small_print():
    """A smaller canvas shrinks large shapes with it (so every easy scene still fits: at 128 px the
    unscaled 44 px half-extents could not always be placed) and keeps glyphs, dots and scans at their
    pixel size; every family generates at 128 px."""
    default = SynthConfig()
    cfg = default.with_image_size(128)
    assert (cfg.image_size, cfg.large_min, cfg.large_max) == (128, 15, 29)
    assert (cfg.text_size, cfg.hand_size, cfg.dot_radius, cfg.small_max) == (
        default.text_size, default.hand_size, default.dot_radius, default.small_max)
    assert default.with_image_size(192) is default
    assert default.with_image_size(288).large_max == 66
    for it in generate_items("train", 300, config=cfg):  # 30 of each family, shape scenes included
        assert it.image.size == (128, 128) and derive_answer(it.scene) == it.answer
        for shape in it.scene.get("shapes", []):
            assert shape["size"] <= cfg.large_max


def test_question_first_prompt_order():
    """The image tag opens the human turn by default (LLaVA-OV's order); ``question_first`` moves it after the
    question, in the training sample, the evaluation items and nothing else."""
    from visor.eval.harness import synth_items

    item = generate_item("train", 0, seed=1)
    assert item.conversations()[0]["value"] == f"<image>\n{item.question}"
    flipped = item.conversations(question_first=True)
    assert flipped[0]["value"] == f"{item.question}\n<image>" and flipped[1] == item.conversations()[1]
    default, first = synth_items("val", 2, seed=3), synth_items("val", 2, seed=3, question_first=True)
    for a, b in zip(default, first):
        assert a.turns[0]["value"].startswith("<image>") and b.turns[0]["value"].endswith("<image>")
        assert a.answers == b.answers and a.id == b.id
