"""Analytic cost of VISOR and the baseline: FLOPs per prefill and decode step, KV-cache bytes.

    from visor.cost import get_geometry, count_prefill, count_baseline_prefill
    from visor.model.plan import LayerPlan

    g = get_geometry("llava-ov-0.5b")
    plan = LayerPlan.default(g.text.num_layers)
    visor = count_prefill(g, plan, plan.first_slots(2), n_visual=7290, n_text=64)
    base = count_baseline_prefill(g, 7290, 64)
    print(base.llm_total / visor.llm_total)  # ~10.9x

Counting choices are listed at the top of ``visor.cost.flops``.
"""

from visor.cost.flops import (
    LLM_LINES,
    CostBreakdown,
    KvCacheBytes,
    RouterGeometry,
    count_baseline_prefill,
    count_decode_step,
    count_prefill,
    format_bytes,
    format_flops,
    kv_cache_bytes,
    reducer_schedule,
    visual_tokens_schedule,
)
from visor.cost.geometry import PRESETS, Geometry, TextGeometry, VisionGeometry, get_geometry

__all__ = [
    "LLM_LINES",
    "PRESETS",
    "CostBreakdown",
    "Geometry",
    "KvCacheBytes",
    "RouterGeometry",
    "TextGeometry",
    "VisionGeometry",
    "count_baseline_prefill",
    "count_decode_step",
    "count_prefill",
    "format_bytes",
    "format_flops",
    "get_geometry",
    "kv_cache_bytes",
    "reducer_schedule",
    "visual_tokens_schedule",
]
