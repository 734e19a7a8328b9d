"""``benchmarks/token_key_probe.py`` (is a place's name linear in its visual tokens, per stage) and
``benchmarks/oracle_key_lookup.py`` (the same continuation with a clear key added to the visual features) and
``benchmarks/induction_transfer.py`` (does a fresh language model form the copying circuit, and then recall)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import load_benchmark, tiny_benchmark_llava, tiny_image_processor


def _tagged_tokens(n_items: int, seed: int, signal: float, shuffle: bool = False):
    """Items of 2-3 places (tags 1-4), 6 tokens each, in 16 noisy dims; dims 0-3 carry the tag with ``signal``."""
    gen = torch.Generator().manual_seed(seed)
    xs, tags, owners = [], [], []
    for item in range(n_items):
        places = torch.randperm(4, generator=gen)[: 2 + item % 2] + 1
        for tag in places.tolist():
            x = torch.randn(6, 16, generator=gen)
            x[:, tag - 1] += signal
            xs.append(x)
            tags.append(torch.full((6,), tag))
            owners.append(torch.full((6,), item))
    tags = torch.cat(tags)
    if shuffle:  # each token's tag unrelated to its features
        tags = tags[torch.randperm(len(tags), generator=gen)]
    return torch.cat(xs), tags, torch.cat(owners)


def test_probe_finds_a_linear_key_and_reports_chance_without_one():
    script = load_benchmark("token_key_probe")
    x, y, _ = _tagged_tokens(200, 0, signal=3.0)
    tx, ty, towners = _tagged_tokens(60, 1, signal=3.0)
    probe = script.fit_probe(x, y, classes=5)
    with torch.no_grad():
        clear = script.score(probe(tx).log_softmax(-1), ty, towners)
    assert clear["token"] >= 0.85 and clear["place"] >= 0.98
    # averaged over places: 30 items of 2 places (1/2 each) and 30 of 3 (1/3 each)
    assert clear["place_chance"] == pytest.approx((60 * 1 / 2 + 90 * 1 / 3) / 150)
    noise_x, _, _ = _tagged_tokens(200, 0, signal=0.0)
    noise_tx, _, _ = _tagged_tokens(60, 1, signal=0.0)
    blind = script.fit_probe(noise_x, y, classes=5)
    with torch.no_grad():
        guess = script.score(blind(noise_tx).log_softmax(-1), ty, towners)
    assert guess["place"] <= clear["place_chance"] + 0.15


def _tiny_checkpoint(tmp_path):
    from visor.analysis.common import load
    from visor.data.batch import Batcher

    model, tok, config = tiny_benchmark_llava(3, seed=0, image_size=64)  # a 128 px canvas is its 2x2 grid
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    tiny_image_processor(config).save_pretrained(str(tmp_path))
    visor, tokenizer, processor, _ = load(tmp_path)
    return visor, Batcher.for_model(visor, tokenizer, processor), config


def test_collect_keeps_the_places_tokens_at_every_stage(tmp_path):
    from visor.data.synth.config import DEFAULT_CONFIG

    script = load_benchmark("token_key_probe")
    model, batcher, config = _tiny_checkpoint(tmp_path)
    projector, newline = model.multi_modal_projector, model.image_newline
    stages, tags, owners = script.collect(model, batcher, "kind_color", "val", 3, DEFAULT_CONFIG.with_image_size(128), [0, 2],
                                           seed=4)
    assert model.multi_modal_projector is projector and model.image_newline is newline  # put back
    assert set(stages) == {"tower", "layer 0", "layer 2"}
    assert stages["tower"].shape == (len(tags), config.vision_config.hidden_size)
    assert stages["layer 0"].shape == (len(tags), config.text_config.hidden_size)
    assert (tags > 0).all() and set(owners.tolist()) == {0, 1, 2}
    assert not torch.equal(stages["layer 0"], stages["layer 2"])
    # the tower stage is the projector's input: projecting it gives layer 0's visual states
    with torch.no_grad():
        projected = projector(stages["tower"].to(next(projector.parameters()).dtype)).float()
    torch.testing.assert_close(projected, stages["layer 0"], atol=2e-2, rtol=2e-2)


def test_oracle_keys_mark_only_the_places_tokens(tmp_path):
    from visor.data.batch import Sample
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.data.synth.generate import generate_item
    from visor.train.lookup import crop_geometry
    from visor.train.marking import image_token_tags

    script = load_benchmark("oracle_key_lookup")
    model, batcher, _ = _tiny_checkpoint(tmp_path)
    geometry = crop_geometry(model.config)
    item = generate_item("val", 0, seed=4, config=DEFAULT_CONFIG.with_image_size(128), families=["kind_color"])
    batch = batcher.train_batch([Sample([item.image], item.conversations())])
    args = (batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"])
    plain = model.encode_images(*args)[0]
    oracle = script.OracleKeys(model, scale=0.5)
    oracle.tags = [image_token_tags(item.scene, geometry)]
    keyed = model.encode_images(*args)[0]
    moved = (keyed - plain).norm(dim=-1)
    tags = oracle.tags[0]
    assert (moved[tags <= 0] == 0).all() and (moved[tags > 0] > 0).all()
    torch.testing.assert_close(moved[tags > 0], torch.full_like(moved[tags > 0], 0.5 * oracle.feature_norm),
                               rtol=1e-4, atol=1e-4)
    # tokens of one place share one direction; places of different tags get different ones
    delta = keyed - plain
    first, second = sorted(t for t in tags.unique().tolist() if t > 0)[:2]
    assert torch.allclose(delta[tags == first][0], delta[tags == first][-1])
    assert not torch.allclose(delta[tags == first][0], delta[tags == second][0])
    oracle.tags = []
    with pytest.raises(RuntimeError, match="tags were set"):
        model.encode_images(*args)
    accuracy, uniform = script.first_token_accuracy(model, batcher, oracle, [item], geometry, "fp32")
    assert accuracy in (0.0, 1.0) and uniform == pytest.approx(1 / len(item.scene["shapes"]))


def test_text_input_states_the_scene_in_words(tmp_path):
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.data.synth.generate import generate_item

    script = load_benchmark("oracle_key_lookup")
    item = generate_item("val", 1, seed=4, config=DEFAULT_CONFIG.with_image_size(128), families=["kind_color"])
    words = script.scene_in_words(item.scene)
    assert words == ", ".join(f"{s['color']} {s['kind']}" for s in item.scene["shapes"]) + "."
    named = item.scene["query"]["kind"]
    assert f"{item.answer} {named}" in words  # the answer is the colour stated beside the named kind
    sample = script.make_sample(item, text=True)
    assert sample.images == [] and sample.turns[0]["value"] == f"{words} {item.question}"
    assert sample.turns[1]["value"] == item.answer
    assert script.make_sample(item, text=False).images == [item.image]
    doc = generate_item("val", 0, seed=4, config=DEFAULT_CONFIG.with_image_size(128), families=["doc"])
    with pytest.raises(ValueError, match="kind_color scenes only"):
        script.scene_in_words(doc.scene)
    model, batcher, _ = _tiny_checkpoint(tmp_path)
    oracle = script.OracleKeys(model, scale=1.0)
    accuracy, uniform = script.first_token_accuracy(model, batcher, oracle, [item], None, "fp32", text=True)
    assert accuracy in (0.0, 1.0) and uniform == pytest.approx(1 / len(item.scene["shapes"]))


def test_fresh_language_model_keeps_the_tower(tmp_path):
    from visor.train.models import fresh_language_model

    model, _, _ = _tiny_checkpoint(tmp_path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fresh_language_model(model)
    after = dict(model.named_parameters())
    for name, old in before.items():
        if name.startswith("vision_tower"):
            assert torch.equal(after[name], old), name
        elif name.endswith("norm.weight"):
            assert (after[name] == 1).all(), name
        elif name.endswith(".weight") and old.dim() == 2:
            assert not torch.equal(after[name], old) and after[name].std() < 0.03, name


def test_probe_command_line_checks_the_layers(tmp_path):
    import argparse

    from visor.analysis.common import add_probe_arguments, decoder_layers, start_probe
    from visor.train.lookup import KEYED_FAMILIES

    model, _, _ = _tiny_checkpoint(tmp_path)
    assert decoder_layers("0,2", model) == [0, 2]
    with pytest.raises(ValueError, match=r"layers \[3\] outside 0..2"):
        decoder_layers("1,3", model)
    parser = argparse.ArgumentParser()
    add_probe_arguments(parser, KEYED_FAMILIES, family="doc", layers="0,1", n_train=5, n_test=2)
    args = parser.parse_args([str(tmp_path), "--image-size", "128", "--threads", "1"])
    assert args.family == "doc" and (args.n_train, args.n_test) == (5, 2)
    model, batcher, config, layers = start_probe(parser, args)
    assert layers == [0, 1] and config.image_size == 128 and batcher.tokenizer is not None
    with pytest.raises(SystemExit):  # a usage error, not a traceback
        start_probe(parser, parser.parse_args([str(tmp_path), "--layers", "0,9"]))


def test_induction_and_recall_sequences_label_what_the_context_determines():
    script = load_benchmark("induction_transfer")
    import random

    rng, pool = random.Random(0), list(range(10, 60))
    for _ in range(20):
        ids, labels = script.induction_sequence(rng, pool, separator=5)
        n = ids.index(5)
        assert ids[:n] == ids[n + 1:] and len(labels) == len(ids)
        # every labelled token is the one that followed the same token in the first copy
        assert [label for label in labels if label != -100] == ids[1:n]
        ids, labels = script.mqar_sequence(rng, pool, separator=5)
        n = ids.index(5)
        pairs = dict(zip(ids[0:n:2], ids[1:n:2]))
        queries = [(ids[i - 1], label) for i, label in enumerate(labels) if label != -100]
        assert sorted(k for k, _ in queries) == sorted(pairs) and all(pairs[k] == v for k, v in queries)
        assert all(ids[i] == label for i, label in enumerate(labels) if label != -100)


def test_induction_transfer_runs_and_writes_rows(tmp_path, monkeypatch, capsys):
    import json
    import sys

    script = load_benchmark("induction_transfer")
    _tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "ckpt"), "--task", "mqar", "--steps", "4", "--batch", "4",
                                      "--eval-every", "2", "--n-eval", "8", "--warmup", "2",
                                      "--out", str(tmp_path / "out"), "--save"])
    script.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and result["rows"] == rows
    assert all(0 <= r["induction_accuracy"] <= 1 and 0 <= r["mqar_accuracy"] <= 1 for r in rows)
    assert result["pool"] > 50  # the benchmark tokenizer's word and character pieces
    from transformers import LlavaOnevisionForConditionalGeneration

    assert LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "out" / "final").config.text_config


def test_induction_transfer_keep_weights_continues_the_export(tmp_path, monkeypatch, capsys):
    """``--keep-weights`` starts from the checkpoint's own language model (a curriculum); without it the weights
    are drawn afresh. With a learning rate of 0 the continued export is the first one, bit for bit."""
    import sys

    from safetensors.torch import load_file

    script = load_benchmark("induction_transfer")
    _tiny_checkpoint(tmp_path / "ckpt")
    common = ["--steps", "2", "--batch", "2", "--eval-every", "2", "--n-eval", "4", "--warmup", "1", "--save"]
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "ckpt"), "--task", "induction", *common,
                                      "--out", str(tmp_path / "first")])
    script.main()
    for flag, name in ((["--keep-weights"], "kept"), ([], "fresh")):
        monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "first" / "final"), "--task", "mqar", *common, *flag,
                                          "--lr", "0", "--out", str(tmp_path / name)])
        script.main()
    capsys.readouterr()
    first, kept, fresh = (load_file(tmp_path / name / "final" / "model.safetensors")
                          for name in ("first", "kept", "fresh"))
    language = [k for k in first if "language_model" in k]
    assert language and all(torch.equal(first[k], kept[k]) for k in language)
    assert not all(torch.equal(first[k], fresh[k]) for k in language)
