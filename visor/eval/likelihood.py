"""Teacher-forced answer likelihood: how probable the reference answer is under a configuration.

A smoother signal than exact match while a family is still near chance (the training log reads it), and
the ``loglik`` score of router pseudo-labels (``visor.routing.labels``). Per item it is ``exp(mean token
log-prob)`` over the answer's tokens and the end token (a probability, so ratios mean what they say); per
family the mean of ``-log`` of that, the answer loss per token. A uniform guess costs ``ln(outcomes) /
(tokens + 1)``: ~1.1 for one digit, ~1.8 for a 3-5 letter code (the benchmark tokenizer spells digits and
code letters one per token).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch


def labelled_probabilities(out, labels: torch.Tensor) -> list[float]:
    """Per row, ``exp(mean log-prob)`` of the tokens ``labels`` marks (the reference answer and end token), from a
    forward pass ``out`` on that batch (its ``text_index`` maps logits to input positions, a reducer's too)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    index = out.text_index.clamp(min=0)
    targets = torch.where(out.text_index >= 0, shifted.gather(1, index), torch.full_like(index, -100))
    logp = torch.log_softmax(out.logits.float(), -1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    valid = targets != -100
    return torch.exp((picked * valid).sum(1) / valid.sum(1).clamp(min=1)).tolist()


@torch.no_grad()
def answer_probabilities(model, batcher, items, config, batch_size: int = 8, progress: bool = False) -> list[float]:
    """``exp(mean log-prob)`` of each item's reference answer (teacher forcing) under ``config`` (SA slots,
    or a ``visor.model.resolution.Configuration``); ``progress`` shows a bar over the items."""
    from tqdm.auto import tqdm

    from visor.data.batch import Sample
    from visor.eval.harness import to_device
    from visor.model.resolution import Configuration

    resolution = {}
    if isinstance(config, Configuration):
        config, resolution = config.active_sa, ({} if config.tiled else {"resolution": config.resolution})
    device = next(model.parameters()).device  # the batcher builds on the CPU
    probs: list[float] = []
    bar = tqdm(total=len(items), desc="answer log-likelihood", unit="item", disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        samples = [Sample(item.images, list(item.turns) + [{"from": "gpt", "value": item.answers[0]}]) for item in chunk]
        batch = to_device(batcher.train_batch(samples, **resolution), device)
        probs.extend(labelled_probabilities(model(**batch, active_sa=config), batch["labels"]))
        bar.update(len(chunk))
    bar.close()
    return probs


def answer_nll_by_family(model, batcher, items: Sequence, config=None, batch_size: int = 8) -> dict:
    """Mean answer loss per token (``-log`` of :func:`answer_probabilities`), per family and over the easy
    and hard families present: ``{"answer_nll": {family: nll}, "easy_answer_nll": .., "hard_answer_nll": ..}``
    (the two means are of the family means, by each item's ``difficulty`` as the accuracy means are; absent when
    no such family is there).
    Items without a family count as ``"all"``; items the harness would skip (a ``problem`` such as a missing
    image) are left out. ``config=None``: every SA slot of the model's plan."""
    config = model.plan.all_slots if config is None else config
    items = [item for item in items if getattr(item, "problem", None) is None]
    probs = answer_probabilities(model, batcher, items, config, batch_size)
    per_family: dict[str, list[float]] = defaultdict(list)
    difficulty: dict[str, str] = {}
    for item, prob in zip(items, probs):
        family = getattr(item, "family", None) or "all"
        per_family[family].append(-math.log(max(prob, 1e-12)))
        difficulty.setdefault(family, getattr(item, "difficulty", "") or "")
    nll = {family: sum(v) / len(v) for family, v in sorted(per_family.items())}
    summary: dict = {"answer_nll": nll}
    for kind in ("easy", "hard"):
        present = [value for family, value in nll.items() if difficulty[family] == kind]
        if present:
            summary[f"{kind}_answer_nll"] = sum(present) / len(present)
    return summary
