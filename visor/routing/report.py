"""Router vs fixed configurations: accuracy against mean FLOPs (``visor route report``).

Every configuration the router can choose is evaluated as a fixed configuration, and the router at one
or more budgets, on the same items. Output: a table, ``route_report.csv`` / ``.json``, a Pareto plot
(easy and hard accuracy vs mean LLM FLOPs) and the distribution of chosen configurations per family.
FLOPs are reported at the evaluated model's own geometry and, projected, at LLaVA-OV-0.5B with 7,371
visual + 64 text tokens (the same per-sample choices, costed there).
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

PROJECTION = {"geometry": "llava-ov-0.5b", "n_visual": 7371, "n_text": 64}


def projected_flops(config: tuple[int, ...]) -> float:
    """LLM prefill FLOPs of a configuration with ``len(config)`` active SA layers at LLaVA-OV-0.5B geometry
    (default plan: 8 CA layers, the first k SA slots) and 7,371 visual + 64 text tokens.

    The projection keeps the *number* of SA layers a sample used (what drives the cost), not their
    indices, which have no counterpart in a 24-layer plan."""
    from visor.cost import count_prefill, get_geometry
    from visor.model.plan import LayerPlan

    geometry = get_geometry(PROJECTION["geometry"])
    plan = LayerPlan.default(geometry.text.num_layers)
    active = plan.first_slots(min(len(config), plan.num_slots))
    return float(count_prefill(geometry, plan, active, PROJECTION["n_visual"], PROJECTION["n_text"]).llm_total)


def _row(name: str, summary: dict, items) -> dict:
    chosen = Counter(item.active_sa for item in items if item.active_sa is not None)
    return {
        "method": name, "easy_mean": summary.get("easy_mean"), "hard_mean": summary.get("hard_mean"),
        "mean_flops": summary.get("mean_flops"), "per_family": summary.get("per_family"),
        "chosen": dict(chosen),
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
    from visor.routing.router import router_settings

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = [tuple(c) for c in router_settings(model)["configs"]]
    rows = []
    for config in configs:
        result = evaluate(model, tokenizer, image_processor, items, active_sa=config, batch_size=batch_size, progress=progress)
        row = _row(f"fixed {format_slots(config)}", result.summary, result.items)
        row["projected_flops"] = projected_flops(config)
        rows.append(row)
    distribution = {}
    for budget in budgets:
        result = evaluate(model, tokenizer, image_processor, items, route=True, budget=budget, batch_size=batch_size, progress=progress)
        row = _row(f"routed (budget {budget:g})", result.summary, result.items)
        per_family: dict[str, Counter] = defaultdict(Counter)
        for item in result.items:
            if item.active_sa is not None:
                per_family[item.family][item.active_sa] += 1
        distribution[f"{budget:g}"] = {f: dict(c) for f, c in sorted(per_family.items())}
        chosen = [tuple(int(s) for s in item.active_sa.split("+")) if item.active_sa not in (None, "none") else ()
                  for item in result.items if item.active_sa is not None]
        row["projected_flops"] = sum(projected_flops(c) for c in chosen) / max(len(chosen), 1)
        rows.append(row)
    from visor.cost import count_baseline_prefill, get_geometry

    base = float(count_baseline_prefill(get_geometry(PROJECTION["geometry"]), PROJECTION["n_visual"], PROJECTION["n_text"]).llm_total)
    for row in rows:
        row["projected_reduction"] = base / row["projected_flops"] if row["projected_flops"] else None
        row["dominated_by"] = dominated(row, rows)
    report = {"rows": rows, "distribution": distribution, "projection": PROJECTION}
    (out / "route_report.json").write_text(json.dumps(report, indent=2))
    with open(out / "route_report.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "easy_mean", "hard_mean", "mean_flops", "projected_reduction_0.5b", "dominated_by"])
        for row in rows:
            writer.writerow([row["method"], row["easy_mean"], row["hard_mean"], row["mean_flops"], row["projected_reduction"],
                             ";".join(row["dominated_by"])])
    plot_pareto(rows, out / "route_pareto.png")
    return report


def format_report(report: dict) -> str:
    lines = [f"{'method':<22} {'easy':>7} {'hard':>7} {'LLM FLOPs':>11} {'0.5B reduction':>15}  dominated by"]
    for row in report["rows"]:
        lines.append(f"{row['method']:<22} {100 * (row['easy_mean'] or 0):>6.1f}% {100 * (row['hard_mean'] or 0):>6.1f}% "
                     f"{row['mean_flops'] or 0:>11.3g} {row['projected_reduction'] or 0:>14.1f}x  {', '.join(row['dominated_by']) or '-'}")
    for budget, families in report["distribution"].items():
        lines.append(f"chosen configurations (budget {budget}):")
        for family, counts in families.items():
            lines.append(f"  {family:<12} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def plot_pareto(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "easy_mean", "easy families"), (axes[1], "hard_mean", "hard families")):
        fixed = [r for r in rows if r["method"].startswith("fixed")]
        routed = [r for r in rows if r["method"].startswith("routed")]
        ax.plot([r["mean_flops"] for r in fixed], [100 * (r[key] or 0) for r in fixed], "o-", label="fixed configurations")
        for r in fixed:
            ax.annotate(r["method"].split(" ", 1)[1], (r["mean_flops"], 100 * (r[key] or 0)), fontsize=7)
        ax.plot([r["mean_flops"] for r in routed], [100 * (r[key] or 0) for r in routed], "r*", markersize=12, label="router")
        ax.set_xlabel("mean LLM prefill FLOPs per sample")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
