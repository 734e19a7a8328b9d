"""Router vs fixed configurations: accuracy against mean FLOPs (``visor route report``).

Every configuration the router can choose is evaluated as a fixed configuration, and the router at one
or more budgets, on the same items. Output: a table, ``route_report.csv`` / ``.json``, a Pareto plot
(easy and hard accuracy vs mean LLM FLOPs) and the distribution of chosen configurations per family.
FLOPs are reported at the evaluated model's own geometry and, projected, at LLaVA-OV-0.5B with 7,371
visual + 64 text tokens (the same per-sample choices, costed there), LLM-only and end to end (vision tower +
projector + LLM; 10 crops at full resolution, 1 on the base view only, which also leaves 730 visual tokens).
Each routed row also carries ``vs_maximal``: its easy and hard gaps to the maximal fixed configuration on the
same items, with their 95% paired bootstrap interval (:mod:`visor.eval.stats`), so a gap of a point or two can be
read against what the item count can resolve. For a router that also picks the resolution (``visor.model.resolution``) the routed row adds the share of
items sent to full resolution, the end-to-end saving against the maximal fixed configuration and its bound
``1 / share``.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

PROJECTION = {"geometry": "llava-ov-0.5b", "n_visual": 7371, "n_text": 64, "n_crops": 10, "n_visual_base": 730}


def _parts(config) -> tuple[int, str]:
    """(active SA layers, resolution) of a slot tuple or a ``Configuration``."""
    from visor.model.resolution import Configuration

    if isinstance(config, Configuration):
        return len(config.active_sa), config.resolution
    return len(config), "full"


def projected_total_flops(config) -> float:
    """End-to-end (vision + projector + LLM) prefill FLOPs of ``config`` at LLaVA-OV-0.5B (see
    ``projected_flops``): 10 crops and 7,371 visual tokens at full resolution, 1 crop and 730 on the base view."""
    from visor.cost import count_prefill, get_geometry
    from visor.model.plan import LayerPlan

    geometry = get_geometry(PROJECTION["geometry"])
    plan = LayerPlan.default(geometry.text.num_layers)
    n_sa, resolution = _parts(config)
    base = resolution == "base"
    cost = count_prefill(geometry, plan, plan.first_slots(min(n_sa, plan.num_slots)),
                         PROJECTION["n_visual_base"] if base else PROJECTION["n_visual"], PROJECTION["n_text"],
                         n_crops=1 if base else PROJECTION["n_crops"])
    return float(cost.total)


def projected_flops(config) -> float:
    """LLM prefill FLOPs of a configuration with ``len(config)`` active SA layers at LLaVA-OV-0.5B geometry
    (default plan: 8 CA layers, the first k SA slots) and 7,371 visual + 64 text tokens.

    The projection keeps the *number* of SA layers a sample used (what drives the cost), not their
    indices, which have no counterpart in a 24-layer plan."""
    from visor.cost import count_prefill, get_geometry
    from visor.model.plan import LayerPlan

    geometry = get_geometry(PROJECTION["geometry"])
    plan = LayerPlan.default(geometry.text.num_layers)
    n_sa, resolution = _parts(config)
    active = plan.first_slots(min(n_sa, plan.num_slots))
    n_visual = PROJECTION["n_visual_base"] if resolution == "base" else PROJECTION["n_visual"]
    return float(count_prefill(geometry, plan, active, n_visual, PROJECTION["n_text"]).llm_total)


def _chosen_name(item) -> str:
    """The configuration an item ran, in string form (``"0+1"``, or ``"base:0+1"`` off full resolution)."""
    resolution = getattr(item, "resolution", None)
    return item.active_sa if resolution in (None, "full") else f"{resolution}:{item.active_sa}"


def _row(name: str, summary: dict, items) -> dict:
    chosen = Counter(_chosen_name(item) for item in items if item.active_sa is not None)
    return {
        "method": name, "easy_mean": summary.get("easy_mean"), "hard_mean": summary.get("hard_mean"),
        "mean_flops": summary.get("mean_flops"), "mean_total_flops": summary.get("mean_total_flops"),
        "per_family": summary.get("per_family"), "chosen": dict(chosen),
    }


def dominated(candidate: dict, others: list[dict]) -> list[str]:
    """Names of the rows that are at least as good on easy and hard, at no more FLOPs, and better somewhere."""
    out = []
    for other in others:
        if other is candidate:
            continue
        le = other["mean_flops"] <= candidate["mean_flops"]
        ge = (other["easy_mean"] or 0) >= (candidate["easy_mean"] or 0) and (other["hard_mean"] or 0) >= (candidate["hard_mean"] or 0)
        strict = (other["mean_flops"] < candidate["mean_flops"] or (other["easy_mean"] or 0) > (candidate["easy_mean"] or 0)
                  or (other["hard_mean"] or 0) > (candidate["hard_mean"] or 0))
        if le and ge and strict:
            out.append(other["method"])
    return out


def route_report(model, tokenizer, image_processor, items, out_dir: str | Path, budgets=(0.0,), batch_size: int = 16,
                 progress: bool = True) -> dict:
    from visor.eval.harness import evaluate
    from visor.model.plan import format_slots
    from visor.model.resolution import parse_configuration
    from visor.routing.router import router_configurations, routes_resolution

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with_resolution = routes_resolution(model)
    configs = router_configurations(model) if with_resolution else [c.active_sa for c in router_configurations(model)]
    from visor.eval.stats import scores_by_id

    rows, scores = [], []  # scores: per row, {item id: (family, score)} for the paired intervals
    for config in configs:
        if with_resolution:
            result = evaluate(model, tokenizer, image_processor, items, active_sa=config.active_sa, resolution=config.resolution,
                              batch_size=batch_size, progress=progress)
            row = _row(f"fixed {config.label()}", result.summary, result.items)
        else:
            result = evaluate(model, tokenizer, image_processor, items, active_sa=config, batch_size=batch_size, progress=progress)
            row = _row(f"fixed {format_slots(config)}", result.summary, result.items)
        row["projected_flops"] = projected_flops(config)
        row["projected_total_flops"] = projected_total_flops(config)
        rows.append(row)
        scores.append(scores_by_id(result.items))
    distribution = {}
    for budget in budgets:
        result = evaluate(model, tokenizer, image_processor, items, route=True, budget=budget, batch_size=batch_size, progress=progress)
        row = _row(f"routed (budget {budget:g})", result.summary, result.items)
        row["budget"] = float(budget)
        per_family: dict[str, Counter] = defaultdict(Counter)
        for item in result.items:
            if item.active_sa is not None:
                per_family[item.family][_chosen_name(item)] += 1
        distribution[f"{budget:g}"] = {f: dict(c) for f, c in sorted(per_family.items())}
        chosen = [parse_configuration(_chosen_name(item)) for item in result.items if item.active_sa is not None]
        if not with_resolution:
            chosen = [c.active_sa for c in chosen]
        row["projected_flops"] = sum(projected_flops(c) for c in chosen) / max(len(chosen), 1)
        row["projected_total_flops"] = sum(projected_total_flops(c) for c in chosen) / max(len(chosen), 1)
        if with_resolution:  # the saving over the whole mix next to its bound, 1 / share of items given tiles
            share = sum(c.resolution == "full" for c in chosen) / max(len(chosen), 1)
            row["full_resolution_share"] = share
            row["saving_bound"] = 1 / share if share else None
        rows.append(row)
        scores.append(scores_by_id(result.items))
    from visor.cost import count_baseline_prefill, get_geometry

    baseline = count_baseline_prefill(get_geometry(PROJECTION["geometry"]), PROJECTION["n_visual"], PROJECTION["n_text"],
                                      n_crops=PROJECTION["n_crops"])
    base, base_total = float(baseline.llm_total), float(baseline.total)
    fixed = [r for r in rows[: len(configs)] if r.get("mean_total_flops") is not None]
    fixed_max = max(fixed, key=lambda r: r["mean_total_flops"]) if fixed else None  # the dearest fixed configuration
    for row in rows:
        row["projected_reduction"] = base / row["projected_flops"] if row["projected_flops"] else None
        row["projected_total_reduction"] = base_total / row["projected_total_flops"] if row.get("projected_total_flops") else None
        if "saving_bound" in row and fixed_max and row.get("mean_total_flops"):
            row["total_saving_vs_maximal"] = fixed_max["mean_total_flops"] / row["mean_total_flops"]
        row["dominated_by"] = dominated(row, rows)
    if fixed_max is not None:
        reference = scores[next(i for i, r in enumerate(rows) if r is fixed_max)]
        for row, row_scores in zip(rows, scores):
            if row.get("budget") is not None:
                row["vs_maximal"] = gaps_with_intervals(row_scores, reference)
    report = {"rows": rows, "distribution": distribution, "projection": PROJECTION}
    (out / "route_report.json").write_text(json.dumps(report, indent=2))
    with open(out / "route_report.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "easy_mean", "hard_mean", "mean_flops", "projected_reduction_0.5b", "dominated_by",
                         "mean_total_flops", "projected_total_reduction_0.5b"])
        for row in rows:
            writer.writerow([row["method"], row["easy_mean"], row["hard_mean"], row["mean_flops"], row["projected_reduction"],
                             ";".join(row["dominated_by"]), row.get("mean_total_flops"), row.get("projected_total_reduction")])
    plot_pareto(rows, out / "route_pareto.png")
    return report


def gaps_with_intervals(scores: dict, reference: dict) -> dict[str, list[float]]:
    """``{"easy"|"hard": [gap, low, high]}`` in points: macro-mean gap of ``scores`` to ``reference`` on the
    same items, with its 95% paired bootstrap interval; a difficulty without items is left out."""
    from visor.data.synth.config import EASY_FAMILIES, HARD_FAMILIES
    from visor.eval.stats import difficulty_gap_in_points

    out = {}
    for difficulty, families in (("easy", EASY_FAMILIES), ("hard", HARD_FAMILIES)):
        if any(fam in families for fam, _ in scores.values()):  # other families (a user's own data) are left out
            iv = difficulty_gap_in_points(scores, reference, difficulty)
            out[difficulty] = [iv.gap, iv.low, iv.high]
    return out


def format_report(report: dict) -> str:
    lines = [f"{'method':<26} {'easy':>7} {'hard':>7} {'LLM FLOPs':>11} {'e2e FLOPs':>11} {'0.5B LLM':>9} {'0.5B e2e':>9}"
             f"  dominated by"]
    for row in report["rows"]:
        lines.append(f"{row['method']:<26} {100 * (row['easy_mean'] or 0):>6.1f}% {100 * (row['hard_mean'] or 0):>6.1f}% "
                     f"{row['mean_flops'] or 0:>11.3g} {row.get('mean_total_flops') or 0:>11.3g} "
                     f"{row['projected_reduction'] or 0:>8.1f}x {row.get('projected_total_reduction') or 0:>8.1f}x  "
                     f"{', '.join(row['dominated_by']) or '-'}")
        if row.get("full_resolution_share") is not None:
            bound = row.get("saving_bound")
            lines.append(f"  {'':<24} tiles for {100 * row['full_resolution_share']:.1f}% of items: end-to-end saving "
                         f"{row.get('total_saving_vs_maximal') or 0:.2f}x vs the maximal configuration "
                         f"(bound 1/share = {'inf' if bound is None else f'{bound:.2f}x'})")
        if row.get("vs_maximal"):
            lines.append(f"  {'':<24} vs the maximal fixed configuration (points, 95% interval): "
                         + ", ".join(f"{k} {g:+.1f} [{lo:+.1f}, {hi:+.1f}]" for k, (g, lo, hi) in row["vs_maximal"].items()))
    for budget, families in report["distribution"].items():
        lines.append(f"chosen configurations (budget {budget}):")
        for family, counts in families.items():
            lines.append(f"  {family:<12} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def plot_pareto(rows: list[dict], path: Path) -> None:
    from visor.plotting import place_labels, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "easy_mean", "easy families"), (axes[1], "hard_mean", "hard families")):
        fixed = [r for r in rows if r["method"].startswith("fixed")]
        routed = [r for r in rows if r["method"].startswith("routed")]
        ax.plot([r["mean_flops"] for r in fixed], [100 * (r[key] or 0) for r in fixed], "o-", label="fixed configurations")
        ax.plot([r["mean_flops"] for r in routed], [100 * (r[key] or 0) for r in routed], "r*", markersize=12, label="router")
        ax.set_xlabel("mean LLM prefill FLOPs per sample")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    for ax, key in ((axes[0], "easy_mean"), (axes[1], "hard_mean")):  # labels last: placed on the final layout
        place_labels(ax, [(r["mean_flops"], 100 * (r[key] or 0), r["method"].split(" ", 1)[1])
                          for r in rows if r["method"].startswith(("fixed", "routed"))])
    fig.savefig(path, dpi=120)
    plt.close(fig)
