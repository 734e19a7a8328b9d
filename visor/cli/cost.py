"""``visor cost``: analytic FLOPs and KV-cache bytes of VISOR against the baseline, per sample.

Prints a breakdown table and, as the last line, one JSON object (``baseline_flops``, ``flops``,
``reduction`` and the breakdowns). Counting choices: see ``visor.cost.flops``.
"""

from __future__ import annotations

import argparse
import json
import sys



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cost",
        help="analytic FLOPs and KV-cache bytes of VISOR vs the baseline",
        description=(
            "Analytic per-sample cost of one VISOR configuration next to the baseline (every layer "
            "self-attention): LLM prefill FLOPs by line, one decode step, and KV-cache bytes. The last "
            "line printed is one JSON object."
        ),
    )
    p.add_argument("--geometry", default="llava-ov-0.5b", help="named model geometry (default: %(default)s)")
    p.add_argument("--visual-tokens", type=int, default=7290,
                   help="visual tokens per sample before any reduction (default: %(default)s)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens of the prompt (default: %(default)s)")
    active = p.add_mutually_exclusive_group()
    active.add_argument("--sa-count", type=int, metavar="K",
                        help="switch on the first K SA slots of the default plan (default: all L//3 slots)")
    active.add_argument("--active-sa", metavar="SLOTS",
                        help="SA slot numbers joined by '+', e.g. '0+2'; 'none' for CA only")
    p.add_argument("--reduce", metavar="NAME[:AMOUNT]",
                   help="a visual-token reducer, e.g. 'pooling:2x', 'visionzip:0.25', 'fastv:0.5', 'pdrop' "
                        "(AMOUNT: kept fraction, factor with 'x', or percentage; default: the method's published "
                        "setting). Names: pooling, visionzip, vispruner, hired (before the LLM), fastv, pdrop "
                        "(inside it). Kept tokens are counted per layer, the selection work on its own line, and "
                        "the baseline with the same reducer is reported too")
    p.add_argument("--ca-kv-layout", choices=("gqa", "full"), default="gqa",
                   help="cross-attention K/V width: the LLM's KV heads (gqa) or all heads (full) (default: %(default)s)")
    p.add_argument("--causal-halving", action="store_true",
                   help="count N(N+1)/2 query-key pairs in causal self-attention instead of the full N x N")
    p.add_argument("--crops", type=int, metavar="N",
                   help="crops through the vision encoder; without it the vision encoder and projector are not counted")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV-cache element (default: %(default)s, bf16)")
    p.add_argument("--decode-step", type=int, default=1, metavar="T",
                   help="decode step to cost: step T feeds the T-th generated token, so it attends to "
                        "prompt + T positions; the KV cache is reported at that length (default: %(default)s)")
    p.set_defaults(func=run)


def compute(args: argparse.Namespace) -> dict:
    """The whole report as one JSON-ready dict; raises ValueError on bad input."""
    from visor.compression.registry import build_reducer
    from visor.cost.flops import count_baseline_prefill, count_decode_step, count_prefill, kv_cache_bytes, reducer_schedule
    from visor.cost.geometry import get_geometry
    from visor.model.plan import LayerPlan, format_slots

    geometry = get_geometry(args.geometry)
    for flag, value in (("--visual-tokens", args.visual_tokens), ("--text-tokens", args.text_tokens)):
        if value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    plan = LayerPlan.default(geometry.text.num_layers)
    if args.sa_count is not None:
        active = plan.first_slots(args.sa_count)
    elif args.active_sa is not None:
        active = plan.parse_slots(args.active_sa)
    else:
        active = plan.all_slots

    n_visual_llm, reduce, schedule, overhead = args.visual_tokens, None, None, 0
    if args.reduce:
        reducer = build_reducer(args.reduce)
        schedule, overhead = reducer_schedule(geometry, reducer, args.visual_tokens, args.text_tokens, args.crops)
        n_visual_llm = schedule[0]  # tokens entering the LLM (in-LLM reducers prune later layers)
        reduce = {**reducer.describe(), "visual_tokens_per_layer": schedule, "selection_flops": overhead}

    common = dict(causal_halving=args.causal_halving, n_crops=args.crops)
    reduced = dict(visual_tokens_per_layer=schedule, compression_overhead_flops=overhead)
    visor = count_prefill(geometry, plan, active, args.visual_tokens, args.text_tokens, ca_kv_layout=args.ca_kv_layout,
                          **reduced, **common)
    base = count_baseline_prefill(geometry, args.visual_tokens, args.text_tokens, **common)
    base_reduced = count_baseline_prefill(geometry, args.visual_tokens, args.text_tokens, **reduced, **common) if reduce else None
    base_plan = LayerPlan.all_self_attention(geometry.text.num_layers)
    decode = count_decode_step(geometry, plan, active, args.visual_tokens, args.text_tokens, step=args.decode_step,
                               ca_kv_layout=args.ca_kv_layout, visual_tokens_per_layer=schedule)
    base_decode = count_decode_step(geometry, base_plan, None, args.visual_tokens, args.text_tokens, step=args.decode_step)
    kv_args = dict(n_generated=args.decode_step, dtype_bytes=args.dtype_bytes)
    kv = kv_cache_bytes(geometry, plan, active, args.visual_tokens, args.text_tokens, ca_kv_layout=args.ca_kv_layout,
                        visual_tokens_per_layer=schedule, **kv_args)
    base_kv = kv_cache_bytes(geometry, base_plan, None, args.visual_tokens, args.text_tokens, **kv_args)
    return {
        "geometry": geometry.name,
        "visual_tokens": args.visual_tokens,
        "visual_tokens_llm": n_visual_llm,
        "text_tokens": args.text_tokens,
        "reduce": reduce,
        "active_sa": list(active),
        "active_sa_str": format_slots(active),
        "layers": plan.describe(active),
        "ca_kv_layout": args.ca_kv_layout,
        "causal_halving": args.causal_halving,
        "crops": args.crops,
        "baseline_flops": base.llm_total,
        "flops": visor.llm_total,
        "reduction": base.llm_total / visor.llm_total,  # LLM prefill only, as the paper counts
        "reduction_with_vision": base.total / visor.total if args.crops is not None else None,
        # the baseline model with the same reducer: the token-compression peer on its own
        "reduced_baseline_flops": base_reduced.llm_total if reduce else None,
        "reducer_reduction": base.llm_total / base_reduced.llm_total if reduce else None,
        "breakdown": visor.to_dict(),
        "baseline_breakdown": base.to_dict(),
        "decode_step": args.decode_step,
        "decode_flops": decode.llm_total,
        "baseline_decode_flops": base_decode.llm_total,
        "kv_cache_bytes": kv.to_dict(),
        "baseline_kv_cache_bytes": base_kv.to_dict(),
        "kv_cache_ratio": kv.total / base_kv.total,
    }


def format_table(report: dict) -> str:
    from visor.cost.flops import LINE_LABELS, format_bytes, format_flops

    visor, base = report["breakdown"], report["baseline_breakdown"]
    reduce = report["reduce"]
    if reduce and reduce["stage"] == "in_llm":
        per_layer = reduce["visual_tokens_per_layer"]
        steps = [f"{n} from layer {i}" for i, n in enumerate(per_layer) if i == 0 or n != per_layer[i - 1]]
        kept = f"; {reduce['name']} keeps {reduce['keep_fraction']:.3g}: " + ", ".join(steps) + " visual tokens"
    elif reduce:
        kept = f"; {reduce['name']} keeps {reduce['keep_fraction']:.3g} -> {report['visual_tokens_llm']} visual tokens into the LLM"
    lines = [
        f"geometry {report['geometry']}: {report['visual_tokens']} visual + {report['text_tokens']} text tokens"
        + (kept if reduce else ""),
        f"layers {report['layers']}  (S active SA, s inactive SA slot, C cross-attention, . text-only); "
        f"active SA slots: {report['active_sa_str']}; CA K/V layout {report['ca_kv_layout']}; "
        f"causal halving {'on' if report['causal_halving'] else 'off'}",
        "",
        f"{'prefill FLOPs per sample':<36}{'VISOR':>14}{'baseline':>14}",
    ]
    for name, label in LINE_LABELS.items():
        if name in ("vision_encoder", "projector"):
            continue
        if visor[name] or base[name]:
            lines.append(f"  {label:<34}{format_flops(visor[name]):>14}{format_flops(base[name]):>14}")
    lines.append(f"  {'LLM total':<34}{format_flops(report['flops']):>14}{format_flops(report['baseline_flops']):>14}"
                 f"   reduction {report['reduction']:.2f}x")
    if reduce:
        lines.append(f"  {'baseline + ' + reduce['name'] + ' (LLM total)':<34}{'':>14}"
                     f"{format_flops(report['reduced_baseline_flops']):>14}   reduction {report['reducer_reduction']:.2f}x")
    if report["crops"] is None:
        lines.append("  vision encoder + projector: not counted (pass --crops N)")
    else:
        for name in ("vision_encoder", "projector"):
            label = f"{LINE_LABELS[name]} ({report['crops']} crops)"
            lines.append(f"  {label:<34}{format_flops(visor[name]):>14}{format_flops(base[name]):>14}")
        lines.append(f"  {'total with vision':<34}{format_flops(visor['total']):>14}{format_flops(base['total']):>14}"
                     f"   reduction {report['reduction_with_vision']:.2f}x")
    lines.append(f"{'decode step ' + str(report['decode_step']) + ' (per sample)':<36}"
                 f"{format_flops(report['decode_flops']):>14}{format_flops(report['baseline_decode_flops']):>14}")
    kv, base_kv = report["kv_cache_bytes"], report["baseline_kv_cache_bytes"]
    lines.append(f"{'KV cache per sample':<36}{format_bytes(kv['total']):>14}{format_bytes(base_kv['total']):>14}"
                 f"   ratio {report['kv_cache_ratio']:.1%}")
    for name in ("self_attention", "ca_visual", "ca_text", "text_only"):
        if kv[name] or base_kv[name]:
            lines.append(f"  {name.replace('_', ' '):<34}{format_bytes(kv[name]):>14}{format_bytes(base_kv[name]):>14}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        report = compute(args)
    except ValueError as err:
        print(f"visor cost: error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(json.dumps(report))
    return 0
