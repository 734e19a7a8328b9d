"""``visor train RECIPE.yaml [key=value ...] [--resume]``: run a training recipe (single process or torchrun)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run a training recipe (vision / base / visor-stage1 / visor-stage2)",
        description="Train from a YAML recipe (see recipes/). Launch with torchrun for several processes "
        "(distributed: ddp | fsdp in the recipe). Checkpoints are written atomically every save_every steps "
        "and on exit; --resume continues from the newest complete one.",
    )
    parser.add_argument("recipe", help="YAML recipe file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. optim.lr=3e-4 max_steps=200")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in out_dir")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="device (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    parser.add_argument("--dry-run", action="store_true", help="parse and validate the recipe, print it, and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from visor.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(json.dumps(recipe.to_dict(), indent=2))
        return 0
    from visor.train.loop import Trainer

    final = Trainer(recipe, resume=args.resume, device=args.device, progress=not args.no_progress).train()
    print(json.dumps({"out_dir": recipe.out_dir, "final": str(final) if final else None}))
    return 0
