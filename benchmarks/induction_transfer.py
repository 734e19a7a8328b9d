"""Does a fresh tiny language model form the copying circuit, and does it then answer key/value recall?

The tiny baselines never learned a lookup by content, in images or in words (``docs/training-log.md``). This
trains a fresh language model (the checkpoint's architecture and tokenizer, ``visor.train.models.
fresh_language_model``) on raw token sequences, no chat template, with one of two tasks, and measures both:

* ``induction``: a random sequence of 8-30 tokens, ".", the same sequence again; the loss is on the second copy
  after its first token (each is found by matching the token before it in the first copy);
* ``mqar`` (multi-query associative recall): 2-12 key/value pairs of random tokens, ".", then every key again in
  a random order, each followed by its value; the loss is on the values.

Tokens are drawn from every word and character piece of the tokenizer (no byte pieces, no special tokens).
Evaluation: next-token accuracy on the target positions of 256 fixed held-out sequences of each task.

    python benchmarks/induction_transfer.py checkpoints-focus5/base --task induction --steps 1000 \\
        --out runs/induction

``--keep-weights`` continues the checkpoint's own language model instead (a curriculum: induction, then mqar on
its export). Rows go to ``OUT/metrics.jsonl`` (rewritten at the start of a run); one JSON line last. ``--save``
exports the trained model to ``OUT/final`` (LLaVA-OV format), so a base recipe can continue it (``init=OUT/final``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

TASKS = ("induction", "mqar")


def token_pool(tokenizer) -> list[int]:
    """Every word and character piece: ids above the special tokens, no ``<0xNN>`` byte pieces."""
    special = set(tokenizer.all_special_ids)
    return sorted(i for piece, i in tokenizer.get_vocab().items()
                  if i not in special and not piece.startswith("<0x") and not piece.startswith("<|"))


def induction_sequence(rng: random.Random, pool: list[int], separator: int) -> tuple[list[int], list[int]]:
    """``(ids, labels)``: a random sequence, the separator, the sequence again; labels on the second copy after
    its first token (-100 elsewhere), aligned with ``ids`` (the model shifts them)."""
    words = [rng.choice(pool) for _ in range(rng.randint(8, 30))]
    ids = words + [separator] + words
    labels = [-100] * (len(words) + 2) + words[1:]
    return ids, labels


def mqar_sequence(rng: random.Random, pool: list[int], separator: int) -> tuple[list[int], list[int]]:
    """``(ids, labels)``: key/value pairs, the separator, every key again followed by its value (labelled)."""
    n = rng.randint(2, 12)
    tokens = rng.sample(pool, 2 * n)
    keys, values = tokens[:n], tokens[n:]
    ids = [t for pair in zip(keys, values) for t in pair] + [separator]
    labels = [-100] * len(ids)
    for j in rng.sample(range(n), n):
        ids += [keys[j], values[j]]
        labels += [-100, values[j]]
    return ids, labels


SEQUENCES = {"induction": induction_sequence, "mqar": mqar_sequence}


def pad(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` of a list of ``(ids, labels)``."""
    length = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": torch.zeros(len(rows), length, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
             "labels": torch.full((len(rows), length), -100, dtype=torch.long)}
    for row, (ids, labels) in enumerate(rows):
        batch["input_ids"][row, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, :len(ids)] = 1
        batch["labels"][row, :len(labels)] = torch.tensor(labels)
    return batch


@torch.no_grad()
def target_accuracy(model, batches: list[dict], precision: str) -> float:
    """Next-token accuracy at the labelled positions of ``batches``."""
    from visor.precision import autocast

    model.eval()
    hits = total = 0
    for batch in batches:
        with autocast(precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        where = targets != -100
        hits += int((logits.argmax(-1)[where] == targets[where]).sum())
        total += int(where.sum())
    model.train()
    return hits / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a LLaVA-OV checkpoint: its architecture and tokenizer (weights re-drawn "
                                           "unless --keep-weights)")
    parser.add_argument("--keep-weights", action="store_true",
                        help="continue the checkpoint's language model instead of a fresh one (a curriculum: e.g. "
                             "mqar on an earlier run's --save export)")
    parser.add_argument("--task", choices=TASKS, default="induction", help="what the model trains on")
    parser.add_argument("--recipe", default="recipes/base-tiny-focus5.yaml")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--n-eval", type=int, default=256, help="held-out sequences per task")
    parser.add_argument("--precision", default="fp32", choices=["bf16", "fp32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="folder for metrics.jsonl")
    parser.add_argument("--save", action="store_true",
                        help="export the trained model to OUT/final in LLaVA-OV format (a base recipe can continue it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from visor.precision import autocast
    from visor.train.loop import Trainer
    from visor.train.models import fresh_language_model
    from visor.train.plain import PlainTraining
    from visor.train.recipe import load_recipe

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").write_text("")
    recipe = load_recipe(args.recipe, [f"init={args.checkpoint}", "reducers=null", "freeze_vision=true",
                                       f"precision={args.precision}"])
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(dataclasses.replace(recipe, out_dir=scratch), progress=False)
        trainer.build()
    model, tokenizer = trainer.model, trainer.tokenizer
    torch.manual_seed(args.seed)
    if not args.keep_weights:
        fresh_language_model(model)
    model.train()
    pool, separator = token_pool(tokenizer), tokenizer.convert_tokens_to_ids(".")
    held_out = {}
    for k, task in enumerate(TASKS):
        rng = random.Random(f"held-out-{args.seed}-{k}")
        rows = [SEQUENCES[task](rng, pool, separator) for _ in range(args.n_eval)]
        held_out[task] = [pad(rows[i:i + 32]) for i in range(0, len(rows), 32)]
    training = PlainTraining(model.parameters(), args.lr, args.steps, args.warmup, betas=(0.9, 0.98))
    rng = random.Random(f"train-{args.seed}")
    rows, start = [], time.time()
    bar = tqdm(range(args.steps), desc=f"{args.task}, {'continued' if args.keep_weights else 'fresh'} language model")
    for step in bar:
        batch = pad([SEQUENCES[args.task](rng, pool, separator) for _ in range(args.batch)])
        with autocast(args.precision):
            loss = model(**batch).loss
        training.step(loss)
        bar.set_postfix(loss=f"{training.mean_loss(10):.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row = {"step": step + 1, "train_task": args.task, "loss": training.mean_loss(args.eval_every),
                   **{f"{task}_accuracy": target_accuracy(model, held_out[task], args.precision) for task in TASKS},
                   "seconds": round(time.time() - start, 1)}
            rows.append(row)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            tqdm.write(f"step {step + 1:>5}  loss {row['loss']:.3f}  " + "  ".join(
                f"{task} {100 * row[f'{task}_accuracy']:.1f}%" for task in TASKS))
    if args.save:
        from visor.train.models import export_llava_onevision

        export_llava_onevision(model.eval(), out_dir / "final", tokenizer, trainer.image_processor)
    print(json.dumps({"checkpoint": args.checkpoint, "keep_weights": args.keep_weights, "task": args.task,
                      "steps": args.steps, "batch": args.batch, "lr": args.lr, "pool": len(pool), "rows": rows}))


if __name__ == "__main__":
    main()
