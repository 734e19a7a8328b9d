"""``benchmarks/keyed_attention_probe.py``: the probe learns a keyed read-out when the states hold one, and collects
a real model's visual states with the right keys and answers."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import load_benchmark, tiny_benchmark_llava, tiny_image_processor


def _keyed_states(n: int, seed: int, shuffle_keys: bool = False):
    """Four object tokens among noise and padding: dims 0-3 one-hot kind, 4-9 one-hot colour; the answer is the
    colour of the object whose kind the key names. Padded tokens carry the answer of a wrong kind (the mask hides them)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, dim = 20, 16
    states = 0.3 * torch.randn(n, tokens + 2, dim, generator=gen)
    valid = torch.ones(n, tokens + 2, dtype=torch.bool)
    valid[:, tokens:] = False
    keys, answers = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for i in range(n):
        colours = torch.randperm(6, generator=gen)[:4]
        places = torch.randperm(tokens, generator=gen)[:4]
        for kind in range(4):
            states[i, places[kind], kind] += 3.0
            states[i, places[kind], 4 + colours[kind]] += 3.0
        keys[i] = torch.randint(0, 4, (1,), generator=gen)
        answers[i] = colours[keys[i]]
        decoy = (keys[i] + 1) % 4
        states[i, tokens:, keys[i]] += 6.0  # a strong match for the key, outside the valid tokens
        states[i, tokens:, 4 + colours[decoy]] += 6.0
    if shuffle_keys:
        keys = keys[torch.randperm(n, generator=gen)]
    return states, valid, keys, answers


def test_probe_reads_a_keyed_answer_and_not_without_the_key():
    script = load_benchmark("keyed_attention_probe")
    train, test = _keyed_states(600, 0), _keyed_states(200, 1)
    rows = script.train_probe(train, test, n_keys=4, n_answers=6, epochs=12, report_every=12)
    assert rows[-1]["test_accuracy"] >= 0.9
    blind = script.train_probe(_keyed_states(600, 0, shuffle_keys=True), test, n_keys=4, n_answers=6, epochs=12,
                               report_every=12)
    assert blind[-1]["test_accuracy"] <= 0.45  # the key carries the choice: without it, a guess among 4 colours


def test_collect_on_a_real_model(tmp_path):
    from visor.analysis.common import load
    from visor.data.batch import Batcher
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.data.synth.generate import generate_item

    script = load_benchmark("keyed_attention_probe")
    model, tok, config = tiny_benchmark_llava(3, seed=0)
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    tiny_image_processor(config).save_pretrained(str(tmp_path))
    visor, tokenizer, processor, _ = load(tmp_path)
    batcher = Batcher.for_model(visor, tokenizer, processor)
    states, valid, keys, answers = script.collect(visor, batcher, "doc", "val", 3, DEFAULT_CONFIG, [0, 2], seed=4)
    assert set(states) == {0, 2}
    assert states[0].shape[:2] == valid.shape and states[0].shape[-1] == config.text_config.hidden_size
    assert valid.any(1).all()
    assert not torch.equal(states[0], states[2])  # the states change between layers
    key_vocab, answer_vocab = script.vocabularies("doc")
    for index in range(3):
        item = generate_item("val", index, seed=4, families=["doc"])
        assert key_vocab[keys[index]] == item.scene["query"]["key"] and answer_vocab[answers[index]] == item.answer
    with pytest.raises(ValueError, match="not a keyed family"):
        script.vocabularies("code")
