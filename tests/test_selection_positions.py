"""``benchmarks/selection_positions.py``: a pre-LLM selector's kept tokens scored at their original positions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "checkpoints" / "base"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("selection_positions", ROOT / "benchmarks" / "selection_positions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_keeping_every_token_gives_the_full_prompt_positions_and_output(script, setup):
    from visor.compression.apply import PromptReduction
    from visor.compression.base import ReducedImage

    model, _, _, batch = setup
    features = model.encode_images(batch["pixel_values"], batch["image_sizes"], batch.get("batch_num_images"),
                                   batch.get("image_tiled"))
    width = batch["input_ids"].shape[1]
    everything = PromptReduction(
        batch["input_ids"], batch["attention_mask"], None, batch["labels"], features,
        torch.arange(width).expand(batch["input_ids"].shape[0], width).clone(),
        [ReducedImage(f, torch.arange(f.shape[0])) for f in features])
    pos = script.original_positions(batch, everything, model.config.image_token_id)
    assert torch.equal(pos, (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        full = model(**batch).logits
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                      labels=batch["labels"], image_features=features).logits
    torch.testing.assert_close(again, full)


def test_a_real_selection_keeps_text_positions_and_spreads_the_kept_tokens(script, setup):
    from visor.compression.apply import apply_pre_llm
    from visor.compression.registry import build_reducer

    model, _, _, batch = setup
    image_token = model.config.image_token_id
    reduction = apply_pre_llm(model, build_reducer("visionzip:0.25"), batch["input_ids"], batch["attention_mask"],
                              None, batch["labels"], batch["pixel_values"], batch["image_sizes"],
                              batch.get("batch_num_images"), image_tiled=batch.get("image_tiled"))
    pos = script.original_positions(batch, reduction, image_token)
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
