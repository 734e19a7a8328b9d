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

Configurations with a resolution (``visor.model.resolution``: ``{"resolution": "base", "active_sa": [...]}``)
are scored on their own layout, and costed end to end: the LLM prefill plus the vision tower on the crops
that layout encodes (the harness's per-item ``llm_flops + vision_flops``), so "cheapest" weighs skipping
the tiles against skipping SA layers. Plain SA lists keep their LLM-only cost (the same order: every one
encodes the same crops) and their label format.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from visor.eval.likelihood import answer_probabilities  # the loglik score
from visor.model.plan import format_slots

EPSILON = 1e-9


def _tie_order(config) -> tuple:
    """Among equal costs: fewer SA slots first (then slot numbers, then full before base resolution)."""
    from visor.model.resolution import RESOLUTIONS, Configuration

    if isinstance(config, Configuration):
        return len(config.active_sa), config.active_sa, RESOLUTIONS.index(config.resolution)
    return len(config), config


def choose_label(scores: dict, costs: dict, threshold: float = 0.99):
    """The cheapest configuration scoring >= ``threshold`` x the maximal (most expensive) one's score.

    Keys: SA slot tuples or ``visor.model.resolution.Configuration``s."""
    if not scores:
        raise ValueError("no configuration scores to label from")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    by_cost = sorted(scores, key=lambda c: (costs[c], *_tie_order(c)))
    target = threshold * scores[by_cost[-1]]
    for config in by_cost:
        if scores[config] >= target - EPSILON:
            return config
    return by_cost[-1]


def label_items(model, tokenizer, image_processor, items: Sequence, configs: Sequence, *,
                threshold: float = 0.99, score: str = "grader", batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Score every item under every configuration (both scores are recorded) and label it.

    ``configs``: SA slot lists, or configurations with a resolution (module docstring)."""
    from visor.cost import Geometry, count_prefill
    from visor.data.batch import Batcher
    from visor.eval.harness import evaluate
    from visor.model.resolution import names_resolution, parse_configuration

    if score not in ("grader", "loglik"):
        raise ValueError(f"score must be 'grader' or 'loglik', got {score!r}")
    plan = model.plan
    if names_resolution(configs):
        return _label_with_resolution(model, tokenizer, image_processor, items,
                                      [parse_configuration(c, plan) for c in configs], threshold, score, batch_size, progress)
    configs = [plan.resolve_active(c) for c in configs]
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    geometry = Geometry.from_config(model.config)
    graded = {c: evaluate(model, tokenizer, image_processor, items, active_sa=c, batch_size=batch_size, progress=progress).items
              for c in configs}
    likelihood = {c: answer_probabilities(model, batcher, items, c, batch_size, progress) for c in configs}
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
            "label_index": configs.index(label), "score_kind": score, "threshold": threshold,
            "grader_scores": {format_slots(c): v for c, v in grader_scores.items()},
            "loglik_scores": {format_slots(c): v for c, v in loglik_scores.items()},
            "label_by_grader": list(choose_label(grader_scores, costs, threshold)),
            "label_by_loglik": list(choose_label(loglik_scores, costs, threshold)),
            "predictions": {format_slots(c): graded[c][index].prediction for c in configs},
            "costs": {format_slots(c): v for c, v in costs.items()},
        })
    return rows


def relabel(rows: Sequence[dict], threshold: float, score: str | None = None) -> list[dict]:
    """The same rows labelled again from their stored per-configuration scores, at another ``threshold``
    (and, with ``score``, by the other score), without running the model again.

    A row's ``costs`` order the configurations; rows written before the costs were stored order them by
    SA slot count, which for plain SA lists is the cost order (every SA layer costs the same)."""
    from visor.model.resolution import parse_configuration

    out = []
    for row in rows:
        kind = score or row.get("score_kind", "grader")
        if kind not in ("grader", "loglik"):
            raise ValueError(f"score must be 'grader' or 'loglik', got {kind!r}")
        keys = list(row["grader_scores"])
        configs = {key: parse_configuration(key) for key in keys}
        stored = row.get("costs") or {key: float(len(configs[key].active_sa)) for key in keys}
        costs = {configs[key]: stored[key] for key in keys}
        by = {name: {configs[key]: row[f"{name}_scores"][key] for key in keys} for name in ("grader", "loglik")}
        chosen = {name: choose_label(by[name], costs, threshold) for name in by}
        order = [configs[key] for key in keys]
        out.append({**row, "label": chosen[kind].to_json(), "label_index": order.index(chosen[kind]), "score_kind": kind,
                    "label_by_grader": chosen["grader"].to_json(), "label_by_loglik": chosen["loglik"].to_json(),
                    "threshold": threshold})
    return out


def _label_with_resolution(model, tokenizer, image_processor, items, configs, threshold, score, batch_size, progress) -> list[dict]:
    """``label_items`` over ``Configuration``s: each scored on its own layout, costed end to end."""
    from visor.data.batch import Batcher
    from visor.eval.harness import evaluate

    batcher = Batcher.for_model(model, tokenizer, image_processor)
    graded = {c: evaluate(model, tokenizer, image_processor, items, active_sa=c.active_sa, resolution=c.resolution,
                          batch_size=batch_size, progress=progress).items for c in configs}
    likelihood = {c: answer_probabilities(model, batcher, items, c, batch_size, progress) for c in configs}
    rows = []
    for index, item in enumerate(items):
        costs = {}
        for c in configs:
            r = graded[c][index]
            # end to end; an item that did not run has no cost: order by SA slots and resolution alone
            costs[c] = (r.llm_flops + (r.vision_flops or 0.0)) if r.llm_flops is not None else 0.0
        grader_scores = {c: (graded[c][index].score or 0.0) for c in configs}
        loglik_scores = {c: likelihood[c][index] for c in configs}
        label = choose_label(grader_scores if score == "grader" else loglik_scores, costs, threshold)
        rows.append({
            "id": item.id, "family": item.family, "difficulty": item.difficulty, "label": label.to_json(),
            "label_index": configs.index(label), "score_kind": score, "threshold": threshold,
            "grader_scores": {c.label(): v for c, v in grader_scores.items()},
            "loglik_scores": {c.label(): v for c, v in loglik_scores.items()},
            "label_by_grader": choose_label(grader_scores, costs, threshold).to_json(),
            "label_by_loglik": choose_label(loglik_scores, costs, threshold).to_json(),
            "predictions": {c.label(): graded[c][index].prediction for c in configs},
            "costs": {c.label(): v for c, v in costs.items()},
        })
    return rows


def score_targets(rows: dict, items: Sequence, configs: Sequence, plan, score: str = "grader") -> list[list[float]]:
    """A score router's targets (``visor.routing.train.train_router``): per item, its stored ``score`` ("grader"
    or "loglik") under each of ``configs`` (SA slot lists), from label rows keyed by item id. ``ValueError`` for
    configurations with a resolution, or rows that lack a score."""
    from visor.model.resolution import names_resolution

    if names_resolution(configs):
        raise ValueError("a score router chooses SA configurations only, not resolutions")
    field = f"{score}_scores"
    keys = [format_slots(plan.resolve_active(c)) for c in configs]
    missing = [it.id for it in items if set(keys) - set(rows[it.id].get(field, {}))]
    if missing:
        raise ValueError(f"{len(missing)} label rows lack {field} for {keys} (first: {missing[0]})")
    return [[rows[it.id][field][k] for k in keys] for it in items]


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
    """Label distribution per family, how often the two scoring rules agree, and what routing by the labels
    would score (:func:`routing_ceiling`)."""
    from visor.model.resolution import parse_configuration

    per_family: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        per_family[row["family"]][parse_configuration(row["label"]).label()] += 1
    agree = sum(row["label_by_grader"] == row["label_by_loglik"] for row in rows)
    return {"per_family": {f: dict(c) for f, c in sorted(per_family.items())}, "n": len(rows),
            "grader_loglik_agreement": agree / len(rows) if rows else None, "ceiling": routing_ceiling(rows)}


def family_table(labels: Sequence, families: Sequence[str]) -> dict:
    """Each task family's most common label (first seen on ties): the best router that reads only the family."""
    by_family: dict[str, Counter] = defaultdict(Counter)
    for label, family in zip(labels, families):
        by_family[family][label] += 1
    return {family: counts.most_common(1)[0][0] for family, counts in by_family.items()}


def routing_ceiling(rows: list[dict]) -> dict:
    """Per difficulty, on the labelled items themselves (grader scores): every fixed configuration's mean; an
    oracle that runs each item at its own label (the most a router fitted to these labels can do); and the
    best a router that reads only the task family can do, the family's most common label for all its items.
    The gap between the last two is what a router gains by reading the sample."""
    from visor.model.resolution import parse_configuration

    def slots(key: str) -> int:
        return len(parse_configuration(key).active_sa)

    out = {}
    for difficulty in sorted({row.get("difficulty") or "all" for row in rows}):
        group = [row for row in rows if (row.get("difficulty") or "all") == difficulty]
        labels = [parse_configuration(row["label"]).label() for row in group]
        table = family_table(labels, [row["family"] for row in group])
        family_labels = [table[row["family"]] for row in group]

        def routed(chosen: list[str]) -> dict:
            return {"score": sum(row["grader_scores"][c] for row, c in zip(group, chosen)) / len(group),
                    "mean_sa": sum(slots(c) for c in chosen) / len(group)}

        out[difficulty] = {"n": len(group),
                           "fixed": {key: sum(row["grader_scores"][key] for row in group) / len(group)
                                     for key in group[0]["grader_scores"]},
                           "oracle": routed(labels), "family_table": {**routed(family_labels), "table": table}}
    return out
