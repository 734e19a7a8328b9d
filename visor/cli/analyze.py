"""``visor analyze``: the paper's analysis tools on any LLaVA-OV or VISOR checkpoint and dataset.

    visor analyze --model DIR                                  # all three on 100 procedural test items
    visor analyze --model DIR --what cka --data my.jsonl --n 200 --out results/analyze

Writes ``attention.csv/.png`` (per-layer share of attention from question and answer tokens to image
tokens), ``cka.csv/.png`` (linear CKA of visual states between layers, per family) and
``layer_drop.csv/.png`` (accuracy with the image removed from groups of layers) to ``--out``
(``visor.analysis``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visor.cli.common import add_image_size, print_json_line, synth_config_for

TOOLS = ("attention", "cka", "layer-drop")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="attention share to image tokens per layer, CKA of visual states, layer dropping (CSV + PNG each)",
        description="The paper's analysis tools on a LLaVA-OneVision folder (the original model, every layer "
        "self-attention) or a VISOR folder (its active SA slots: --active-sa, default all).",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (LLaVA-OV or VISOR)")
    parser.add_argument("--data", default="synth", metavar="synth|FILE", help="'synth' (procedural) or a LLaVA JSON/JSONL file")
    parser.add_argument("--image-root", default=None, metavar="DIR", help="image folder for --data files")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="synth split (default test)")
    parser.add_argument("--n", type=int, default=100, metavar="N", help="items (default 100)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="synth seed (default 0)")
    parser.add_argument("--families", nargs="+", default=None, metavar="FAMILY", help="only these families")
    add_image_size(parser)
    parser.add_argument("--what", nargs="+", choices=TOOLS, default=list(TOOLS), help="which tools (default all)")
    parser.add_argument("--active-sa", default=None, metavar="SLOTS", help="VISOR: active SA slots ('0+2', 'none'; default all)")
    parser.add_argument("--group-size", type=int, default=None, metavar="G",
                        help="layer-drop: layers per dropped group (default ceil(L/4))")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B", help="layer-drop evaluation batch (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=16, metavar="T", help="layer-drop answer length (default 16)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="CPU autocast (default fp32)")
    parser.add_argument("--threads", type=int, default=None, metavar="T", help="torch threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="results/analyze", metavar="DIR", help="output folder (default results/analyze)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from visor.analysis.common import items_from, load

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer, processor, kind = load(args.model)
    except FileNotFoundError as err:
        raise SystemExit(f"visor analyze: {err}") from err
    active = model.plan.resolve_active(args.active_sa) if args.active_sa is not None else None
    synth = synth_config_for(args.model, args.image_size, "visor analyze") if args.data == "synth" else None
    items = items_from(args.data, args.split, args.n, args.seed, args.families, args.image_root, synth)
    if not items:
        raise SystemExit("visor analyze: no usable item in --data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    common = dict(active_sa=active, precision=args.precision, progress=progress)
    summary: dict = {"model": args.model, "kind": kind, "plan": model.plan.describe(active), "n_items": len(items),
                     "synth_image_size": synth.image_size if synth else None}
    if "attention" in args.what:
        from visor.analysis.attention import run_attention

        result = run_attention(model, tokenizer, processor, items, out, **common)
        summary["attention"] = result["curves"]
        print("attention to image tokens per layer (%):")
        for name, values in result["curves"].items():
            print(f"  {name:<16} " + " ".join(f"{100 * v:5.1f}" for v in values.values()))
    if "cka" in args.what:
        from visor.analysis.cka import run_cka

        result = run_cka(model, tokenizer, processor, items, out, **common)
        names = result["names"] or []
        print(f"CKA with the LLM's input visual states ({', '.join(names)}):")
        for family, matrix in sorted(result["families"].items()):
            print(f"  {family:<12} {result['difficulty'][family]:<5} " + " ".join(f"{v:5.2f}" for v in matrix[0]))
        summary["cka_first_row"] = {f: m[0] for f, m in result["families"].items()}
    if "layer-drop" in args.what:
        from visor.analysis.layer_drop import run_layer_drop

        result = run_layer_drop(model, tokenizer, processor, items, out, group_size=args.group_size,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, **common)
        print("layer dropping (easy / hard accuracy, %):")
        for name, s in result["summaries"].items():
            print(f"  {name:<10} {100 * (s['easy_mean'] or 0):5.1f} / {100 * (s['hard_mean'] or 0):5.1f}")
        summary["layer_drop"] = {k: {m: v[m] for m in ("easy_mean", "hard_mean")} for k, v in result["summaries"].items()}
    (out / "analyze.json").write_text(json.dumps(summary, indent=2, default=str))
    print_json_line({"out": str(out), "files": sorted(p.name for p in out.iterdir() if p.suffix in (".csv", ".png"))})
    return 0
