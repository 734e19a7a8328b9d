"""Viable active configurations of a VISOR checkpoint (the step between stage 1 and stage 2).

``nested`` (default, DESIGN.md section 2): start from cross-attention only and greedily add, one at a
time, the SA slot whose addition scores best on validation data; the viable set is the chain
``(), (s1,), (s1, s2), ...`` up to every slot, and the slot order becomes the plan's ``slot_order`` (so
``--sa-count K`` means the K most useful slots). ``exhaustive``: every subset is scored and the viable
set is its accuracy/FLOPs Pareto front. Score = mean of the easy and hard means (families averaged).

With ``resolutions`` (``visor.model.resolution``, e.g. ``("full", "base")``) the search covers both parts of a
configuration: ``nested`` chooses the slot order greedily at the first resolution listed, as above, scores
that chain at every other resolution too, and keeps every (resolution, chain member): stage 2 then trains each
at every resolution; ``exhaustive`` scores every subset at every resolution and keeps the Pareto front of score
against mean *end-to-end* FLOPs (vision tower + LLM), since skipping the tiles saves vision work the LLM-only
count does not see. The viable set is then written in JSON form (plain lists for full resolution).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

from visor.model.plan import format_slots


@dataclass
class ConfigSearch:
    viable: list[tuple[int, ...]]
    slot_order: list[int]
    scores: dict[tuple[int, ...], dict] = field(default_factory=dict)

    def table(self) -> str:
        from visor.model.resolution import Configuration

        if any(isinstance(c, Configuration) for c in self.scores):
            lines = [f"{'configuration':<16} {'score':>7} {'easy':>7} {'hard':>7} {'LLM FLOPs':>11} {'e2e FLOPs':>11}  viable"]
            for config, summary in sorted(self.scores.items(), key=lambda kv: (kv[0].resolution, len(kv[0].active_sa), kv[0].active_sa)):
                lines.append(
                    f"{config.label():<16} {100 * summary['score']:>6.1f}% {100 * (summary['easy_mean'] or 0):>6.1f}% "
                    f"{100 * (summary['hard_mean'] or 0):>6.1f}% {summary.get('mean_flops') or 0:>11.3g} "
                    f"{summary.get('mean_total_flops') or 0:>11.3g}  {'*' if config in self.viable else ''}")
            return "\n".join(lines)
        lines = [f"{'active SA':<12} {'score':>7} {'easy':>7} {'hard':>7} {'mean FLOPs':>11}  viable"]
        for config, summary in sorted(self.scores.items(), key=lambda kv: (len(kv[0]), kv[0])):
            lines.append(
                f"{format_slots(config):<12} {100 * summary['score']:>6.1f}% {100 * (summary['easy_mean'] or 0):>6.1f}% "
                f"{100 * (summary['hard_mean'] or 0):>6.1f}% {summary.get('mean_flops') or 0:>11.3g}  {'*' if config in self.viable else ''}"
            )
        return "\n".join(lines)


def _score(summary: dict) -> float:
    values = [v for v in (summary.get("easy_mean"), summary.get("hard_mean")) if v is not None]
    return sum(values) / len(values) if values else float(summary.get("overall_mean") or 0.0)


def search_configs(model, tokenizer, image_processor, items: Sequence, mode: str = "nested", batch_size: int = 16,
                   progress: bool = True, log=print, resolutions: Sequence[str] | None = None) -> ConfigSearch:
    """Score candidate SA subsets (at each of ``resolutions``, if given) on ``items`` with the evaluation
    harness and choose the viable set."""
    from visor.eval.harness import evaluate

    def scorer(config) -> dict:
        if resolutions:
            summary = evaluate(model, tokenizer, image_processor, items, active_sa=config.active_sa,
                               resolution=config.resolution, batch_size=batch_size, progress=progress).summary
            log(f"  {config.label():<14} score {100 * _score(summary):.1f}%")
            return summary
        summary = evaluate(model, tokenizer, image_processor, items, active_sa=config, batch_size=batch_size,
                           progress=progress).summary
        log(f"  active SA {format_slots(config):<10} score {100 * _score(summary):.1f}%")
        return summary

    return choose_viable(scorer, model.plan.num_slots, mode, resolutions=resolutions)


def choose_viable(scorer, num_slots: int, mode: str = "nested", resolutions: Sequence[str] | None = None) -> ConfigSearch:
    """The search itself: ``scorer(config) -> summary`` (with easy/hard means and ``mean_flops``; with
    ``resolutions``, ``config`` is a ``Configuration`` and the summary also has ``mean_total_flops``)."""
    if resolutions:
        return _choose_with_resolution(scorer, num_slots, mode, list(resolutions))
    scores: dict[tuple[int, ...], dict] = {}

    def score(config: tuple[int, ...]) -> float:
        if config not in scores:
            summary = dict(scorer(config))
            summary["score"] = _score(summary)
            scores[config] = summary
        return scores[config]["score"]

    if mode == "nested":
        current: tuple[int, ...] = ()
        score(current)
        order: list[int] = []
        while len(current) < num_slots:
            remaining = [s for s in range(num_slots) if s not in current]
            best = max(remaining, key=lambda s: (score(tuple(sorted(current + (s,)))), -s))
            order.append(best)
            current = tuple(sorted(current + (best,)))
        viable = [tuple(sorted(order[:k])) for k in range(num_slots + 1)]
        return ConfigSearch(viable=viable, slot_order=order, scores=scores)
    if mode == "exhaustive":
        for k in range(num_slots + 1):
            for config in combinations(range(num_slots), k):
                score(config)
        front = []
        for config, summary in sorted(scores.items(), key=lambda kv: (kv[1].get("mean_flops") or 0, -kv[1]["score"])):
            if not front or summary["score"] > scores[front[-1]]["score"]:
                front.append(config)
        order = list(front[-1]) + [s for s in range(num_slots) if s not in front[-1]]
        return ConfigSearch(viable=front, slot_order=order, scores=scores)
    raise ValueError(f"mode must be 'nested' or 'exhaustive', got {mode!r}")


def _choose_with_resolution(scorer, num_slots: int, mode: str, resolutions: list[str]) -> ConfigSearch:
    from visor.model.resolution import RESOLUTIONS, Configuration, cross

    bad = [r for r in resolutions if r not in RESOLUTIONS]
    if bad or len(set(resolutions)) != len(resolutions):
        raise ValueError(f"resolutions must be distinct values of {list(RESOLUTIONS)}, got {resolutions}")
    first = resolutions[0]
    scores: dict = {}

    def score(config: Configuration) -> float:
        if config not in scores:
            summary = dict(scorer(config))
            summary["score"] = _score(summary)
            scores[config] = summary
        return scores[config]["score"]

    if mode == "nested":  # the slot order at the first resolution, the chain at every resolution
        def at_first(config: tuple[int, ...]) -> dict:
            score(Configuration(config, first))
            return scores[Configuration(config, first)]

        inner = choose_viable(at_first, num_slots, "nested")
        chain = inner.viable
        for r in resolutions[1:]:
            for config in chain:
                score(Configuration(config, r))
        cheap_first = sorted(resolutions, key=lambda r: r != "base")  # the base view first: cheapest first
        return ConfigSearch(viable=cross(chain, cheap_first), slot_order=inner.slot_order, scores=scores)
    if mode == "exhaustive":
        for r in resolutions:
            for k in range(num_slots + 1):
                for config in combinations(range(num_slots), k):
                    score(Configuration(config, r))

        def cost(summary: dict) -> float:
            return summary.get("mean_total_flops") or summary.get("mean_flops") or 0

        front = []
        for config, summary in sorted(scores.items(), key=lambda kv: (cost(kv[1]), -kv[1]["score"])):
            if not front or summary["score"] > scores[front[-1]]["score"]:
                front.append(config)
        best = front[-1].active_sa
        order = list(best) + [s for s in range(num_slots) if s not in best]
        return ConfigSearch(viable=front, slot_order=order, scores=scores)
    raise ValueError(f"mode must be 'nested' or 'exhaustive', got {mode!r}")


def write_viable(model, search: ConfigSearch) -> None:
    """Record the viable set and the slot order in the model's config (saved with ``save_pretrained``)."""
    from visor.model.plan import LayerPlan

    plan = model.plan
    model.config.set_plan(LayerPlan(plan.num_layers, plan.cross_attention_layers, plan.self_attention_layers,
                                    slot_order=tuple(search.slot_order)))
    model.config.viable_configs = [c.to_json() if hasattr(c, "to_json") else list(c) for c in search.viable]
