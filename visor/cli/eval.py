"""``visor eval``: evaluate a checkpoint on the procedural benchmark or a LLaVA-format dataset.

    visor eval --model DIR --data synth --split test --n 200 --out results/
    visor eval --model DIR --data data/synth --sa-count 2 --reduce pooling:2x --out results/
    visor eval --model DIR --data my.jsonl --grader anls --out results/

Model: a LLaVA-OneVision folder is evaluated as the original model (converted with
``LayerPlan.all_self_attention``: every layer self-attention, no cross-attention), so it is the
baseline; a VISOR folder runs as saved, with ``--active-sa`` / ``--sa-count`` choosing its SA slots.

Data: ``synth`` (the procedural benchmark, generated on the fly from ``--split``/``--seed``/``--n``);
a folder written by ``visor data synth`` (its ``{split}.jsonl``); or any LLaVA JSON/JSONL file, whose
items carry a ``grader`` (else ``--grader``), and optionally ``family`` / ``difficulty`` and ``answers`` (a
list of accepted references; default: the first gpt turn); the model is given the turns before the
first gpt turn. Bad input is handled item by item as ``visor.eval.harness`` documents: unreadable items are kept, reported and
counted as 0 (``n_skipped``); an unknown grader or a malformed ``.json`` list stops the run.

Writes ``predictions.jsonl`` (one line per item, in dataset order) and ``summary.json`` to ``--out``,
prints the table and, last, one JSON line (``easy_mean``, ``hard_mean``, ``per_family``, ``n_items``,
``n_skipped``, ``mean_flops``, ...).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

from visor.cli.common import (DTYPES, add_config_choice, add_dtype, add_image_size, print_json_line,
                              resolve_config_choice, synth_config_for)

MAX_REPORTED_PROBLEMS = 20


def register(subparsers) -> None:
    from visor.data.synth.config import FAMILIES, TRAINING_FAMILIES
    from visor.data.synth.seeds import SPLITS
    from visor.data.words import WORDED_FAMILIES
    from visor.eval.graders import grader_names

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint (VISOR or LLaVA-OV) on the procedural benchmark or LLaVA-format data",
        description="Evaluate a VISOR or LLaVA-OneVision checkpoint (a LLaVA-OV folder runs as the original "
        "model, every layer self-attention). Writes predictions.jsonl and summary.json to --out, prints a table "
        "of per-family scores, then one JSON line.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (VISOR or LLaVA-OneVision)")
    parser.add_argument("--data", required=True, metavar="DIR|FILE|synth|words",
                        help="'synth' (procedural benchmark generated on the fly), 'words' (its keyed families "
                             "stated in text, no image: a language pre-training's data, visor.data.words), a folder "
                             "written by 'visor data synth' (reads DIR/{split}.jsonl), or a LLaVA-format "
                             ".json/.jsonl file")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split for synth / a synth folder (default test)")
    parser.add_argument("--n", type=int, default=None, metavar="N",
                        help="items: synth generates N (default 100); a file is cut to its first N records")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="synth: dataset seed (default 0)")
    parser.add_argument("--question-first", action="store_true",
                        help="synth: the question before the image in the prompt (a model trained with "
                             "data.question_first)")
    parser.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                        help=f"only these families (synth: {' '.join(FAMILIES)}, and the training-only "
                             f"{' '.join(TRAINING_FAMILIES)}; words: {' '.join(WORDED_FAMILIES)}; files: their "
                             "'family' field)")
    add_image_size(parser)
    parser.add_argument("--image-root", default=None, metavar="DIR",
                        help="folder image paths are relative to (default: the data file's folder)")
    parser.add_argument("--grader", default="exact", choices=grader_names(),
                        help="grader for items without a 'grader' field (default exact)")
    add_config_choice(parser)
    parser.add_argument("--reduce", default=None, metavar="NAME[:AMOUNT]",
                        help="visual-token reducer passed to generation, e.g. 'pooling:2x', 'visionzip:0.25', 'fastv:0.5'; "
                             "a pre-LLM selector with '@original' (e.g. 'visionzip:0.25@original') keeps each kept "
                             "token's position in the full prompt instead of renumbering (visor.compression.apply)")
    parser.add_argument("--route", action="store_true", help="let the checkpoint's router pick the SA slots per sample")
    parser.add_argument("--budget", type=float, default=None, metavar="LAMBDA",
                        help="router cost bias (implies --route)")
    parser.add_argument("--resolution", choices=["full", "base"], default=None,
                        help="full: base view + anyres tiles (default); base: the base view only, one crop per image "
                             "(visor.model.resolution). A router that picks the resolution does so itself with --route")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, metavar="T", help="answer length limit (default 16)")
    add_dtype(parser, default="fp32")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder (created if missing)")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------- pieces
def load_for_eval(folder: str, dtype):
    """(model, kind): a LLaVA-OV folder as the original model (all self-attention), a VISOR one as saved."""
    from visor.convert.llava_onevision import load_checkpoint

    try:
        return load_checkpoint(folder, dtype)
    except FileNotFoundError as err:
        raise SystemExit(f"visor eval: {err}") from err


def generate_options(args: argparse.Namespace, model) -> dict:
    """``generate_kwargs`` for ``--reduce`` / ``--route``; a clear error where the feature is missing."""
    from visor.model.generation import generate

    params = inspect.signature(generate).parameters
    options = {}
    if args.reduce:
        try:
            from visor.compression import build_reducer
        except ImportError:
            build_reducer = None
        if build_reducer is None or "reducer" not in params:
            raise SystemExit("visor eval: --reduce is not available yet: this version has no visual-token "
                             "reducers wired into generation (visor.compression)")
        try:
            options["reducer"] = build_reducer(args.reduce)
        except (ValueError, TypeError) as err:
            raise SystemExit(f"visor eval: --reduce {args.reduce!r}: {err}") from None
    if args.route or args.budget is not None:
        if not getattr(model.config, "router", None):
            raise SystemExit("visor eval: --route/--budget: this checkpoint has no router "
                             "(train one with `visor route label` + `visor route train`)")
        if "route" not in params:
            raise SystemExit("visor eval: --route is not available yet: generation in this version cannot route")
        options["route"] = True
        if args.budget is not None:
            if "budget" not in params:
                raise SystemExit("visor eval: --budget is not available yet: generation in this version has no budget")
            options["budget"] = args.budget
    return options


def load_items(args: argparse.Namespace) -> tuple[list, dict]:
    """(items, data description) for ``--data``."""
    from visor.eval.harness import UNREADABLE_FAMILY, llava_items, synth_items

    if args.n is not None and args.n < 0:
        raise SystemExit("visor eval: --n must be >= 0")
    if args.data == "words":
        from visor.data.words import WORDED_FAMILIES, worded_eval_items

        bad = sorted(set(args.families or ()) - set(WORDED_FAMILIES))
        if bad:
            raise SystemExit(f"visor eval: unknown worded families {bad}; known: {', '.join(WORDED_FAMILIES)}")
        n = 100 if args.n is None else args.n
        items = worded_eval_items(args.split, n, seed=args.seed, families=args.families)
        return items, {"source": "words", "split": args.split, "seed": args.seed, "n": n, "families": args.families}
    if args.data == "synth":
        from visor.data.synth.config import ALL_FAMILIES

        bad = sorted(set(args.families or ()) - set(ALL_FAMILIES))
        if bad:
            raise SystemExit(f"visor eval: unknown synth families {bad}; known: {', '.join(ALL_FAMILIES)}")
        config = synth_config_for(args.model, args.image_size, "visor eval")
        n = 100 if args.n is None else args.n
        try:
            items = synth_items(args.split, n, seed=args.seed, config=config, families=args.families,
                                question_first=getattr(args, "question_first", False))
        except ValueError as err:  # e.g. an image size too small for the scenes
            raise SystemExit(f"visor eval: cannot generate synth items with {config}: {err}") from None
        return items, {"source": "synth", "split": args.split, "seed": args.seed, "n": n,
                       "families": args.families, "synth_config": config.to_dict(),
                       "question_first": getattr(args, "question_first", False)}
    path = Path(args.data)
    if path.is_dir():
        folder = path
        path = folder / f"{args.split}.jsonl"
        if not path.is_file():
            present = sorted(p.name for p in folder.glob("*.json*") if not p.name.endswith(".meta.json"))
            raise SystemExit(f"visor eval: {folder} has no {path.name} (present: {', '.join(present) or 'none'}); "
                             f"choose --split or give the file")
    elif not path.is_file():
        raise SystemExit(f"visor eval: --data {args.data!r}: no such file or folder (or 'synth')")
    if path.suffix not in (".json", ".jsonl"):
        raise SystemExit(f"visor eval: --data {path}: expected a .json or .jsonl file")
    try:
        items, report = llava_items(path, args.image_root, default_grader=args.grader, limit=args.n,
                                    unknown_grader="error")
    except (ValueError, KeyError) as err:  # malformed .json list, unknown grader, family under two difficulties
        raise SystemExit(f"visor eval: cannot evaluate {path}: {err}") from None
    if args.families:
        wanted = set(args.families)
        # an unreadable record of unknown family stays: it cannot be attributed, and must not vanish
        items = [it for it in items if it.family in wanted or it.family == UNREADABLE_FAMILY]
    return items, {"source": "llava", "path": str(path), "image_root": args.image_root, "default_grader": args.grader,
                   "limit": args.n, "families": args.families, "report": report}


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    import torch

    from visor.eval.harness import evaluate, format_table
    from visor.model.plan import format_slots
    from visor.processing.processor import VisorProcessor

    if args.batch_size < 1:
        raise SystemExit("visor eval: --batch-size must be >= 1")
    if args.max_new_tokens < 1:
        raise SystemExit("visor eval: --max-new-tokens must be >= 1")
    items, data = load_items(args)
    if not items:
        raise SystemExit(f"visor eval: no items to evaluate in {args.data}")
    model, kind = load_for_eval(args.model, DTYPES[args.dtype])
    try:
        active = resolve_config_choice(args, model.plan)
    except ValueError as err:
        raise SystemExit(f"visor eval: {err}") from None
    options = generate_options(args, model)
    device = _device(args.device)
    model.to(device)
    processor = VisorProcessor.from_pretrained(args.model)

    problems = [it for it in items if it.problem is not None]
    for item in problems[:MAX_REPORTED_PROBLEMS]:
        print(f"skipped: {item.problem}", file=sys.stderr)
    if len(problems) > MAX_REPORTED_PROBLEMS:
        print(f"skipped: ... {len(problems) - MAX_REPORTED_PROBLEMS} more (see predictions.jsonl)", file=sys.stderr)
    warned = [it for it in items if it.warning is not None]
    for item in warned[:MAX_REPORTED_PROBLEMS]:
        print(f"warning: {item.id}: {item.warning}", file=sys.stderr)

    start = time.perf_counter()
    routing = {"route": options.pop("route", False), "budget": options.pop("budget", 0.0) or 0.0}
    result = evaluate(model, processor.tokenizer, processor.image_processor, items,
                      active_sa=None if routing["route"] else active, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, progress=not args.no_progress, generate_kwargs=options,
                      **({"resolution": args.resolution} if getattr(args, "resolution", None) and not routing["route"] else {}),
                      **routing)
    seconds = time.perf_counter() - start
    summary = result.summary
    summary.update({
        "model": str(args.model), "model_kind": kind, "plan": model.plan.to_dict(), "active_sa": format_slots(active),
        "reduce": args.reduce, "route": bool(routing["route"]), "budget": args.budget,
        "resolution": getattr(args, "resolution", None) or "full",
        "dtype": args.dtype, "device": str(device), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "data": data, "seconds": round(seconds, 3),
        "items_per_second": round(len(items) / seconds, 3) if seconds > 0 else None,
        "torch_threads": torch.get_num_threads(),
    })
    result.write(args.out)
    title = f"{args.model} ({kind}, SA slots {format_slots(active)}{', reduce ' + args.reduce if args.reduce else ''}) on {args.data}"
    print(format_table(summary, title))
    line = {k: v for k, v in summary.items() if k not in ("data", "plan")}
    line["out"] = str(args.out)
    print_json_line(line)
    return 0
