"""Choosing the router budget on held-out data (``visor reproduce``'s ``budget`` stage, ``route_budget: auto``).

The budget (``--budget LAMBDA``: logits minus LAMBDA x cost / max cost) trades accuracy for cost without
retraining. Which budget to report is a choice made on the **validation** split, never the test split:
:func:`visor.routing.report.route_report` evaluates every fixed configuration and the router at each
candidate budget on the same validation items, and :func:`choose_budget` applies one rule to its rows:

* the **reference** is the maximal fixed configuration (the dearest in mean LLM FLOPs);
* a budget is **within tolerance** when the router's easy and hard means both stay within ``tolerance``
  (default 1 point, the router issue's target) of the reference's;
* among those, the cheapest (lowest mean LLM FLOPs; ties: the larger budget) is chosen;
* when no budget is within tolerance, the one whose worse mean falls least below the reference's
  (ties: the cheaper), and the choice records that the tolerance was missed.
"""

from __future__ import annotations


def _shortfall(row: dict, reference: dict) -> float:
    """How far the worse of the two means falls below the reference's (negative = below)."""
    return min((row["easy_mean"] or 0.0) - (reference["easy_mean"] or 0.0),
               (row["hard_mean"] or 0.0) - (reference["hard_mean"] or 0.0))


def choose_budget(rows: list[dict], tolerance: float = 0.01) -> dict:
    """The budget the module's rule picks from ``route_report`` rows (fixed rows: ``method`` starting with
    ``fixed``; routed rows carry their ``budget``). Returns the choice with every candidate's figures."""
    fixed = [r for r in rows if r["method"].startswith("fixed")]
    routed = [r for r in rows if r.get("budget") is not None]
    if not fixed or not routed:
        raise ValueError("choose_budget needs fixed-configuration rows and routed rows with their budget")
    reference = max(fixed, key=lambda r: r["mean_flops"])
    within = [r for r in routed if _shortfall(r, reference) >= -tolerance - 1e-12]
    if within:
        chosen = min(within, key=lambda r: (r["mean_flops"], -r["budget"]))
    else:
        chosen = max(routed, key=lambda r: (_shortfall(r, reference), -r["mean_flops"]))

    def figures(row: dict) -> dict:
        return {"easy_mean": row["easy_mean"], "hard_mean": row["hard_mean"], "mean_flops": row["mean_flops"],
                "projected_reduction": row.get("projected_reduction"), "shortfall": _shortfall(row, reference)}

    return {
        "budget": float(chosen["budget"]), "within_tolerance": bool(within), "tolerance": tolerance,
        "rule": "cheapest budget whose easy and hard means both stay within the tolerance of the maximal fixed "
                "configuration's on the validation items; if none does, the one whose worse mean falls least below",
        "reference": {"method": reference["method"], **figures(reference)},
        "candidates": [{"budget": float(r["budget"]), **figures(r)} for r in routed],
    }


def describe(choice: dict) -> str:
    """One line: the chosen budget and whether it met the tolerance (for logs and the CLI)."""
    return (f"router budget {choice['budget']:g} ({'within' if choice['within_tolerance'] else 'none within'} "
            f"{100 * choice['tolerance']:g} point(s) of {choice['reference']['method']} on both means)")
