"""Per-family answer loss of checkpoints on the procedural validation split: a smoother progress signal than
exact match while a family is still near chance.

For each checkpoint, the mean negative log-likelihood per answer token (reference answer and end token,
teacher-forced, every SA slot active) of ``--n`` validation items, averaged per family
(``visor.eval.likelihood``). A one-digit answer guessed uniformly costs ~1.1 per token (ln 9 or ln 10 for the
digit, ~0 for the end token), a two-digit one (benchmark version 1) ~1.5, a code of 3-5 letters from 10 ~1.8.

    python benchmarks/answer_nll.py WORK_DIR/2-base/run/final:192 WORK_DIR/2b-focus/run/checkpoints/step_00000850:128

Each argument is ``CHECKPOINT[:CANVAS_PX]`` (default canvas: the checkpoint's recipe.json, else 192). Runs in bf16
autocast, one thread by default (beside a training run).
"""

from __future__ import annotations

import argparse
import json

import torch


def family_nll(path: str, canvas: int | None, n: int, seed: int, batch_size: int,
               families: list[str] | None = None) -> dict[str, float]:
    from visor.analysis.common import load
    from visor.cli.common import synth_config_for
    from visor.data.batch import Batcher
    from visor.eval.harness import synth_items
    from visor.eval.likelihood import answer_nll_by_family

    model, tokenizer, image_processor, _ = load(path)  # a LLaVA-OV folder as the original model, VISOR as saved
    items = synth_items("val", n, seed=seed, config=synth_config_for(path, canvas, "answer_nll"), families=families)
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return answer_nll_by_family(model, batcher, items, batch_size=batch_size)["answer_nll"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT[:CANVAS_PX]")
    parser.add_argument("--n", type=int, default=200, help="validation items, families in turn (default 200)")
    parser.add_argument("--families", nargs="+", default=None, help="only these families (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.checkpoints:
        path, _, canvas = spec.partition(":")
        nll = family_nll(path, int(canvas) if canvas else None, args.n, args.seed, args.batch_size, args.families)
        print(json.dumps({"checkpoint": path, "canvas": canvas or None, "n": args.n,
                          "answer_nll": {k: round(v, 3) for k, v in nll.items()}}), flush=True)


if __name__ == "__main__":
    main()
