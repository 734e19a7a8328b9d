"""Can one attention layer, keyed by the question's key, find the answer in a language model's visual states?

The keyed families (``presence`` and the training-only ``kind_color``: a shape kind; ``doc``: a row key; ``chart``:
a bar label) ask the model to pick a place in the image by what the question names. ``keyed_selection.py`` shows
the trained baselines read the candidates and pick among them at random. This asks whether the information is there
to pick with: it runs the model's own prefill on each item's prompt (``visor.analysis.common.walk_layers``), keeps
the visual states entering each chosen decoder layer, and trains a fresh probe on them, a single attention read-out
whose query is a learned embedding of the question's key:

    answer logits = Linear([sum_i softmax_i(k(x_i) . q(key)) v(x_i) ; q(key)])

over the layer-normed visual states ``x_i``. The probe's query is given the key directly, so it does in one hop
what the language model must do in two (move the key's word to the answer position, then attend with it). A probe
far above the model's own accuracy says the states hold what is needed and the model has not learned to use it.

    python benchmarks/keyed_attention_probe.py checkpoints-focus5/base --family kind_color --layers 0,4,8 \\
        --image-size 128 --n-train 2000 --n-test 400

Prints one row per layer and epoch checkpoint and, last, one JSON line. bf16 autocast for the prefill.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from visor.train.lookup import KEYED_FAMILIES


def vocabularies(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(keys, answers)`` of a keyed family: what the question can name and what the answer can be."""
    from visor.data.synth.config import BAR_LABELS, DOC_KEYS, SHAPES
    from visor.data.synth.families import COLOR_NAMES

    digits = tuple(str(d) for d in range(10))
    table = {"kind_color": (SHAPES, COLOR_NAMES), "presence": (SHAPES, ("no", "yes")),
             "doc": (DOC_KEYS, digits), "chart": (tuple(BAR_LABELS), digits)}
    if family not in table:
        raise ValueError(f"{family!r} is not a keyed family ({', '.join(KEYED_FAMILIES)})")
    return table[family]


def query_value(scene: dict) -> str:
    """The key a keyed question names (the query's one field besides its template)."""
    (value,) = [v for k, v in scene["query"].items() if k != "template"]
    return str(value)


class AttentionProbe(nn.Module):
    """One attention read-out over visual states, queried by a learned embedding of the question's key."""

    def __init__(self, hidden: int, n_keys: int, n_answers: int, width: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.query = nn.Embedding(n_keys, width)
        self.key = nn.Linear(hidden, width)
        self.value = nn.Linear(hidden, width)
        self.out = nn.Linear(2 * width, n_answers)
        self.scale = width ** -0.5

    def forward(self, states: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``states`` [B, N, D], ``keys`` [B] key indices, ``valid`` [B, N] (padding False) -> logits [B, answers]."""
        x = self.norm(states)
        q = self.query(keys)
        scores = torch.einsum("bnd,bd->bn", self.key(x), q) * self.scale
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        weights = scores.softmax(-1)
        read = torch.einsum("bn,bnd->bd", weights, self.value(x))
        return self.out(torch.cat([read, q], -1))


@torch.no_grad()
def collect(model, batcher, family: str, split: str, n: int, config, layers: list[int], seed: int = 0):
    """Visual states entering each layer in ``layers`` ([n, tokens, hidden] each, padded, with a validity mask), key
    and answer indices, for ``n`` items of ``family``."""
    from tqdm.auto import tqdm

    from visor.analysis.common import walk_layers
    from visor.data.batch import Sample
    from visor.data.synth.generate import generate_item

    keys_vocab, answers_vocab = vocabularies(family)
    states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    keys, answers = [], []
    for index in tqdm(range(n), desc=f"{split} states", leave=False):
        item = generate_item(split, index, seed=seed, config=config, families=[family])
        batch = batcher.prompt_batch([Sample([item.image], item.conversations()[:1])])

        def keep(layer, kind, streams):
            if layer in states:
                states[layer].append(streams.visual[0].float().clone())

        with torch.autocast("cpu", dtype=torch.bfloat16):
            walk_layers(model, batch, before=keep)
        keys.append(keys_vocab.index(query_value(item.scene)))
        answers.append(answers_vocab.index(item.answer))
    lengths = [len(s) for s in states[layers[0]]]
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    padded = {layer: nn.utils.rnn.pad_sequence(rows, batch_first=True) for layer, rows in states.items()}
    return padded, valid, torch.tensor(keys), torch.tensor(answers)


def train_probe(train, test, n_keys: int, n_answers: int, epochs: int = 40, lr: float = 3e-3, batch: int = 64,
                report_every: int = 10, seed: int = 0) -> list[dict]:
    """Fit an :class:`AttentionProbe` on ``train`` = (states, valid, keys, answers); test accuracy every
    ``report_every`` epochs."""
    states, valid, keys, answers = train
    torch.manual_seed(seed)
    probe = AttentionProbe(states.shape[-1], n_keys, n_answers)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    rows = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(keys))
        for start in range(0, len(keys), batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(probe(states[idx], keys[idx], valid[idx]), answers[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if epoch % report_every == 0 or epoch == epochs:
            with torch.no_grad():
                accuracy = (probe(test[0], test[2], test[1]).argmax(-1) == test[3]).float().mean().item()
            rows.append({"epoch": epoch, "train_loss": round(loss.item(), 4), "test_accuracy": round(accuracy, 4)})
    return rows


def main() -> None:
    from visor.analysis.common import add_probe_arguments, start_probe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_probe_arguments(parser, KEYED_FAMILIES, family="kind_color", layers="0,4,8", n_train=2000, n_test=400)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    model, batcher, config, layers = start_probe(parser, args)
    train = collect(model, batcher, args.family, "train", args.n_train, config, layers, args.seed)
    test = collect(model, batcher, args.family, "test", args.n_test, config, layers, args.seed)
    keys_vocab, answers_vocab = vocabularies(args.family)
    majority = test[3].bincount().max().item() / len(test[3])
    results = {}
    for layer in layers:
        rows = train_probe((train[0][layer], *train[1:]), (test[0][layer], *test[1:]), len(keys_vocab),
                           len(answers_vocab), epochs=args.epochs)
        results[layer] = rows
        for row in rows:
            print(f"layer {layer} input  epoch {row['epoch']:>3}  train loss {row['train_loss']:.3f}  "
                  f"test accuracy {100 * row['test_accuracy']:.1f}%")
    print(f"majority answer on test: {100 * majority:.1f}%")
    print(json.dumps({"checkpoint": args.checkpoint, "family": args.family, "n_train": args.n_train,
                      "n_test": args.n_test, "image_size": config.image_size, "majority": majority,
                      "layers": results}))


if __name__ == "__main__":
    main()
