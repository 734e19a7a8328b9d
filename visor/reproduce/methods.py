"""The rows of the comparison: which model, configuration and reducer each method runs, and how the
compressors' budgets are matched to VISOR routed.

Rows (in table order): the LLaVA-OV baseline; pooling 2x and 4x; VisionZip, VisPruner, HiRED, FastV and
PyramidDrop at a *matched* budget; VISOR CA-only, 2 SA, maximal (fixed configurations of the universal
model); VISOR routed; VISOR-TR 2x and 4x (routed, visual tokens pooled before the LLM); VISOR + VisionZip
(routed, VisionZip keeping a quarter of the tokens). The ablation over the number of SA layers adds the
universal model at every ``k = 0..K`` (first ``k`` slots of the plan's slot order).

**Matched budgets.** A compressor's kept fraction is chosen so that its mean analytic LLM prefill FLOPs on
the test items, at the evaluated model's own geometry (``visor.eval.harness`` cost, selection overhead
included), equal VISOR routed's mean (router pass included): the fraction is bisected on the cost model
alone, before any compressor runs. A method whose published structure cannot get that cheap (FastV keeps
every token before layer K; PyramidDrop its first stage) runs at the strongest setting it allows (one
token per image unit from the first drop on) and the table says so; a match is "within 20%" otherwise.
The structure itself (FastV's K=2, PyramidDrop's stage layers, VisionZip's dominant:contextual split) is
the published one; only AMOUNT moves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

MATCH_TOLERANCE = 0.20
MATCHED_REDUCERS = ("visionzip", "vispruner", "hired", "fastv", "pdrop")
REDUCER_LABELS = {"visionzip": "VisionZip", "vispruner": "VisPruner", "hired": "HiRED", "fastv": "FastV",
                  "pdrop": "PyramidDrop", "pooling": "pooling"}
#: VISOR + VisionZip: the kept fraction (the paper pairs VISOR with reducers at about 4x fewer tokens)
VISOR_VISIONZIP = "visionzip:4x"


@dataclass
class Method:
    key: str  # file-safe identifier
    label: str  # table row name
    model: str  # "base" (LLaVA-OV), "visor" (the universal model with its router) or "visor_tr" (VISOR-TR)
    group: str  # baseline | compression | visor | visor+reduction | ablation
    active_sa: tuple[int, ...] | None = None  # fixed configuration (None: every slot / routed)
    route: bool = False
    reducer: str | None = None  # "NAME:AMOUNT"
    budget: str = ""  # what the table says about the budget
    in_table: bool = True
    matched: dict = field(default_factory=dict)  # budget matching details (compressors)

    def spec(self) -> dict:
        """What decides this method's predictions (part of its evaluation cache key)."""
        return {"model": self.model, "active_sa": None if self.active_sa is None else list(self.active_sa),
                "route": self.route, "reducer": self.reducer}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["active_sa"] = None if self.active_sa is None else list(self.active_sa)
        return data


def visor_fixed_methods(plan, slot_counts: Sequence[int] | None = None) -> list[Method]:
    """The universal model at ``k`` SA slots for every ``k`` (the ablation), the table's three marked."""
    k_max = plan.num_slots
    two = min(2, k_max)
    table = {0: ("visor-ca-only", "VISOR CA-only"), two: ("visor-2sa", f"VISOR {two} SA")}
    if k_max != two:
        table[k_max] = ("visor-maximal", "VISOR maximal")
    out = []
    for k in slot_counts if slot_counts is not None else range(k_max + 1):
        key, label = table.get(k, (f"visor-{k}sa", f"VISOR {k} SA"))
        out.append(Method(key=key, label=label, model="visor", group="visor" if k in table else "ablation",
                          active_sa=plan.first_slots(k), budget=_sa_budget(k, k_max), in_table=k in table))
    if k_max == two:  # "2 SA" is already every slot: the maximal row repeats that configuration
        out.append(Method(key="visor-maximal", label="VISOR maximal", model="visor", group="visor",
                          active_sa=plan.first_slots(k_max), budget=_sa_budget(k_max, k_max)))
    return out


def _sa_budget(k: int, k_max: int) -> str:
    return f"{k} SA layer{'' if k == 1 else 's'}" + (" (all)" if k == k_max else "")


def routed_methods(route_budget: float = 0.0, tr_model: bool = False) -> list[Method]:
    """VISOR routed and VISOR with the router on reduced tokens; a non-zero router ``route_budget`` (``--budget``,
    which the evaluation spec passes to the router) is named in their budget column. ``tr_model``: the VISOR-TR
    rows run the ``visor_tr`` model (fine-tuned on pooled tokens; named in their budget column), else the
    universal one."""
    suffix = f" (budget {route_budget:g})" if route_budget else ""
    tr, trained = ("visor_tr", "VISOR-TR model: ") if tr_model else ("visor", "")
    return [
        Method("visor-routed", "VISOR routed", "visor", "visor", route=True, budget="router" + suffix),
        Method("visor-tr-2x", "VISOR-TR 2x", tr, "visor+reduction", route=True, reducer="pooling:2x",
               budget=trained + "router + pooling 2x" + suffix),
        Method("visor-tr-4x", "VISOR-TR 4x", tr, "visor+reduction", route=True, reducer="pooling:4x",
               budget=trained + "router + pooling 4x" + suffix),
        Method("visor-visionzip", "VISOR + VisionZip", "visor", "visor+reduction", route=True, reducer=VISOR_VISIONZIP,
               budget="router + VisionZip 4x" + suffix),
    ]


def with_selector_positions(methods: Sequence[Method], mode: str = "contiguous") -> list[Method]:
    """``methods`` with every pre-LLM selector (VisionZip, VisPruner, HiRED; alone or under VISOR) set to number
    the kept tokens ``mode``-wise (``visor.compression.apply``): ``"contiguous"`` leaves them as published,
    ``"original"`` keeps each kept token's full-prompt position, appending ``@original`` to the reducer and
    " @original" to the row label. Pooling, FastV and PyramidDrop rows are returned unchanged."""
    from visor.compression import build_reducer
    from visor.compression.base import POSITION_MODES

    if mode not in POSITION_MODES:
        raise ValueError(f"unknown selector position mode {mode!r}; choose one of {', '.join(POSITION_MODES)}")
    out = []
    for method in methods:
        reducer = build_reducer(method.reducer) if method.reducer else None
        if mode == "contiguous" or reducer is None or not getattr(reducer, "keeps_token_places", False):
            out.append(method)
            continue
        out.append(replace(method, reducer=reducer.with_positions(mode).spec, label=f"{method.label} @{mode}",
                           budget=f"{method.budget}; kept tokens at their original positions"))
    return out


def fixed_compression_methods() -> list[Method]:
    return [
        Method("baseline", "LLaVA-OV baseline", "base", "baseline", budget="all tokens"),
        Method("pooling-2x", "pooling 2x", "base", "compression", reducer="pooling:2x", budget="2x fewer tokens"),
        Method("pooling-4x", "pooling 4x", "base", "compression", reducer="pooling:4x", budget="4x fewer tokens"),
    ]


TABLE_ORDER = ("baseline", "pooling-2x", "pooling-4x", "visionzip", "vispruner", "hired", "fastv", "pdrop",
               "visor-ca-only", "visor-2sa", "visor-maximal", "visor-routed", "visor-tr-2x", "visor-tr-4x",
               "visor-visionzip")


# ---------------------------------------------------------------------- budget matching
def token_profile(items, predictions: Sequence[dict]) -> list[tuple[tuple, int, int, int]]:
    """``[(image sizes, visual tokens, text tokens, count)]`` of the items that ran (from the baseline's
    predictions): enough to cost any reducer analytically."""
    counts: Counter = Counter()
    for item, row in zip(items, predictions):
        if row.get("llm_flops") is None:
            continue
        sizes = tuple((im.height, im.width) for im in item.images)
        counts[(sizes, int(row["visual_tokens"]), int(row["text_tokens"]))] += 1
    return [(sizes, nv, nt, n) for (sizes, nv, nt), n in counts.items()]


def analytic_mean_flops(model, reducer_spec: str | None, profile, config=None) -> float:
    """Mean LLM prefill FLOPs (the harness's cost model) of ``model`` under a reducer over ``profile``."""
    from visor.compression import build_reducer
    from visor.cost import Geometry
    from visor.eval.harness import item_cost

    geometry = Geometry.from_config(model.config)
    plan = model.plan
    config = plan.resolve_active(config)
    reducer = build_reducer(reducer_spec) if reducer_spec else None
    total = count = 0
    for sizes, nv, nt, n in profile:
        flops, _, _ = item_cost(model, geometry, plan, config, reducer, [tuple(s) for s in sizes], nv, nt)
        total += flops * n
        count += n
    return total / max(count, 1)


def _fmt_keep(keep: float) -> str:
    return f"{keep:.4g}"


def match_budget(model, name: str, profile, target: float, iterations: int = 40) -> dict:
    """The kept fraction of reducer ``name`` whose mean FLOPs match ``target`` (module docstring)."""
    def cost(keep: float) -> float:
        return analytic_mean_flops(model, f"{name}:{_fmt_keep(keep)}", profile)

    low = 1e-4
    floor = cost(low)
    full = cost(1.0)
    if target >= full:
        keep, strongest = 1.0, False
    elif floor >= target:  # cannot get that cheap: the strongest setting, i.e. the edge of the flat floor
        lo, hi = low, 1.0
        for _ in range(iterations):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if cost(mid) <= floor * (1 + 1e-9) else (lo, mid)
        keep, strongest = lo, True
    else:  # bisect (in log space) for the largest keep costing <= target, then take the closer neighbour
        lo, hi = low, 1.0
        for _ in range(iterations):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
        keep = min((lo, hi), key=lambda k: abs(cost(k) - target))
        strongest = False
    keep = float(_fmt_keep(keep))
    flops = cost(keep)
    ratio = flops / target if target else float("inf")
    within = abs(ratio - 1) <= MATCH_TOLERANCE
    return {"reducer": f"{name}:{_fmt_keep(keep)}", "keep": keep, "flops": flops, "target_flops": target,
            "ratio_to_target": ratio, "within_tolerance": within, "strongest": strongest}


def matched_method(name: str, match: dict) -> Method:
    label = REDUCER_LABELS[name]
    ratio = match["ratio_to_target"]
    if match["strongest"] and not match["within_tolerance"]:
        budget = f"keep {match['keep']:.3g}: strongest allowed, {ratio:.2f}x routed FLOPs"
    elif match["strongest"]:
        budget = f"keep {match['keep']:.3g}: strongest allowed, {ratio:.2f}x routed FLOPs (within 20%)"
    else:
        budget = f"keep {match['keep']:.3g}: {ratio:.2f}x routed FLOPs"
    return Method(key=name, label=label, model="base", group="compression", reducer=match["reducer"], budget=budget,
                  matched=match)
