"""Where does the answer look? Per layer and head, the attention mass on the place a keyed question names.

For the keyed families (``presence``, ``kind_color``, ``doc``, ``chart``) the scene says where the answer is drawn
(``visor.train.lookup.lookup_boxes``: the named shape, the key's document row, the label's chart column). This runs
each test item's prompt with its reference answer (teacher forcing), and at the token that predicts the answer's
first token measures, in every decoder layer and head, the share of attention on those image tokens, with the
hooks the lookup loss trains with (``visor.train.lookup.LookupSupervision``, every head). It also reads whether
that token's greedy prediction is the answer's first token (for the one-token answers of these families, whether
the answer is right).

Per family it prints the first-token accuracy, then per layer the mean mass of the best head and of all heads beside
the *uniform* share (attention spread evenly over the visible tokens would put this much there), and the accuracy of
the items on which the best head puts more than half its attention on the place, against the others.

    python benchmarks/keyed_lookup_attention.py checkpoints-focus5/base --image-size 128 --n 200

``--region answer`` measures the mass on the answer's glyphs only (a document row's value, a bar's printed value)
instead of the whole row or column (``visor.train.lookup.lookup_boxes``).

A presence item whose kind is absent names no place and is skipped. bf16 autocast; one JSON line last.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from visor.train.lookup import KEYED_FAMILIES


def measure(model, batcher, family: str, n: int, config, seed: int = 0, progress: bool = True,
            region: str = "place", question_first: bool = False) -> dict:
    """Masses ``[items, layers, heads]``, first-token correctness ``[items]`` and uniform shares ``[items]`` of the
    first ``n`` test items of ``family`` that name a place."""
    from visor.analysis.common import autocast
    from visor.data.batch import Sample
    from visor.data.synth.generate import generate_item
    from visor.train.lookup import (LookupSupervision, answer_query_positions, batch_lookup_targets,
                                    image_token_targets, lookup_boxes)

    decoder = model.language_model
    lookup = LookupSupervision(decoder, list(range(len(decoder.layers))), decoder.layers[0].self_attn.num_heads)
    vision = model.config.vision_config
    geometry = (vision.image_size, vision.patch_size, model.config.image_grid_pinpoints)
    masses, correct, uniform = [], [], []
    index = 0
    bar = tqdm(total=n, desc=family, disable=not progress, leave=False)
    try:
        while len(correct) < n:
            item = generate_item("test", index, seed=seed, config=config, families=[family])
            index += 1
            boxes = lookup_boxes(item.scene, region)
            if not boxes:
                continue
            sample = Sample([item.image], item.conversations(question_first))  # the prompt as trained, with its answer
            batch = batcher.train_batch([sample])
            targets = image_token_targets(boxes, item.scene["size"], *geometry)
            queries, full = batch_lookup_targets(batch["input_ids"], batch["labels"], model.config.image_token_id,
                                                 [[targets]])
            (position,) = answer_query_positions(batch["labels"][0])
            lookup.arm(queries, full, batch["attention_mask"])
            with torch.no_grad(), autocast("bf16"):
                out = model(**batch)
            _, mass = lookup.take()
            masses.append(mass[:, 0].float())  # [layers, heads]
            (slot,) = (out.text_index[0] == position).nonzero()[:, 0].tolist()  # logits cover the text stream
            correct.append(bool(out.logits[0, slot].argmax() == batch["labels"][0, position + 1]))
            uniform.append(float(full[0].sum()) / (position + 1))
            bar.update(1)
    finally:
        lookup.remove()
        bar.close()
    return {"mass": torch.stack(masses), "correct": torch.tensor(correct), "uniform": torch.tensor(uniform)}


def summarise(result: dict) -> dict:
    """Per layer: the best head (by mean mass), its mean mass, the mean over heads, and the accuracy of the items
    on which that head puts more / not more than half its attention on the place."""
    mass, correct = result["mass"], result["correct"].float()
    layers = []
    for layer in range(mass.shape[1]):
        per_head = mass[:, layer].mean(0)
        best = int(per_head.argmax())
        focused = mass[:, layer, best] > 0.5
        layers.append({"layer": layer, "best_head": best, "best_head_mass": float(per_head[best]),
                       "mean_mass": float(per_head.mean()), "focused_share": float(focused.float().mean()),
                       "accuracy_focused": float(correct[focused].mean()) if focused.any() else None,
                       "accuracy_unfocused": float(correct[~focused].mean()) if (~focused).any() else None})
    return {"n": len(correct), "accuracy": float(correct.mean()), "uniform": float(result["uniform"].mean()),
            "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a LLaVA-OV or VISOR checkpoint folder (every layer self-attention)")
    parser.add_argument("--families", nargs="+", choices=KEYED_FAMILIES, default=list(KEYED_FAMILIES))
    parser.add_argument("--n", type=int, default=100, help="items per family that name a place")
    parser.add_argument("--image-size", type=int, default=None,
                        help="synth canvas in px (default: the benchmark's; 128 for the shipped models)")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the test items")
    parser.add_argument("--region", choices=("place", "answer"), default="place",
                        help="place: the named shape, document row or chart column; answer: the value's glyphs only")
    parser.add_argument("--question-first", action="store_true",
                        help="the question before the image in the prompt (a model trained with data.question_first)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from visor.analysis.common import load
    from visor.data.batch import Batcher
    from visor.data.synth.config import DEFAULT_CONFIG

    model, tokenizer, processor, _ = load(args.checkpoint)
    if model.plan.cross_attention_layers or len(model.plan.self_attention_layers) != model.plan.num_layers:
        raise SystemExit("the answer's attention to the image is measured on a model whose every layer is "
                         "self-attention (a LLaVA-OV baseline)")
    config = DEFAULT_CONFIG.with_image_size(args.image_size) if args.image_size else DEFAULT_CONFIG
    batcher = Batcher.for_model(model, tokenizer, processor)
    report = {}
    for family in args.families:
        summary = summarise(measure(model, batcher, family, args.n, config, args.seed, region=args.region,
                                            question_first=args.question_first))
        report[family] = summary
        print(f"{family}: first-token accuracy {100 * summary['accuracy']:.1f}% on {summary['n']} items; uniform "
              f"share on the named place {100 * summary['uniform']:.1f}%")
        for row in summary["layers"]:
            split = "  ".join(f"{name} {'-' if row[key] is None else f'{100 * row[key]:.0f}%'}"
                              for name, key in (("acc focused", "accuracy_focused"), ("unfocused", "accuracy_unfocused")))
            print(f"  layer {row['layer']}: best head {row['best_head']} {100 * row['best_head_mass']:5.1f}%  "
                  f"all heads {100 * row['mean_mass']:5.1f}%  focused (>50%) on {100 * row['focused_share']:3.0f}% "
                  f"of items  {split}")
    print(json.dumps({"checkpoint": args.checkpoint, "image_size": config.image_size, "n": args.n,
                      "seed": args.seed, "region": args.region, "question_first": args.question_first, "families": report}))


if __name__ == "__main__":
    main()
