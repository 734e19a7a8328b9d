"""``visor data``: dataset tools. ``visor data synth`` writes the procedural benchmark in LLaVA format.

``visor data tokenizer --out DIR`` saves the small benchmark tokenizer (``visor.data.tokenizer``).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="dataset tools (procedural benchmark, tokenizer)",
                                   description="Dataset tools.")
    verbs = parser.add_subparsers(dest="data_verb", metavar="SUBVERB")
    verbs.required = True

    from visor.data.synth.config import ALL_FAMILIES, FAMILIES, TRAINING_FAMILIES
    from visor.data.synth.seeds import MAX_SEED, SPLITS

    synth = verbs.add_parser(
        "synth",
        help="generate the procedural easy/hard benchmark as LLaVA JSONL + PNGs",
        description="Generate N items of one split of the procedural benchmark into DIR: DIR/{split}.jsonl "
                    "(LLaVA conversation format), DIR/images/{split}/*.png and DIR/{split}.meta.json. "
                    "The same split, seed, N, families and sizes give byte-identical files.",
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    synth.add_argument("--split", required=True, choices=SPLITS,
                       help="which split; splits never share an item seed nor a handwriting scan")
    synth.add_argument("--n", required=True, type=int, metavar="N", help="number of items to write")
    synth.add_argument("--seed", type=int, default=0, metavar="S",
                       help=f"user seed in [0, {MAX_SEED}) (default 0); items are seeded by (split, seed, index)")
    synth.add_argument("--families", nargs="+", choices=ALL_FAMILIES, default=None, metavar="FAMILY",
                       help=f"families to generate, round robin (default all: {' '.join(FAMILIES)}; "
                            f"training only, when named: {' '.join(TRAINING_FAMILIES)})")
    synth.add_argument("--image-size", type=int, default=None, metavar="PX",
                       help="image side in pixels (default 192); large shapes scale with it, small print does not "
                            "(SynthConfig.with_image_size)")
    synth.add_argument("--config", default=None, metavar="JSON",
                       help="JSON file of SynthConfig fields overriding the defaults (applied before --image-size)")
    synth.add_argument("--no-scene", action="store_true",
                       help="leave the scene description out of the JSONL records")
    synth.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    synth.set_defaults(func=run_synth)

    tok = verbs.add_parser(
        "tokenizer",
        help="save the small Qwen2-style benchmark tokenizer (Hugging Face format)",
        description="Build the benchmark tokenizer (visor.data.tokenizer) and save it with save_pretrained.",
    )
    tok.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    tok.set_defaults(func=run_tokenizer)


def run_synth(args: argparse.Namespace) -> int:
    from visor.data.synth.config import SynthConfig
    from visor.data.synth.generate import write_split

    config = SynthConfig()
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            config = SynthConfig.from_dict(json.load(fh))
    if args.image_size is not None:
        config = config.with_image_size(args.image_size)
    if args.n < 0:
        raise SystemExit("--n must be >= 0")
    path = write_split(args.out, args.split, args.n, seed=args.seed, config=config, families=args.families,
                       include_scene=not args.no_scene, progress=not args.no_progress)
    print(json.dumps({"jsonl": str(path), "split": args.split, "n": args.n, "seed": args.seed}))
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from visor.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "vocab_size": len(tok)}))
    return 0
