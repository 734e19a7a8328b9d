"""FLOPs of every method projected to LLaVA-OV-0.5B at 7,290 visual + 64 text tokens.

The per-sample *decisions* made on the tiny model (the number of SA layers a sample ran, the reducer and
its kept fraction) are costed at the real geometry (``visor.cost``, LLM prefill only):

* baseline: ``count_baseline_prefill`` (every layer SA);
* a reducer: its own schedule at 24 layers (``reducer_schedule``: FastV's K, PyramidDrop's L/4 stages, the
  kept count of a pre-LLM reducer, its selection overhead with 10 crops encoded);
* VISOR with ``k`` SA layers: the default 24-layer plan (8 CA layers, 8 slots), the first ``k`` slots; the
  indices a tiny model used have no counterpart at 24 layers, the count does;
* routed: plus the routing pass as implemented (``router_overhead_flops``: the layers before the first SA
  slot run again on the text + routing tokens, their CA blocks included, then the MLP).

A method's projected reduction is ``baseline FLOPs / mean over samples of the sample's FLOPs``, the same
definition as at the tiny geometry. The end-to-end columns (``projected_total_flops``) add the vision tower and
projector on the crops each sample encoded (10 at full resolution; 1 for a base-only one, which also enters the
LLM with 730 visual tokens: ``visor.model.resolution``).
"""

from __future__ import annotations

from functools import lru_cache

PROJECTION = {"geometry": "llava-ov-0.5b", "n_visual": 7290, "n_text": 64, "n_crops": 10}


def _geometry():
    from visor.cost import get_geometry

    return get_geometry(PROJECTION["geometry"])


@lru_cache(maxsize=None)
def baseline_flops() -> float:
    from visor.cost import count_baseline_prefill

    return float(count_baseline_prefill(_geometry(), PROJECTION["n_visual"], PROJECTION["n_text"]).llm_total)


@lru_cache(maxsize=None)
def _reducer_schedule(reducer: str | None) -> tuple[tuple[int, ...] | None, int]:
    if not reducer:
        return None, 0
    from visor.cost import reducer_schedule

    per_layer, overhead = reducer_schedule(_geometry(), reducer, PROJECTION["n_visual"], PROJECTION["n_text"],
                                           n_crops=PROJECTION["n_crops"])
    return tuple(per_layer), int(overhead)


@lru_cache(maxsize=None)
def _plan_for(layers: int, n_sa: int | None):
    """(plan, active slots): every layer SA for the baseline (``n_sa=None``), else the default plan with
    its first ``n_sa`` slots."""
    from visor.model.plan import LayerPlan

    if n_sa is None:
        return LayerPlan.all_self_attention(layers), None
    plan = LayerPlan.default(layers)
    return plan, plan.first_slots(min(int(n_sa), plan.num_slots))


def projected_flops(n_sa: int | None, reducer: str | None = None, router: tuple[int, int, int] | None = None) -> float:
    """One sample's LLM prefill FLOPs at 0.5B geometry.

    ``n_sa``: SA layers of a VISOR sample (``None``: the baseline model, every layer SA);
    ``reducer``: ``"NAME:AMOUNT"``; ``router``: ``(num_tokens, mlp_hidden, n_configs)`` of a routed sample.
    """
    from visor.cost import count_prefill

    geometry = _geometry()
    layers = geometry.text.num_layers
    n_visual, n_text = PROJECTION["n_visual"], PROJECTION["n_text"]
    per_layer, overhead = _reducer_schedule(reducer)
    plan, active = _plan_for(layers, n_sa)
    flops = float(count_prefill(geometry, plan, active, n_visual, n_text, visual_tokens_per_layer=per_layer,
                                compression_overhead_flops=overhead).llm_total)
    if router is not None and n_sa is not None:
        num_tokens, mlp_hidden, n_configs = router
        read = plan.self_attention_layers[0] - 1  # the layer before the first slot, as attach_router places it
        prefix = count_prefill(geometry, plan, (), n_visual, n_text + num_tokens).per_layer[: read + 1]
        flops += float(sum(prefix) + 2 * (num_tokens * geometry.text.hidden * mlp_hidden + mlp_hidden * n_configs))
    return flops


def method_projection(model_kind: str, reducer: str | None, routed: bool, router_settings: dict | None,
                      active_per_item: list[str | None]) -> float:
    """Mean projected FLOPs over a method's items (``active_per_item``: the harness's ``active_sa`` strings)."""
    router = None
    if routed and router_settings:
        router = (int(router_settings.get("num_tokens", 1)), int(router_settings.get("mlp_hidden", 256)),
                  len(router_settings["configs"]))
    values = []
    for active in active_per_item:
        if active is None:  # an item that did not run
            continue
        if model_kind == "base":
            values.append(projected_flops(None, reducer))
        else:
            n_sa = 0 if active == "none" else len(active.split("+"))
            values.append(projected_flops(n_sa, reducer, router))
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------- end to end (vision + LLM)
#: visual tokens of a base-only image at 0.5B geometry (27 x 27 grid + 1 newline; visor.model.resolution)
BASE_ONLY_VISUAL = 730


@lru_cache(maxsize=None)
def projected_parts(n_sa: int | None, reducer: str | None = None, router: tuple[int, int, int] | None = None,
                    resolution: str | None = None, on_request: bool = False) -> tuple[float, float]:
    """One sample's (LLM prefill, vision tower + projector) FLOPs at 0.5B geometry: the LLM as
    ``projected_flops`` costs it, at 7,290 visual tokens (full) or 730 (``resolution="base"``), and the tower on
    the crops encoded (10, or 1 base-only). ``on_request``: the router read the base-only layout
    (``visor.routing.resolution``): its pass is costed there, and a full-resolution sample's base view is reused
    (square images), so it encodes 10 crops in all."""
    from visor.cost import count_prefill
    from visor.cost.flops import projector_flops, vision_encoder_flops

    geometry = _geometry()
    base = resolution == "base"
    crops = 1 if base else PROJECTION["n_crops"]
    vision = float(vision_encoder_flops(geometry.vision, crops) + projector_flops(geometry.vision, crops))
    if not base and not on_request:
        return projected_flops(n_sa, reducer, router), vision
    layers = geometry.text.num_layers
    n_visual, n_text = (BASE_ONLY_VISUAL if base else PROJECTION["n_visual"]), PROJECTION["n_text"]
    per_layer = overhead = None
    if reducer:
        from visor.cost import reducer_schedule

        per_layer, overhead = reducer_schedule(geometry, reducer, n_visual, n_text, n_crops=crops)
    plan, active = _plan_for(layers, n_sa)
    flops = float(count_prefill(geometry, plan, active, n_visual, n_text, visual_tokens_per_layer=per_layer,
                                compression_overhead_flops=overhead or 0).llm_total)
    if router is not None and n_sa is not None:
        num_tokens, mlp_hidden, n_configs = router
        read = plan.self_attention_layers[0] - 1
        routed_visual = BASE_ONLY_VISUAL if on_request else n_visual
        prefix = count_prefill(geometry, plan, (), routed_visual, n_text + num_tokens).per_layer[: read + 1]
        flops += float(sum(prefix) + 2 * (num_tokens * geometry.text.hidden * mlp_hidden + mlp_hidden * n_configs))
    return flops, vision


def projected_total_flops(n_sa: int | None, reducer: str | None = None, router: tuple[int, int, int] | None = None,
                          resolution: str | None = None, on_request: bool = False) -> float:
    """One sample's *end-to-end* prefill FLOPs at 0.5B geometry (``projected_parts`` summed)."""
    return sum(projected_parts(n_sa, reducer, router, resolution, on_request))


@lru_cache(maxsize=None)
def baseline_total_flops() -> float:
    """The baseline's end-to-end prefill FLOPs at 0.5B geometry (10 crops, 7,290 visual + 64 text tokens)."""
    return projected_total_flops(None)


def method_total_projection(model_kind: str, reducer: str | None, routed: bool, router_settings: dict | None,
                            active_per_item: list[str | None], resolution_per_item: list[str | None] | None = None,
                            llm_only: bool = False) -> float:
    """Mean projected end-to-end FLOPs over a method's items (``method_projection`` plus the vision tower;
    ``resolution_per_item``: the harness's ``resolution`` per item, ``None`` = full). ``llm_only``: the LLM part
    alone (what ``method_projection`` gives when every item ran at full resolution)."""
    from visor.model.resolution import names_resolution

    router = None
    on_request = False
    if routed and router_settings:
        router = (int(router_settings.get("num_tokens", 1)), int(router_settings.get("mlp_hidden", 256)),
                  len(router_settings["configs"]))
        on_request = names_resolution(router_settings["configs"])
    resolutions = resolution_per_item or [None] * len(active_per_item)
    values = []
    for active, resolution in zip(active_per_item, resolutions):
        if active is None:
            continue
        resolution = "base" if resolution == "base" else None
        n_sa = None if model_kind == "base" else (0 if active == "none" else len(active.split("+")))
        llm, vision = projected_parts(n_sa, reducer, None if n_sa is None else router, resolution, on_request)
        values.append(llm if llm_only else llm + vision)
    return sum(values) / len(values) if values else float("nan")
