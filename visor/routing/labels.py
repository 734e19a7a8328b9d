"""Pseudo-labels for the router (``visor route label``).

Every viable configuration of a universal VISOR checkpoint is run on a training subset and each sample
is scored under each configuration:

* ``grader`` (default where the item has one): the task's grader on the greedy answer (0/1 for exact
  match, ANLS or relaxed accuracy otherwise);
* ``loglik``: the answer's probability under teacher forcing, ``exp(mean token log-prob)`` (a
  probability, so the 99% ratio means what it says; a ratio of negative log-probs would invert).

A sample's label is the cheapest configuration whose score is at least ``threshold`` times the maximal
configuration's (the paper's ">= 99% of the full model"). Consequences of the rule, tested: ties go to
the cheaper configuration; when every configuration passes (including when the maximal one scores 0),
the cheapest one is the label.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from visor.model.plan import format_slots

EPSILON = 1e-9


def choose_label(scores: dict[tuple[int, ...], float], costs: dict[tuple[int, ...], float], threshold: float = 0.99) -> tuple[int, ...]:
    """The cheapest configuration scoring >= ``threshold`` x the maximal (most expensive) one's score."""
    if not scores:
        raise ValueError("no configuration scores to label from")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    by_cost = sorted(scores, key=lambda c: (costs[c], len(c), c))
    target = threshold * scores[by_cost[-1]]
    for config in by_cost:
        if scores[config] >= target - EPSILON:
            return config
    return by_cost[-1]


@torch.no_grad()
def answer_probabilities(model, batcher, items, config, batch_size: int = 8) -> list[float]:
    """``exp(mean log-prob)`` of each item's reference answer (teacher forcing) under ``config``."""
    from visor.data.batch import Sample

    probs: list[float] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        samples = [Sample(item.images, list(item.turns) + [{"from": "gpt", "value": item.answers[0]}]) for item in chunk]
        batch = batcher.train_batch(samples)
        out = model(**batch, active_sa=config)
        labels = batch["labels"]
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        index = out.text_index.clamp(min=0)
        targets = torch.where(out.text_index >= 0, shifted.gather(1, index), torch.full_like(index, -100))
        logp = torch.log_softmax(out.logits.float(), -1)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        valid = targets != -100
        mean = (picked * valid).sum(1) / valid.sum(1).clamp(min=1)
        probs.extend(torch.exp(mean).tolist())
    return probs


def label_items(model, tokenizer, image_processor, items: Sequence, configs: Sequence[Sequence[int]], *,
                threshold: float = 0.99, score: str = "grader", batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Score every item under every configuration (both scores are recorded) and label it."""
    from visor.cost import Geometry, count_prefill
    from visor.data.batch import Batcher, count_tokens
    from visor.eval.harness import evaluate

    if score not in ("grader", "loglik"):
        raise ValueError(f"score must be 'grader' or 'loglik', got {score!r}")
    plan = model.plan
    configs = [plan.resolve_active(c) for c in configs]
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    geometry = Geometry.from_config(model.config)
    graded = {c: evaluate(model, tokenizer, image_processor, items, active_sa=c, batch_size=batch_size, progress=progress).items
              for c in configs}
    likelihood = {c: answer_probabilities(model, batcher, items, c, batch_size) for c in configs}
    rows = []
    for index, item in enumerate(items):
        first = graded[configs[0]][index]
        nv, nt = first.visual_tokens or 0, first.text_tokens or 1
        costs = {c: (count_prefill(geometry, plan, c, nv, nt).llm_total if nv > 0 else float(len(c))) for c in configs}
        grader_scores = {c: (graded[c][index].score or 0.0) for c in configs}
        loglik_scores = {c: likelihood[c][index] for c in configs}
        chosen = grader_scores if score == "grader" else loglik_scores
        label = choose_label(chosen, costs, threshold)
        rows.append({
            "id": item.id, "family": item.family, "difficulty": item.difficulty, "label": list(label),
            "label_index": configs.index(label), "score_kind": score,
            "grader_scores": {format_slots(c): v for c, v in grader_scores.items()},
            "loglik_scores": {format_slots(c): v for c, v in loglik_scores.items()},
            "label_by_grader": list(choose_label(grader_scores, costs, threshold)),
            "label_by_loglik": list(choose_label(loglik_scores, costs, threshold)),
            "predictions": {format_slots(c): graded[c][index].prediction for c in configs},
        })
    return rows


def write_labels(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_labels(path: str | Path) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err})") from err
    return rows


def label_summary(rows: list[dict]) -> dict:
    """Label distribution per family, and how often the two scoring rules agree."""
    per_family: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        per_family[row["family"]][format_slots(row["label"])] += 1
    agree = sum(row["label_by_grader"] == row["label_by_loglik"] for row in rows)
    return {"per_family": {f: dict(c) for f, c in sorted(per_family.items())}, "n": len(rows),
            "grader_loglik_agreement": agree / len(rows) if rows else None}
