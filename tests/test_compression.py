"""Token compression: layouts and budgets, selection on known scores, identity, cached == uncached."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_model import batch_inputs, make_processor, randomise_cross_attention
from tests.tiny import IMAGE_TOKEN_ID, random_image, tiny_llava
from visor import LayerPlan, VisorForConditionalGeneration
from visor.compression import (
    REDUCERS,
    FastV,
    HiRED,
    ImageLayout,
    ImageTokens,
    Pooling,
    PyramidDrop,
    VisionZip,
    VisPruner,
    build_reducer,
)
from visor.compression.apply import apply_pre_llm, drop_placeholders
from visor.compression.cues import attention_received, encode_with_cues
from visor.compression.in_llm import choose_per_image, last_token_attention
from visor.compression.layout import NEWLINE
from visor.compression.pre_llm import apportion
from visor.compression.spec import kept_tokens
from visor.model.plan import LayerKind

PRE_LLM = ["pooling", "visionzip", "vispruner", "hired"]
IN_LLM = ["fastv", "pdrop"]
SIZES = ((50, 70), (40, 90))  # two different anyres layouts in one batch


@pytest.fixture(scope="module")
def hf():
    return tiny_llava(num_layers=6)


@pytest.fixture(scope="module")
def visor_model(hf):
    model = VisorForConditionalGeneration.from_llava_onevision(hf)
    randomise_cross_attention(model)
    return model


@pytest.fixture(scope="module")
def baseline(hf):
    return VisorForConditionalGeneration.from_llava_onevision(hf, plan=LayerPlan.all_self_attention(6))


def valid_logits(out):
    return out.logits[out.text_index >= 0]


def unit_counts(layout: ImageLayout, kept: torch.Tensor) -> list[int]:
    units = layout.token_units()[kept]
    return [int((units == u).sum()) for u in range(layout.num_units)]


# ---------------------------------------------------------------------- layout
@pytest.mark.parametrize("max_views", [9, 1])
def test_layout_matches_packing(max_views):
    hf = tiny_llava(num_layers=3, max_views=max_views)
    model = VisorForConditionalGeneration.from_llava_onevision(hf)
    for size in [(32, 32), (50, 70), (90, 40), (200, 31), (31, 200), (65, 64)]:
        for tiled in (True, False):
            layout = ImageLayout.from_config(model.config, size, tiled)
            assert layout.num_tokens == model.num_image_tokens(size, tiled)
            kinds, units = layout.token_kinds(), layout.token_units()
            assert int((kinds == NEWLINE).sum()) == layout.num_newlines
            assert sum(layout.unit_sizes()) + layout.num_newlines == layout.num_tokens
            assert torch.equal(units < 0, kinds == NEWLINE)
            if tiled and max_views == 9:  # no bilinear shrink: the crop of each cell is exact
                from visor.model.vision import num_crops, pack_image

                n = num_crops(size, model.config.image_grid_pinpoints, 32)
                g2 = layout.grid ** 2
                crop_ids = torch.arange(n, dtype=torch.float)[:, None, None].expand(n, g2, 1)
                packed = pack_image(crop_ids, size, torch.full((1,), -1.0), grid_pinpoints=model.config.image_grid_pinpoints,
                                    base_size=32)[:, 0]
                tile_cells = kinds == 1
                assert torch.equal(packed[tile_cells].long() - 1, torch.tensor(layout.cell_tile))
    shrunk = ImageLayout.from_config(model.config, (200, 31))
    if max_views == 1:
        assert shrunk.packed[0] * shrunk.packed[1] < shrunk.tile_grid[0] * shrunk.tile_grid[1] * 16


# ---------------------------------------------------------------------- budgets and layouts in a batch
@pytest.mark.parametrize("name", PRE_LLM)
def test_pre_llm_budgets_per_image_and_unit(baseline, name):
    inputs = batch_inputs(baseline, sizes=SIZES)
    for keep in (0.5, 0.3, 0.05):
        reducer = build_reducer(f"{name}:{keep}")
        images = encode_with_cues(baseline, inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"],
                                  reducer.cues)
        assert images[0].layout != images[1].layout
        for image in images:
            out = reducer.reduce_image(image)
            layout = image.layout
            assert out.features.shape == (reducer.kept_count(layout), image.features.shape[1])
            if name == "pooling":
                side = max(1, math.floor(layout.grid * math.sqrt(keep) + 0.5))
                h, w = (max(1, math.floor(s * math.sqrt(keep) + 0.5)) for s in layout.packed)
                assert out.features.shape[0] == side * side + h * (w + 1)
                continue
            counts = unit_counts(layout, out.kept)
            assert torch.equal(out.kept, out.kept.unique())  # sorted, no duplicates
            assert (layout.token_kinds()[out.kept] == NEWLINE).sum() == layout.num_newlines  # newlines kept
            if name == "hired":
                assert sum(counts) == kept_tokens(sum(layout.unit_sizes()), keep)
                assert all(c <= s for c, s in zip(counts, layout.unit_sizes()))
            else:
                assert counts == [kept_tokens(s, keep) if s else 0 for s in layout.unit_sizes()]


@pytest.mark.parametrize("name", PRE_LLM)
def test_pre_llm_placeholders_follow_budgets(baseline, name):
    inputs = batch_inputs(baseline, sizes=SIZES)
    reducer = build_reducer(f"{name}:0.3")
    reduction = apply_pre_llm(baseline, reducer, inputs["input_ids"], inputs["attention_mask"], None, None,
                              inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"])
    for b, features in enumerate(reduction.image_features):
        n_placeholders = int((reduction.input_ids[b] == IMAGE_TOKEN_ID).sum())
        assert n_placeholders == features.shape[0] < int((inputs["input_ids"][b] == IMAGE_TOKEN_ID).sum())
        # every text token survives, in order, at its original index
        text = (inputs["input_ids"][b] != IMAGE_TOKEN_ID) & inputs["attention_mask"][b].bool()
        kept_text = (reduction.input_ids[b] != IMAGE_TOKEN_ID) & reduction.attention_mask[b].bool()
        assert torch.equal(reduction.input_ids[b][kept_text], inputs["input_ids"][b][text])
        assert torch.equal(reduction.source_index[b][kept_text], text.nonzero()[:, 0])
    with torch.no_grad():
        out = baseline(**inputs, reducer=reducer)
    assert torch.equal(out.text_index, baseline(**inputs).text_index)


def test_drop_placeholders_positions_and_labels():
    ids = torch.tensor([[0, 0, 5, 3, 3, 3, 3, 6, 3, 3, 7], [5, 3, 3, 6, 7, 8, 9, 10, 11, 12, 13]])
    mask = (torch.arange(11)[None] >= torch.tensor([[2], [0]])).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = torch.where(ids == 3, -100, ids)
    out_ids, out_mask, out_pos, out_labels, source = drop_placeholders(ids, mask, pos, labels, [[4, 2], [2]], [[1, 1], [2]], 3)
    assert out_ids[0][out_mask[0].bool()].tolist() == [5, 3, 6, 3, 7]
    assert out_pos[0][out_mask[0].bool()].tolist() == [0, 1, 2, 3, 4]  # the shortened prompt's positions
    assert out_ids[1].tolist() == ids[1].tolist() and out_pos[1].tolist() == pos[1].tolist()
    assert out_labels[0][out_mask[0].bool()].tolist() == [5, -100, 6, -100, 7]
    assert source[0][out_mask[0].bool()].tolist() == [2, 3, 7, 8, 10]


def test_multi_image_and_text_only_samples(baseline):
    processor = make_processor(baseline)
    prompts = [processor.chat_prompt("compare them", num_images=2), processor.chat_prompt("hello", num_images=0)]
    inputs = processor(prompts, [[random_image(50, 70, 1), random_image(30, 30, 2)], []])
    for name in [*PRE_LLM, *IN_LLM]:
        cached = baseline.generate(**inputs, reducer=f"{name}:0.4", max_new_tokens=3)
        uncached = baseline.generate(**inputs, reducer=f"{name}:0.4", max_new_tokens=3, use_cache=False)
        assert torch.equal(cached, uncached), name
        assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    reduction = apply_pre_llm(baseline, build_reducer("visionzip:0.4"), inputs["input_ids"], inputs["attention_mask"],
                              None, None, inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"])
    g2 = 16  # untiled images: base view budget + their one newline each
    assert [f.shape[0] for f in reduction.image_features] == [kept_tokens(g2, 0.4) + 1] * 2


# ---------------------------------------------------------------------- identity
@pytest.mark.parametrize("name", [*PRE_LLM, *IN_LLM])
@pytest.mark.parametrize("plan", ["visor", "baseline"])
def test_keep_everything_is_the_identity(visor_model, baseline, name, plan):
    model = visor_model if plan == "visor" else baseline
    inputs = batch_inputs(model, sizes=SIZES)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    with torch.no_grad():
        ref = model(**inputs, labels=labels, active_sa=[[0], [0, 1]] if plan == "visor" else None)
        for spec in (f"{name}:1", f"{name}:1x", f"{name}:100%"):
            out = model(**inputs, labels=labels, reducer=spec, active_sa=[[0], [0, 1]] if plan == "visor" else None)
            assert torch.equal(out.logits, ref.logits) and torch.equal(out.text_index, ref.text_index)
            assert torch.equal(out.loss, ref.loss)


# ---------------------------------------------------------------------- selection on known scores
def _image(scores, keys=None, feats=None, size=(32, 32), tiled=False, config=None):
    layout = ImageLayout.from_image(size, grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]], base_size=32,
                                    patch_size=8, tiled=tiled)
    n = layout.num_tokens
    feats = torch.randn(n, 6, generator=torch.Generator().manual_seed(0)) if feats is None else feats
    return ImageTokens(features=feats, layout=layout, attention={"feature": torch.as_tensor(scores, dtype=torch.float)},
                       keys=keys, vision_features=keys)


def test_visionzip_dominant_and_contextual_tokens():
    # one 4x4 base view + newline; budget 0.5 -> 8 tokens: round(8 * 54/64) = 7 dominant, 1 contextual
    scores = torch.zeros(17)
    dominant = [15, 2, 9, 4, 11, 0, 6]
    for rank, i in enumerate(dominant):
        scores[i] = 10.0 - rank
    keys = torch.zeros(17, 3)
    keys[:, 0] = 1.0
    image = _image(scores, keys=keys)
    out = VisionZip(0.5).reduce_image(image)
    rest = [i for i in range(16) if i not in dominant]  # [1, 3, 5, 7, 8, 10, 12, 13, 14]
    target = rest[0]  # stride len(rest) // 1, first one
    assert out.kept.tolist() == sorted(dominant + [target, 16])
    merged = image.features[[i for i in rest if i != target]].mean(0) + image.features[target]
    row = out.kept.tolist().index(target)
    assert torch.allclose(out.features[row], merged, atol=1e-6)
    for i in dominant:
        assert torch.equal(out.features[out.kept.tolist().index(i)], image.features[i])

    # two contextual targets: each remaining token joins the target whose key it matches
    v = VisionZip(0.75, dominant_ratio=10 / 12)  # budget 12 -> 10 dominant, 2 contextual
    scores = torch.arange(17, dtype=torch.float)  # tokens 6..15 dominant; rest = 0..5
    keys = torch.zeros(17, 2)
    keys[[0, 2, 4], 0] = 1.0  # 0, 2, 4 look alike
    keys[[1, 3, 5], 1] = 1.0  # 1, 3, 5 look alike
    image = _image(scores, keys=keys)
    out = v.reduce_image(image)
    assert out.kept.tolist() == [0, 3] + list(range(6, 17))  # targets at stride 6 // 2 = 3: tokens 0 and 3
    f = image.features
    assert torch.allclose(out.features[0], f[0] + f[[2, 4]].mean(0), atol=1e-6)
    assert torch.allclose(out.features[1], f[3] + f[[1, 5]].mean(0), atol=1e-6)


def test_vispruner_important_then_diverse_tokens():
    # budget 0.5 of 16 -> 8: 4 important by attention, 4 diverse out of the other 12
    scores = torch.zeros(17)
    scores[[3, 7, 11, 15]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    scores[:16] += torch.linspace(0.5, 0.0, 16) * (scores[:16] == 0)  # the rest ranked 0, 1, 2, ... in order
    residual = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]
    # features: residual tokens come in near-duplicate pairs (0,1) (2,4) (5,6) (8,9) (10,12) (13,14)
    feats = torch.zeros(17, 8)
    for pair, (a, b) in enumerate([(0, 1), (2, 4), (5, 6), (8, 9), (10, 12), (13, 14)]):
        feats[a, pair] = feats[b, pair] = 1.0
        feats[b, 6 + pair % 2] = 0.01
    image = _image(scores, keys=feats)
    out = VisPruner(0.5).reduce_image(image)
    kept = set(out.kept.tolist())
    assert {3, 7, 11, 15, 16} <= kept
    diverse = sorted(kept - {3, 7, 11, 15, 16})
    assert len(diverse) == 4
    # the diverse tokens are one of each duplicate pair, never both
    pairs = [(0, 1), (2, 4), (5, 6), (8, 9), (10, 12), (13, 14)]
    assert all(not (a in diverse and b in diverse) for a, b in pairs)
    assert diverse == sorted(VisPruner.diverse(torch.tensor(residual), torch.nn.functional.normalize(feats, dim=-1), 4).tolist())


def test_hired_splits_budget_by_content_and_picks_top_tokens():
    layout = ImageLayout.from_image((64, 64), grid_pinpoints=[[64, 64]], base_size=32, patch_size=8)
    assert layout.tile_grid == (2, 2) and layout.unit_sizes() == [16, 16, 16, 16, 16]
    n = layout.num_tokens
    early = torch.zeros(n)
    region = layout.base_region_of_tile()
    early[:16][region == 3] = 5.0  # the early layer looks at tile 3's part of the image
    early[:16][region == 1] = 1.0
    final = torch.rand(n, generator=torch.Generator().manual_seed(1))
    image = ImageTokens(torch.randn(n, 4), layout, attention={0: early, "feature": final})
    reducer = HiRED(0.25, alpha=0.5)  # B = 20 grid tokens: 10 to the base view, 10 to the tiles
    budgets = reducer.unit_budgets(image)
    # top (1 - alpha) * 16 = 8 base cells by early attention: tile 3's 4 cells, tile 1's 4 cells
    assert budgets == [10, 0, 5, 0, 5]
    out = reducer.reduce_image(image)
    units = layout.token_units()
    for u, b in enumerate(budgets):
        idx = (units == u).nonzero()[:, 0]
        expected = idx[final[idx].argsort(descending=True)[:b]]
        assert sorted(out.kept[units[out.kept] == u].tolist()) == sorted(expected.tolist())
    assert apportion(10, [3, 1, 0], [4, 16, 16]) == [4, 6, 0]  # capped tile's surplus goes on
    assert apportion(5, [0, 0], [2, 3]) == [2, 3]


def test_pooling_is_bilinear_pooling_of_each_grid():
    layout = ImageLayout.from_image((64, 64), grid_pinpoints=[[64, 64]], base_size=32, patch_size=8)
    feats = torch.randn(layout.num_tokens, 3)
    out = Pooling(0.25).reduce_image(ImageTokens(feats, layout))
    base = feats[:16].view(4, 4, 3)
    assert torch.allclose(out.features[:4].view(2, 2, 3), base.view(2, 2, 2, 2, 3).mean(dim=(1, 3)), atol=1e-6)
    cells = feats[16:].view(8, 9, 3)
    pooled = out.features[4:].view(4, 5, 3)
    assert torch.allclose(pooled[:, :4], cells[:, :8].reshape(4, 2, 4, 2, 3).mean(dim=(1, 3)), atol=1e-6)
    assert torch.equal(pooled[:, 4], cells[0, 8].expand(4, 3))  # the newline token closes every pooled row
    avg = Pooling(0.25, mode="average").reduce_image(ImageTokens(feats, layout))
    assert torch.allclose(avg.features, out.features, atol=1e-6)


def test_vision_attention_score_matches_eager_siglip(hf, baseline):
    inputs = batch_inputs(baseline, sizes=SIZES[:1], questions=("what?",))
    crops = inputs["pixel_values"][0]
    with torch.no_grad():
        eager = hf.model.vision_tower(crops, output_attentions=True).attentions[-1]  # tiny_llava is eager
    expected = eager.mean(dim=(1, 2))
    images = encode_with_cues(baseline, inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"],
                              VisionZip.cues)
    assert torch.allclose(images[0].attention["feature"][:16], expected[0], atol=1e-5)  # base view
    layer = baseline.vision_tower.encoder.layers[-1].self_attn
    q, k = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    manual = torch.softmax(q.view(2, 5, 2, 12).transpose(1, 2) @ k.view(2, 5, 2, 12).permute(0, 2, 3, 1) / 12 ** 0.5, -1)
    assert torch.allclose(attention_received(q, k, layer.num_heads), manual.mean(dim=(1, 2)), atol=1e-6)


def test_fastv_ranks_by_the_last_tokens_eager_attention(hf, baseline):
    inputs = batch_inputs(baseline, sizes=SIZES)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        eager = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=positions,
                   pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], output_attentions=True).attentions
    reducer = FastV(0.25, layer=3)
    seen = {}
    import visor.compression.in_llm as in_llm

    original = in_llm.last_token_attention

    def spy(layer, rope, streams):
        seen["scores"] = original(layer, rope, streams)
        seen["streams"] = (streams.visual_src.clone(), streams.visual_valid.clone())
        return seen["scores"]

    in_llm.last_token_attention = spy
    try:
        with torch.no_grad():
            out = baseline(**inputs, reducer=reducer)
    finally:
        in_llm.last_token_attention = original
    visual_src, visual_valid = seen["streams"]
    reference = eager[2].mean(dim=1)[:, -1]  # layer K-1 = 2, last token, mean over heads
    for b in range(2):
        slots = visual_valid[b]
        assert torch.allclose(seen["scores"][b][slots], reference[b][visual_src[b][slots]], atol=1e-5)
        n = int(slots.sum())
        top = reference[b][visual_src[b][slots]].argsort(descending=True)[: kept_tokens(n, 0.25)]
        assert out.selection.kept[b][0].tolist() == sorted(top.tolist())


def test_choose_per_image_keeps_each_images_best():
    class S:  # two samples; sample 0 holds two images
        visual_valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
        image_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, -1, -1]])

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.8], [0.4, 0.1, 0.6, 0.6, 9.0, 9.0]])
    mask = choose_per_image(scores, S, 0.5)
    assert mask[0].nonzero()[:, 0].tolist() == [1, 2, 3, 5]  # 2 of 3 per image (round half up): [1, 2] and [5, 3]
    assert mask[1].nonzero()[:, 0].tolist() == [2, 3]  # ties: the earlier token; padding never chosen


@pytest.mark.parametrize("plan", ["visor", "baseline"])
def test_in_llm_stages_shrink_the_visual_stream(visor_model, baseline, plan):
    model = visor_model if plan == "visor" else baseline
    inputs = batch_inputs(model, sizes=SIZES)
    n_visual = [int(n) for n in (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1)]
    reducer = PyramidDrop(0.5)  # 6 layers: stages at 1, 3, 4
    assert [d.prune_layer for d in reducer.drops(6)] == [1, 3, 4]
    seen = {}
    hooks = []
    for index, layer in enumerate(model.language_model.layers):
        def record(module, args, output, index=index):
            seen[index] = args[0].shape[1]

        hooks.append(layer.register_forward_hook(record))
    try:
        with torch.no_grad():
            out = model(**inputs, reducer=reducer, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    expected = [n_visual]
    for _ in range(3):
        expected.append([kept_tokens(n, 0.5) for n in expected[-1]])
    assert [[int(k.numel()) for k in row] for row in zip(*out.selection.kept)] == expected[1:]
    kinds = model.plan.layer_kinds(None)
    cache = out.past_key_values
    for index, kind in enumerate(kinds):
        stage = sum(index >= s for s in (1, 3, 4))
        if kind is LayerKind.SELF_ATTENTION:  # the merged sequence loses the dropped tokens (re-left-padded)
            width = inputs["input_ids"].shape[1] - min(n - k for n, k in zip(n_visual, expected[stage]))
            assert seen[index] == width and cache.self_kv[index].key.shape[2] == width
        if kind is LayerKind.CROSS_ATTENTION:
            assert cache.cross_kv[index].key.shape[2] == max(expected[stage])
    # renumbered positions: contiguous after every drop
    assert [s.position_shift.tolist() for s in cache.segments][-1] == [n - k for n, k in zip(n_visual, expected[-1])]


# ---------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", [*PRE_LLM, *IN_LLM])
@pytest.mark.parametrize("plan", ["visor", "baseline"])
def test_cached_generation_equals_uncached(visor_model, baseline, name, plan):
    model = visor_model if plan == "visor" else baseline
    inputs = batch_inputs(model, sizes=SIZES)
    active = [[0, 1], []] if plan == "visor" else None
    cached = model.generate(**inputs, reducer=f"{name}:0.3", active_sa=active, max_new_tokens=5)
    uncached = model.generate(**inputs, reducer=f"{name}:0.3", active_sa=active, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    with torch.no_grad():  # the reducer does change what the model computes
        reduced, plain = model(**inputs, active_sa=active, reducer=f"{name}:0.3"), model(**inputs, active_sa=active)
    assert (valid_logits(reduced) - valid_logits(plain)).abs().max() > 1e-3


@pytest.mark.parametrize("name", IN_LLM)
def test_cached_decode_logits_equal_replayed_recompute(visor_model, name):
    inputs = batch_inputs(visor_model, sizes=SIZES)
    new = torch.tensor([[10, 11, 12], [13, 14, 15]])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        for active in ([], [0, 1]):
            prefill = visor_model(**inputs, active_sa=active, use_cache=True, reducer=f"{name}:0.3")
            step = visor_model(new, attention_mask=mask, past_key_values=prefill.past_key_values)
            full = visor_model(torch.cat([inputs["input_ids"], new], 1), attention_mask=mask, pixel_values=inputs["pixel_values"],
                               image_sizes=inputs["image_sizes"], active_sa=active, reducer=f"{name}:0.3",
                               selection=prefill.selection)
            assert (step.logits - full.logits[:, -3:]).abs().max() <= 1e-4


# ---------------------------------------------------------------------- bad budgets
@pytest.mark.parametrize("spec", ["visionzip:0", "visionzip:-0.5", "visionzip:1.5", "fastv:0.5x", "pooling:-2x",
                                  "pdrop:abc", "nosuch:0.5", "visionzip:0%"])
def test_bad_specs_are_clear_errors(spec):
    with pytest.raises(ValueError, match="fraction|factor|parse|unknown reducer"):
        build_reducer(spec)


def test_bad_budgets_and_documented_clamps(baseline):
    for cls in REDUCERS.values():
        for bad in (0, -1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=r"\(0, 1\]"):
                cls(bad)
        assert cls(None).keep == cls.default_keep
    with pytest.raises(TypeError):
        VisionZip("0.5")
    with pytest.raises(ValueError, match="K >= 1"):
        FastV(0.5, layer=0)
    inputs = batch_inputs(baseline, sizes=SIZES)
    with pytest.raises(ValueError, match="below the model's 6 layers"):
        baseline(**inputs, reducer=FastV(0.5, layer=6))
    with pytest.raises(ValueError, match="increasing"):
        baseline(**inputs, reducer=PyramidDrop(0.5, layers=[3, 2]))
    # a tiny fraction never empties a unit: at least one token each (documented clamp)
    for name in PRE_LLM:
        reducer = build_reducer(f"{name}:0.0001")
        reduction = apply_pre_llm(baseline, reducer, inputs["input_ids"], inputs["attention_mask"], None, None,
                                  inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"])
        for image in reduction.reduced:
            assert image.features.shape[0] >= 1
    out = baseline(**inputs, reducer="fastv:0.0001")
    assert out.selection.kept_per_sample() == [1, 1]
    # VisionZip needs the tower's attention: precomputed features alone are a clear error
    features = baseline.encode_images(inputs["pixel_values"], inputs["image_sizes"])
    with pytest.raises(ValueError, match="pixel_values"):
        baseline(inputs["input_ids"], inputs["attention_mask"], image_features=features, image_sizes=inputs["image_sizes"],
                 reducer="visionzip:0.5")
    baseline(inputs["input_ids"], inputs["attention_mask"], image_features=features, image_sizes=inputs["image_sizes"],
             reducer="pooling:0.5")  # pooling needs no cue


def test_registry_names_and_defaults():
    assert list(REDUCERS) == ["pooling", "visionzip", "vispruner", "hired", "fastv", "pdrop"]
    assert build_reducer("pyramiddrop").name == "pdrop"
    assert build_reducer("pooling").keep == 0.5 and build_reducer("pooling:4x").keep == 0.25
    assert build_reducer("fastv:2x").drops(24)[0].prune_layer == 2
    assert [d.prune_layer for d in build_reducer("pdrop").drops(24)] == [6, 12, 18]
    assert build_reducer("fastv", layer=3).drops(24)[0].score_layer == 2
    for cls in REDUCERS.values():
        assert cls.paper and "arXiv" in cls.paper and "LLaVA-OV" in cls.__doc__


# ---------------------------------------------------------------------- cost model, CLI, timing
@pytest.mark.parametrize("name", list(REDUCERS))
def test_cost_counts_every_reducer(monkeypatch, capsys, name):
    import json

    from tests.test_cost import run_cli
    from visor.cost import count_baseline_prefill, count_prefill, get_geometry, reducer_schedule

    geometry = get_geometry("llava-ov-0.5b")
    plan = LayerPlan.default(24)
    code, out = run_cli(monkeypatch, capsys, ["--reduce", name, "--sa-count", "2", "--crops", "10"])
    assert code == 0, out.err
    report = json.loads(out.out.strip().splitlines()[-1])
    schedule, overhead = reducer_schedule(geometry, name, 7290, 64, 10)
    reducer = build_reducer(name)
    if reducer.stage == "pre_llm":
        assert schedule == [kept_tokens(7290, reducer.keep)] * 24
    expected = count_prefill(geometry, plan, (0, 1), 7290, 64, visual_tokens_per_layer=schedule,
                             compression_overhead_flops=overhead, n_crops=10)
    assert report["flops"] == expected.llm_total and report["breakdown"]["compression_overhead"] == overhead
    assert report["reduce"]["visual_tokens_per_layer"] == schedule
    base = count_baseline_prefill(geometry, 7290, 64).llm_total
    assert report["reducer_reduction"] > 1.5 and report["reduction"] > base / count_prefill(geometry, plan, (0, 1), 7290, 64).llm_total
    if name != "pooling":  # pooling's resampling is elementwise work (not counted); the others score tokens
        assert overhead > 0 and "token-selection overhead" in out.out
    assert "baseline + " + reducer.name in out.out


def test_in_llm_schedules():
    assert FastV(0.5).visual_tokens_per_layer(24, 7290) == [7290] * 2 + [3645] * 22
    assert PyramidDrop(0.5).visual_tokens_per_layer(24, 7290) == [7290] * 6 + [3645] * 6 + [1823] * 6 + [912] * 6


def test_generate_cli_reduce(tmp_path, capsys):
    import json

    from tests.tiny import save_tiny_llava
    from visor.cli.main import main

    save_tiny_llava(tmp_path / "llava", num_layers=6)
    random_image(50, 70).save(tmp_path / "img.png")
    for spec, per_layer in (("visionzip:0.5", None), ("fastv:2x", "drop")):
        assert main(["generate", "--model", str(tmp_path / "llava"), "--image", str(tmp_path / "img.png"),
                     "--prompt", "what is it?", "--reduce", spec, "--max-new-tokens", "2"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["reduce"]["name"] == spec.split(":")[0] and len(result["visual_tokens_per_layer"]) == 6
        tokens = result["visual_tokens_per_layer"]
        if per_layer == "drop":
            assert tokens[:2] == [result["visual_tokens"]] * 2 and tokens[2] == kept_tokens(result["visual_tokens"], 0.5)
        else:
            assert tokens[0] < result["visual_tokens"]
    with pytest.raises(SystemExit, match="fraction"):
        main(["generate", "--model", str(tmp_path / "llava"), "--image", str(tmp_path / "img.png"),
              "--prompt", "what is it?", "--reduce", "visionzip:0"])


def test_selection_timing_and_reduced_inputs(baseline):
    from visor.compression.timing import reduced_forward_inputs, time_selection

    inputs = batch_inputs(baseline, sizes=SIZES)
    for name in [*REDUCERS, "visionzip:0.3@original", "hired:0.3@original"]:  # positions pass through too
        row = time_selection(baseline, name, inputs, repeats=1, warmup=0)
        assert row["seconds"] >= 0 and row["stage"] in ("pre_llm", "in_llm") and row["reducer"].startswith(name)
        with torch.no_grad():
            direct = baseline(**inputs, reducer=name)
            split = baseline(**reduced_forward_inputs(baseline, name, inputs))
        assert torch.equal(valid_logits(direct), valid_logits(split))


@pytest.mark.parametrize("name", ["pooling", "visionzip", "fastv"])
def test_training_loss_under_a_reducer(baseline, name):
    """Labels follow the shortened prompt: the loss equals the one computed on the kept tokens directly."""
    from visor.compression.timing import reduced_forward_inputs

    inputs = batch_inputs(baseline, sizes=SIZES)
    labels = inputs["input_ids"].masked_fill((inputs["input_ids"] == IMAGE_TOKEN_ID) | (inputs["attention_mask"] == 0), -100)
    with torch.no_grad():
        out = baseline(**inputs, labels=labels, reducer=f"{name}:0.3")
        full = baseline(**inputs, labels=labels)
        kwargs = reduced_forward_inputs(baseline, f"{name}:0.3", inputs)
        ids = kwargs["input_ids"]
        direct = baseline(**kwargs, labels=ids.masked_fill((ids == IMAGE_TOKEN_ID) | (kwargs["attention_mask"] == 0), -100))
    assert out.num_loss_tokens == full.num_loss_tokens == direct.num_loss_tokens
    assert torch.allclose(out.loss, direct.loss) and not torch.allclose(out.loss, full.loss)


def test_bench_prefill_inputs(baseline):
    from visor.compression.timing import bench_prefill_inputs

    n = baseline.num_image_tokens((50, 70))
    ids = torch.tensor([[5] * 10 + [IMAGE_TOKEN_ID] * n + [6] * 20])
    for name in REDUCERS:
        row = bench_prefill_inputs(baseline, name, ids, (50, 70))
        with torch.no_grad():
            out = baseline(**row["forward"], use_cache=True, logits_to_keep=1)
        per_layer = row["visual_tokens_per_layer"]
        placeholders = int((row["forward"]["input_ids"] == IMAGE_TOKEN_ID).sum())
        assert placeholders == (per_layer[0] if build_reducer(name).stage == "pre_llm" else n)
        assert min(per_layer) < n and row["selection_s"] >= 0 and out.logits.shape == (1, 1, 64)
