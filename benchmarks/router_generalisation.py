"""Does a router learn the sample, or only the task family? Held-out label accuracy against a family table.

Fits routers to one labels file (``visor route label`` on training items) and predicts the labels of another
(the same command on validation items). The reference is the family table of the training labels (each family's
most common label): a router whose held-out accuracy and decisions match it has learned the family and nothing
about the item. Variants: the default router (it reads after the layer before the first SA slot), one with more
routing tokens, a wider MLP and more epochs, and one that reads after the last cross-attention layer (its routing
pass runs CA-only through every CA layer, so the token has read the image three times in the tiny plan).

    python benchmarks/router_generalisation.py --model checkpoints/visor --train-labels L_TRAIN --val-labels L_VAL \\
        [--threads 2] [--precision fp32] [--out result.json]

The items are regenerated from the labels' ids (procedural split and seed as labelled: ``--train-split``,
``--val-split``, ``--seed``). Prints one line per router and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LAST_CA = "last cross-attention layer"  # resolved per model: read after the plan's last CA layer (a CA-only pass)
VARIANTS = {"default": {}, "4 tokens, MLP 512, 40 epochs": {"num_tokens": 4, "mlp_hidden": 512, "epochs": 40},
            "reads after the last CA layer": {"read_after_layer": LAST_CA}}


def items_with_labels(path: str, split: str, seed: int, model_dir: str):
    """The procedural items a labels file names, in generation order, and their label indices."""
    from visor.cli.common import synth_config_for
    from visor.eval.harness import synth_items
    from visor.model.resolution import parse_configuration
    from visor.routing.labels import read_labels

    rows = {row["id"]: row for row in read_labels(path)}
    n = max(int(key.rsplit("-", 1)[1]) for key in rows) + 1  # ids end in the item's index
    items = [it for it in synth_items(split, n, seed=seed, config=synth_config_for(model_dir, None, "router_generalisation"))
             if it.id in rows]
    if len(items) != len(rows):
        raise SystemExit(f"{path}: {len(rows) - len(items)} labelled ids are not {split} items of seed {seed}")
    return items, [parse_configuration(rows[it.id]["label"]).label() for it in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="universal VISOR checkpoint the labels were made with")
    parser.add_argument("--train-labels", required=True)
    parser.add_argument("--val-labels", required=True)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="routers to fit (default all)")
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    args = parser.parse_args()

    from visor.data.batch import Batcher, Sample
    from visor.data.tokenizer import load_tokenizer
    from visor.model.modeling import VisorForConditionalGeneration
    from visor.model.resolution import parse_configuration
    from visor.precision import autocast, resolve_precision
    from visor.routing.labels import family_table
    from visor.routing.train import train_router
    from visor.train.models import image_processor_for

    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision)
    train_items, train_labels = items_with_labels(args.train_labels, args.train_split, args.seed, args.model)
    val_items, val_labels = items_with_labels(args.val_labels, args.val_split, args.seed, args.model)
    table = family_table(train_labels, [it.family for it in train_items])
    table_hits = sum(table.get(it.family) == y for it, y in zip(val_items, val_labels))
    result = {"model": args.model, "precision": precision, "n_train": len(train_items), "n_val": len(val_items),
              "family_table": table, "family_table_val_accuracy": table_hits / len(val_items), "routers": {}}
    print(f"family table: held-out label accuracy {100 * result['family_table_val_accuracy']:.1f}% ({table})")
    for name, settings in ((n, VARIANTS[n]) for n in args.variants):
        model = VisorForConditionalGeneration.from_pretrained(args.model).float()
        tokenizer, processor = load_tokenizer(args.model), image_processor_for(model.config)
        configs = [c if isinstance(c, dict) else list(c) for c in model.config.viable_configs]
        names = [parse_configuration(c, model.plan).label() for c in configs]
        if settings.get("read_after_layer") == LAST_CA:
            settings = {**settings, "read_after_layer": max(model.plan.cross_attention_layers)}
        started = time.time()
        fit = train_router(model, tokenizer, processor, train_items, [names.index(y) for y in train_labels], configs,
                           progress=True, autocast=precision == "bf16", **{"epochs": 20, **settings})
        batcher = Batcher.for_model(model, tokenizer, processor)
        predicted = []
        with torch.no_grad(), autocast(precision):
            for start in range(0, len(val_items), 16):
                chunk = val_items[start:start + 16]
                batch = batcher.prompt_batch([Sample(it.images, it.turns) for it in chunk])
                predicted += [parse_configuration(c, model.plan).label() for c in model.route(**batch)]
        row = {"settings": settings, "train_accuracy": fit["history"][-1]["train_accuracy"],
               "reference_accuracy": fit["reference_accuracy"],
               "val_accuracy": sum(p == y for p, y in zip(predicted, val_labels)) / len(val_items),
               "val_agrees_with_family_table": sum(p == table.get(it.family) for p, it in zip(predicted, val_items))
               / len(val_items), "seconds": round(time.time() - started, 1)}
        result["routers"][name] = row
        print(f"{name}: train {100 * row['train_accuracy']:.1f}% (family rule {100 * row['reference_accuracy']['family_majority']:.1f}%), "
              f"held-out {100 * row['val_accuracy']:.1f}%, same decision as the family table on "
              f"{100 * row['val_agrees_with_family_table']:.1f}% ({row['seconds']} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
