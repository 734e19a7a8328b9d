"""``visor configs``: choose the viable active configurations of a stage-1 VISOR checkpoint."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from visor.cli.common import add_image_size, print_json_line, synth_config_for


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "configs",
        help="score SA-slot subsets on validation data and write the viable set into the checkpoint",
        description="Evaluate candidate active configurations of a VISOR checkpoint on validation data and "
        "record the viable set (nested and greedy by default) and the slot order in its config.json. Stage 2 "
        "samples from this set.",
    )
    parser.add_argument("--model", required=True, help="VISOR checkpoint folder (e.g. a stage-1 run's final/)")
    parser.add_argument("--out", default=None, help="write the updated checkpoint here (default: update --model in place)")
    parser.add_argument("--mode", choices=["nested", "exhaustive"], default="nested",
                        help="nested: greedy chain of slot sets (default); exhaustive: every subset, Pareto front")
    parser.add_argument("--data", default="synth", help="'synth' (procedural validation split) or a LLaVA-format JSON/JSONL file")
    parser.add_argument("--image-root", default=None, help="image folder for --data files")
    parser.add_argument("--n", type=int, default=200, help="validation items (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="procedural dataset seed (default 0)")
    add_image_size(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--resolutions", default=None, metavar="LIST",
                        help="also search the input resolution (visor.model.resolution): e.g. 'full,base' scores every "
                             "candidate at each and writes configurations with a resolution (default: full only)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from visor.data.tokenizer import load_tokenizer
    from visor.eval.harness import llava_items, synth_items
    from visor.model.modeling import VisorForConditionalGeneration
    from visor.train.configs import search_configs, write_viable
    from visor.train.models import image_processor_for

    if args.threads:
        torch.set_num_threads(args.threads)
    model = VisorForConditionalGeneration.from_pretrained(args.model)
    tokenizer = load_tokenizer(args.model)
    image_processor = image_processor_for(model.config)
    if args.data == "synth":
        items = synth_items("val", args.n, seed=args.seed,
                            config=synth_config_for(args.model, args.image_size, "visor configs"))
    else:
        items = llava_items(args.data, args.image_root)[0][: args.n]
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()] if args.resolutions else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        search = search_configs(model, tokenizer, image_processor, items, mode=args.mode, batch_size=args.batch_size,
                                resolutions=resolutions)
    write_viable(model, search)
    out = Path(args.out or args.model)
    if out != Path(args.model):
        shutil.copytree(args.model, out, dirs_exist_ok=True)
    model.save_pretrained(str(out))
    print(search.table())
    print_json_line({
        "out": str(out), "viable": list(model.config.viable_configs), "slot_order": search.slot_order,
        "scores": {(c.label() if hasattr(c, "label") else "+".join(map(str, c)) or "none"): s["score"]
                   for c, s in search.scores.items()},
    })
    return 0
