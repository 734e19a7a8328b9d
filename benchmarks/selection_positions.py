"""Do pre-LLM token selectors lose the easy families through the positions they give the kept tokens?

A pre-LLM selector (VisionZip, VisPruner, HiRED) hands the LLM a shorter prompt with contiguous positions, as the
methods' own code does (``visor.compression.apply``): a kept token's place in the image survives only in its
features. This diagnostic scores the same test items three ways, teacher-forced (``visor.eval.likelihood``'s rule):

- ``full``: every visual token;
- ``contiguous``: the selector's kept tokens at contiguous positions (what ``visor eval --reduce`` runs);
- ``original``: the same kept tokens and features, each at the position it had in the full prompt (the text after
  the image too: ``NAME:AMOUNT@original``), so RoPE still tells the LLM where in the image each kept token was.

Per family it prints the answer loss per token and, for the families whose answer is one of a few words, the choice
accuracy (the candidate answer with the highest teacher-forced probability). If ``original`` recovers what
``contiguous`` loses, the loss is the positions, not the dropped content.

    python benchmarks/selection_positions.py checkpoints/base --reduce visionzip:0.227 --n 400

bf16 autocast; one thread by default.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import torch

CHOICES = {"side": ["left", "right"], "presence": ["yes", "no"]}


@torch.no_grad()
def score(model, batcher, items, reducer_spec: str, batch_size: int) -> dict[str, dict[str, list[float]]]:
    """Per mode and family: each item's reference-answer probability, and for choice families 1.0 if the reference
    is the most probable candidate."""
    from tqdm.auto import tqdm

    from visor.compression.registry import build_reducer
    from visor.data.batch import Sample
    from visor.eval.likelihood import labelled_probabilities

    reducers = {"full": None, "contiguous": build_reducer(reducer_spec)}
    if reducers["contiguous"].stage != "pre_llm" or not reducers["contiguous"].keeps_token_places:
        raise SystemExit(f"{reducer_spec} is not a pre-LLM selector")
    reducers["original"] = build_reducer(reducer_spec).with_positions("original")
    prob: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    right: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    for start in tqdm(range(0, len(items), batch_size), desc=reducer_spec, unit="batch"):
        chunk = items[start:start + batch_size]
        candidates = [CHOICES.get(item.family, [item.answers[0]]) for item in chunk]
        # every candidate answer of every item, the reference first
        rows, owner = [], []
        for i, (item, cands) in enumerate(zip(chunk, candidates)):
            ordered = [item.answers[0]] + [c for c in cands if c != item.answers[0]]
            for c in ordered:
                rows.append(Sample(item.images, list(item.turns) + [{"from": "gpt", "value": c}]))
                owner.append(i)
        batch = batcher.train_batch(rows)
        rows_of = [[r for r, o in enumerate(owner) if o == i] for i in range(len(chunk))]  # the reference's first
        for mode, reducer in reducers.items():
            p = labelled_probabilities(model(**batch, reducer=reducer), batch["labels"])
            for item, item_rows in zip(chunk, rows_of):
                prob[mode][item.family].append(p[item_rows[0]])
                if item.family in CHOICES:
                    right[mode][item.family].append(float(max(item_rows, key=lambda r: p[r]) == item_rows[0]))
    return {"prob": prob, "choice": right}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--reduce", default="visionzip:0.227", help="pre-LLM selector NAME:AMOUNT")
    parser.add_argument("--n", type=int, default=400, help="test items, families in turn (default 400)")
    parser.add_argument("--families", nargs="+", default=["color", "shape", "count", "presence", "side"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from visor.analysis.common import load
    from visor.cli.common import synth_config_for
    from visor.data.batch import Batcher
    from visor.eval.harness import synth_items

    model, tokenizer, image_processor, _ = load(args.checkpoint)
    items = synth_items("test", args.n, seed=args.seed, config=synth_config_for(args.checkpoint, None, "selection_positions"),
                        families=args.families)
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = score(model, batcher, items, args.reduce, args.batch_size)
    report = {"checkpoint": args.checkpoint, "reduce": args.reduce, "n": len(items), "seed": args.seed,
              "answer_nll": {}, "choice_accuracy": {}}
    print(f"{'family':10} " + " ".join(f"{m + ' nll':>15}" for m in ("full", "contiguous", "original"))
          + "   " + " ".join(f"{m + ' acc':>15}" for m in ("full", "contiguous", "original")))
    for family in args.families:
        nll = {m: sum(-math.log(max(p, 1e-12)) for p in scores["prob"][m][family]) / max(len(scores["prob"][m][family]), 1)
               for m in ("full", "contiguous", "original")}
        acc = {m: 100 * sum(v) / len(v) for m in ("full", "contiguous", "original")
               if (v := scores["choice"][m].get(family))}
        report["answer_nll"][family] = {m: round(v, 3) for m, v in nll.items()}
        if acc:
            report["choice_accuracy"][family] = {m: round(v, 1) for m, v in acc.items()}
        print(f"{family:10} " + " ".join(f"{nll[m]:15.3f}" for m in nll) + "   "
              + " ".join(f"{acc[m]:15.1f}" for m in acc))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
