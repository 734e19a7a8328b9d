"""Do pre-LLM token selectors lose the easy families through the positions they give the kept tokens?

A pre-LLM selector (VisionZip, VisPruner, HiRED) hands the LLM a shorter prompt with contiguous positions, as the
methods' own code does (``visor.compression.apply``): a kept token's place in the image survives only in its
features. This diagnostic scores the same test items three ways, teacher-forced (``visor.eval.likelihood``):

- ``full``: every visual token;
- ``contiguous``: the selector's kept tokens at contiguous positions (what ``visor eval --reduce`` runs);
- ``original``: the same kept tokens and features, each at the position it had in the full prompt (the text after
  the image too), so RoPE still tells the LLM where in the image each kept token was.

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


def _answer_probs(out, labels: torch.Tensor) -> list[float]:
    """``exp(mean log-prob)`` of each row's labelled tokens (``visor.eval.likelihood``'s rule)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    index = out.text_index.clamp(min=0)
    targets = torch.where(out.text_index >= 0, shifted.gather(1, index), torch.full_like(index, -100))
    logp = torch.log_softmax(out.logits.float(), -1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    valid = targets != -100
    return torch.exp((picked * valid).sum(1) / valid.sum(1).clamp(min=1)).tolist()


def original_positions(batch: dict, reduction, image_token_id: int) -> torch.Tensor:
    """Positions for the shortened prompt of ``reduction`` that each token had in the full prompt of ``batch``
    (one image per sample: the procedural benchmark's)."""
    counts = batch.get("batch_num_images")
    if counts is not None and any(int(n) != 1 for n in counts):
        raise ValueError("one image per sample only")
    full_pos = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    source = reduction.source_index
    pos = torch.where(source >= 0, full_pos.gather(1, source.clamp(min=0)), torch.zeros_like(source))
    for b, image in enumerate(reduction.reduced):
        if image.kept is None:
            raise ValueError("this reducer resamples tokens: they have no original position")
        full_slots = (batch["input_ids"][b] == image_token_id).nonzero()[:, 0]
        short_slots = (reduction.input_ids[b] == image_token_id).nonzero()[:, 0]
        pos[b, short_slots] = full_pos[b, full_slots[image.kept]]  # kept: indices into the image's full sequence
    return pos


@torch.no_grad()
def score(model, batcher, items, reducer_spec: str, batch_size: int) -> dict[str, dict[str, list[float]]]:
    """Per mode and family: each item's reference-answer probability, and for choice families 1.0 if the reference
    is the most probable candidate."""
    from visor.compression.apply import apply_pre_llm
    from visor.compression.registry import build_reducer
    from visor.data.batch import Sample

    reducer = build_reducer(reducer_spec)
    if reducer.stage != "pre_llm":
        raise SystemExit(f"{reducer_spec} is not a pre-LLM selector")
    image_token_id = model.config.image_token_id
    prob: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    right: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    from tqdm.auto import tqdm

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
        results = {"full": model(**batch)}
        results["contiguous"] = model(**batch, reducer=reducer)
        reduction = apply_pre_llm(model, reducer, batch["input_ids"], batch["attention_mask"], None, batch["labels"],
                                  batch["pixel_values"], batch["image_sizes"], batch.get("batch_num_images"),
                                  image_tiled=batch.get("image_tiled"))
        results["original"] = model(input_ids=reduction.input_ids, attention_mask=reduction.attention_mask,
                                    position_ids=original_positions(batch, reduction, image_token_id),
                                    labels=reduction.labels, image_features=reduction.image_features,
                                    batch_num_images=batch.get("batch_num_images"))
        for mode, out in results.items():
            labels = batch["labels"] if mode != "original" else reduction.labels
            p = _answer_probs(out, labels)
            first = {}
            for row, i in enumerate(owner):
                first.setdefault(i, row)
            for i, item in enumerate(chunk):
                rows_i = [r for r, o in enumerate(owner) if o == i]
                prob[mode][item.family].append(p[first[i]])
                if item.family in CHOICES:
                    right[mode][item.family].append(float(max(rows_i, key=lambda r: p[r]) == first[i]))
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
