"""``benchmarks/selection_positions.py``: a pre-LLM selector's kept tokens scored at their original positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "checkpoints" / "base"


@pytest.fixture(scope="module")
def script():
    return load_benchmark("selection_positions")


@pytest.fixture(scope="module")
def setup():
    from visor.analysis.common import load
    from visor.cli.common import synth_config_for
    from visor.data.batch import Batcher, Sample
    from visor.eval.harness import synth_items

    model, tokenizer, image_processor, _ = load(BASE)
    items = synth_items("test", 4, seed=0, config=synth_config_for(str(BASE), None, "test"), families=["side", "presence"])
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    batch = batcher.train_batch([Sample(it.images, list(it.turns) + [{"from": "gpt", "value": it.answers[0]}])
                                 for it in items])
    return model, batcher, items, batch


def test_keeping_every_token_gives_the_full_prompt_positions_and_output(setup):
    from visor.compression.apply import original_positions

    model, _, _, batch = setup
    features = model.encode_images(batch["pixel_values"], batch["image_sizes"], batch.get("batch_num_images"),
                                   batch.get("image_tiled"))
    rows, width = batch["input_ids"].shape
    pos = original_positions(batch["input_ids"], batch["attention_mask"], None, batch["input_ids"],
                             torch.arange(width).expand(rows, width), [[f.shape[0]] for f in features],
                             [[torch.arange(f.shape[0])] for f in features], model.config.image_token_id)
    assert torch.equal(pos, (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        full = model(**batch).logits
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                      labels=batch["labels"], image_features=features).logits
    torch.testing.assert_close(again, full)


def test_a_real_selection_keeps_text_positions_and_spreads_the_kept_tokens(setup):
    from visor.compression.apply import apply_pre_llm
    from visor.compression.registry import build_reducer

    model, _, _, batch = setup
    image_token = model.config.image_token_id
    args = (batch["input_ids"], batch["attention_mask"], None, batch["labels"], batch["pixel_values"],
            batch["image_sizes"], batch.get("batch_num_images"))
    reduction = apply_pre_llm(model, build_reducer("visionzip:0.25@original"), *args, image_tiled=batch.get("image_tiled"))
    contiguous = apply_pre_llm(model, build_reducer("visionzip:0.25"), *args, image_tiled=batch.get("image_tiled"))
    assert contiguous.position_ids is None  # numbered afresh from the mask, as the methods' code does
    assert torch.equal(contiguous.input_ids, reduction.input_ids)
    pos = reduction.position_ids
    full_pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for b in range(batch["input_ids"].shape[0]):
        short_image = reduction.input_ids[b] == image_token
        real_text = (reduction.source_index[b] >= 0) & ~short_image
        # text tokens sit where they sat in the full prompt, after the image as well
        assert torch.equal(pos[b][real_text], full_pos[b][reduction.source_index[b][real_text]])
        kept = pos[b][short_image]
        full_image = full_pos[b][batch["input_ids"][b] == image_token]
        assert 0 < kept.numel() < full_image.numel()
        assert bool((kept[1:] > kept[:-1]).all())  # sequence order, no repeats
        assert set(kept.tolist()) <= set(full_image.tolist())
        assert kept.max() > full_image.min() + kept.numel() - 1  # gaps: not the contiguous numbering
        assert torch.equal(kept, full_image[reduction.reduced[b].kept])


def test_generation_with_original_positions_matches_its_forward_pass(setup):
    """Greedy generation (cached and uncached) continues from the full prompt's positions: its first token is
    the forward pass's argmax, and both decoding paths agree."""
    from visor.compression.registry import build_reducer
    from visor.data.batch import Sample

    model, batcher, items, _ = setup
    prompt = batcher.prompt_batch([Sample(it.images, list(it.turns)) for it in items])
    reducer = build_reducer("hired:0.25@original")
    with torch.no_grad():
        cached = model.generate(**prompt, reducer=reducer, max_new_tokens=4, use_cache=True)
        uncached = model.generate(**prompt, reducer=reducer, max_new_tokens=4, use_cache=False)
        logits = model(**prompt, reducer=reducer).logits
        renumbered = model(**prompt, reducer="hired:0.25").logits
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, prompt["input_ids"].shape[1]], logits[:, -1].argmax(-1))
    assert not torch.allclose(logits, renumbered)  # the positions reach the model


def test_position_mode_in_the_spec():
    from visor.compression.registry import build_reducer

    assert build_reducer("visionzip:0.25@original").spec == "visionzip:0.25@original"
    assert build_reducer("vispruner:0.25").spec == "vispruner:0.25"
    assert build_reducer("hired:0.2@original").describe()["positions"] == "original"
    assert build_reducer("hired:0.2@contiguous").positions == "contiguous"
    for bad, words in (("pooling:4x@original", "resamples"), ("fastv:0.5@original", "pre-LLM selectors only"),
                       ("visionzip:0.25@sideways", "unknown position mode")):
        with pytest.raises(ValueError, match=words):
            build_reducer(bad)


def test_score_reports_every_mode_and_the_choice_families(script, setup):
    model, batcher, items, _ = setup
    with torch.no_grad():
        scores = script.score(model, batcher, items, "visionzip:0.25", batch_size=2)
    for mode in ("full", "contiguous", "original"):
        probs = [p for fam in ("side", "presence") for p in scores["prob"][mode][fam]]
        assert len(probs) == len(items) and all(0 < p <= 1 for p in probs)
        assert all(v in (0.0, 1.0) for fam in ("side", "presence") for v in scores["choice"][mode][fam])
    with pytest.raises(SystemExit):
        script.score(model, batcher, items, "fastv:0.5", batch_size=2)
    with pytest.raises(SystemExit):
        script.score(model, batcher, items, "pooling:4x", batch_size=2)


def test_the_router_reads_a_selectors_original_positions():
    """Routed generation under ``@original``: the routing pass gets the same positions as the decoding."""
    from visor.analysis.common import load
    from visor.cli.common import synth_config_for
    from visor.compression.apply import apply_pre_llm
    from visor.compression.registry import build_reducer
    from visor.data.batch import Batcher, Sample
    from visor.eval.harness import synth_items
    from visor.routing.router import routing_logits

    folder = ROOT / "checkpoints" / "visor"
    model, tokenizer, image_processor, _ = load(folder)
    items = synth_items("test", 4, seed=0, config=synth_config_for(str(folder), None, "test"))
    prompt = Batcher.for_model(model, tokenizer, image_processor).prompt_batch(
        [Sample(it.images, list(it.turns)) for it in items])
    reduction = apply_pre_llm(model, build_reducer("visionzip:0.25@original"), prompt["input_ids"],
                              prompt["attention_mask"], None, None, prompt["pixel_values"], prompt["image_sizes"],
                              prompt.get("batch_num_images"), image_tiled=prompt.get("image_tiled"))
    per_sample = [[f] for f in reduction.image_features]
    with torch.no_grad():
        original = routing_logits(model, reduction.input_ids, reduction.attention_mask, per_sample,
                                  reduction.position_ids)
        renumbered = routing_logits(model, reduction.input_ids, reduction.attention_mask, per_sample)
        routed = model.route(reduction.input_ids, reduction.attention_mask, image_features=reduction.image_features,
                             position_ids=reduction.position_ids)
        seen = []
        route = model.route
        model.route = lambda *args, **kwargs: seen.append(kwargs.get("position_ids")) or route(*args, **kwargs)
        generated = model.generate(**prompt, reducer="visionzip:0.25@original", route=True, max_new_tokens=2)
    assert len(seen) == 1 and torch.equal(seen[0], reduction.position_ids)  # generate routes on the same positions
    assert not torch.allclose(original, renumbered)
    configs = [tuple(c) for c in model.config.router["configs"]]
    assert routed == [configs[int(i)] for i in original.argmax(-1)]
    assert generated.shape[0] == len(items)
