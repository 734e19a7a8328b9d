"""End-to-end cost of a sample that the resolution router sends to the base view (issue 10's per-sample target).

For test items of the procedural benchmark this runs the baseline at full resolution and the VISOR model with each
SA configuration at full resolution and on the base view alone (``visor.model.resolution``), one answer token each
(the costs are prefill costs; the answers are not the point), and reads the harness's per-item FLOPs: the LLM
prefill plus the vision tower and projector on the crops each item encoded. A base-routed item also pays the
routing pass on its base-only layout (``router_overhead_flops``, counted as in ``visor.eval.harness``). The same
decisions are projected to LLaVA-OV-0.5B (``visor.reproduce.projection``: 7,290 visual tokens in 10 crops, or 730
in 1 base-only).

``--mix`` weighs the base-routed configurations as a router chose them (e.g. the resolution variant of
``visor reproduce``: ``--mix none=27``); the saving is reported against the baseline on the same items, and
against VISOR at full resolution without resolution routing: its cheapest configuration (CA-only, a lower bound of
the saving), its maximal one, and (``--routed-from``) the full-resolution router's mean cost as a ``visor
reproduce`` results file records it (its ``visor-routed`` row, over that run's test items).

    python benchmarks/base_routed_cost.py --mix none=27 --routed-from docs/reproduce/reproduce.json \
        --n 50 --out results/base-routed-cost
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_mix(text: str) -> dict[str, int]:
    """``"none=154,1=14"`` -> {"none": 154, "1": 14} (SA configurations as ``visor eval --config`` writes them)."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--mix: {part!r} is not CONFIG=COUNT with a positive count")
        mix[name.strip()] = int(count)
    if not mix:
        raise ValueError("--mix names no configuration")
    return mix


def n_sa(config: str) -> int:
    return 0 if config == "none" else len(config.split("+"))


def weighted(values: dict[str, float], mix: dict[str, int]) -> float:
    return sum(values[c] * k for c, k in mix.items()) / sum(mix.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/visor", help="VISOR checkpoint (default: the shipped one)")
    parser.add_argument("--base", default="checkpoints/base", help="baseline LLaVA-OV checkpoint")
    parser.add_argument("--mix", default="none=27",
                        help="the base-routed configurations and their counts (default: docs/reproduce-res's router)")
    parser.add_argument("--routed-from", default=None, metavar="JSON",
                        help="a `visor reproduce` reproduce.json whose visor-routed row is VISOR routed without "
                             "resolution routing (its mean end-to-end FLOPs, tiny and projected)")
    parser.add_argument("--n", type=int, default=50, help="test items (default 50)")
    parser.add_argument("--out", default=None, help="folder for cost.json and cost.md")
    args = parser.parse_args(argv)

    import torch

    from visor.cli.common import trained_canvas
    from visor.cli.eval import load_for_eval
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.eval.harness import evaluate, synth_items
    from visor.model.resolution import BASE
    from visor.processing.processor import VisorProcessor
    from visor.reproduce.projection import baseline_total_flops, projected_total_flops
    from visor.routing.router import router_overhead_flops, router_settings

    try:
        mix = parse_mix(args.mix)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    canvas = trained_canvas(args.model)
    config = DEFAULT_CONFIG.with_image_size(canvas) if canvas else DEFAULT_CONFIG
    items = synth_items("test", args.n, seed=0, config=config)

    loaded = {folder: (load_for_eval(folder, torch.float32)[0], VisorProcessor.from_pretrained(folder))
              for folder in (args.base, args.model)}

    def mean_costs(folder: str, active_sa=None, resolution=None) -> tuple[float, float, list]:
        model, processor = loaded[folder]
        result = evaluate(model, processor.tokenizer, processor.image_processor, items, active_sa=active_sa, batch_size=10, max_new_tokens=1,
                          progress=False, resolution=resolution)
        rows = result.items
        return (sum(r.llm_flops for r in rows) / len(rows), sum(r.vision_flops or 0.0 for r in rows) / len(rows),
                rows)

    visor = loaded[args.model][0]
    viable = sorted({"+".join(map(str, c)) or "none" for c in (visor.config.viable_configs or [])
                     if not isinstance(c, dict)} | set(mix), key=lambda c: (n_sa(c), c))
    maximal = max(viable, key=n_sa)
    tiny: dict[str, dict] = {"baseline": dict(zip(("llm", "vision"), mean_costs(args.base)[:2]))}
    for name in viable:
        llm, vision, _ = mean_costs(args.model, name, None)
        tiny[f"full:{name}"] = {"llm": llm, "vision": vision}
        llm, vision, rows = mean_costs(args.model, name, BASE)
        routing = (sum(router_overhead_flops(visor, r.visual_tokens, r.text_tokens) for r in rows) / len(rows)
                   if visor.config.router else 0.0)
        tiny[f"base:{name}"] = {"llm": llm + routing, "vision": vision, "routing": routing}
    total = {k: v["llm"] + v["vision"] for k, v in tiny.items()}
    settings = router_settings(visor) if visor.config.router else {"num_tokens": 1, "mlp_hidden": 256}
    router = (int(settings.get("num_tokens", 1)), int(settings.get("mlp_hidden", 256)), 2 * len(viable))
    projected = {"baseline": baseline_total_flops()}
    for name in viable:
        projected[f"full:{name}"] = projected_total_flops(n_sa(name))
        projected[f"base:{name}"] = projected_total_flops(n_sa(name), router=router, resolution="base", on_request=True)

    if args.routed_from:
        rows = {r["key"]: r for r in json.loads(Path(args.routed_from).read_text())["rows"]}
        if "visor-routed" not in rows:
            print(f"--routed-from: {args.routed_from} has no visor-routed row", file=sys.stderr)
            return 2
        total["VISOR routed, full resolution"] = rows["visor-routed"]["mean_total_flops"]
        projected["VISOR routed, full resolution"] = rows["visor-routed"]["projected_total_flops"]
    routed = {"tiny": weighted({c: total[f"base:{c}"] for c in mix}, mix),
              "0.5B": weighted({c: projected[f"base:{c}"] for c in mix}, mix)}
    report = {"items": args.n, "canvas": canvas, "mix": mix, "model": args.model, "base": args.base,
              "tiny_flops": tiny, "tiny_total": total, "projected_total": projected, "base_routed": routed,
              "savings": {geo: {"vs baseline": costs["baseline"] / routed[geo],
                                "vs VISOR full CA-only": costs["full:none"] / routed[geo],
                                f"vs VISOR full maximal ({maximal})": costs[f"full:{maximal}"] / routed[geo],
                                **({"vs VISOR routed without resolution routing":
                                    costs["VISOR routed, full resolution"] / routed[geo]} if args.routed_from else {})}
                          for geo, costs in (("tiny", total), ("0.5B", projected))}}
    lines = [f"End-to-end prefill FLOPs per sample (vision tower + projector + LLM), {args.n} test items, canvas "
             f"{canvas or 'default'} px; base-routed mix {args.mix}"
             + (f"; VISOR routed at full resolution from {args.routed_from}" if args.routed_from else ""), "",
             "| configuration | tiny (GFLOPs) | 0.5B projected (TFLOPs) |", "|---|---|---|"]
    for key in projected:
        lines.append(f"| {key} | {total[key] / 1e9:.3f} | {projected[key] / 1e12:.2f} |")
    lines.append(f"| base-routed mix | {routed['tiny'] / 1e9:.3f} | {routed['0.5B'] / 1e12:.2f} |")
    lines += ["", "| saving of a base-routed sample | tiny | 0.5B projected |", "|---|---|---|"]
    for name in report["savings"]["tiny"]:
        lines.append(f"| {name} | {report['savings']['tiny'][name]:.1f}x | {report['savings']['0.5B'][name]:.1f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost.json").write_text(json.dumps(report, indent=2))
        (out / "cost.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
