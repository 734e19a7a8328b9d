"""Training throughput of the tiny recipes on this machine: samples/s, bf16 autocast vs fp32.

Runs a few optimiser steps of each recipe kind (vision, base, visor-stage1, visor-stage2) with random
weights at the recipes' real geometry, alternating bf16 and fp32 within one process so both see the
same machine state, after a warm-up step. Prints a table and, last, one JSON line.

    python benchmarks/train_throughput.py [--steps 3] [--threads 2] [--kinds base vision]

``--compare padding`` instead times bf16 steps on the training batches as built (right-padded, so the
decoder's causal attention runs without a mask) against the same rows left-padded (masked attention).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_trainer(kind: str, precision: str, work: Path, base_dir: Path | None, stage1_dir: Path | None):
    from visor.train.loop import Trainer
    from visor.train.recipe import load_recipe

    recipe_file = {"vision": "vision-tiny", "base": "base-tiny", "visor-stage1": "visor-stage1-tiny",
                   "visor-stage2": "visor-stage2-tiny"}[kind]
    overrides = [f"out_dir={work / kind / precision}", f"precision={precision}", "vision_init=null"]
    if kind == "visor-stage1":
        overrides.append(f"init={base_dir}")
    if kind == "visor-stage2":
        overrides.append(f"init={stage1_dir}")
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_file}.yaml", overrides)
    recipe.threads = None
    trainer = Trainer(recipe, progress=False)
    trainer.build()
    return trainer


def left_padded(batch: dict) -> dict:
    """The same rows with their padding moved to the front (labels follow their tokens)."""
    mask = batch["attention_mask"].bool()
    order = torch.argsort(mask.int(), dim=1, stable=True)  # padding first, real tokens in order
    return {**batch, **{k: batch[k].gather(1, order) for k in ("input_ids", "attention_mask", "labels")}}


def time_steps(trainer, steps: int, relayout=None) -> list[float]:
    """Seconds per optimiser step (data generation included), after one warm-up step."""
    from visor.train.loop import _autocast, micro_indices

    recipe, env = trainer.recipe, trainer.env
    accum = recipe.accumulation_steps(env.world_size)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        batches = [trainer.task.batch(micro_indices(recipe, step, a, env)) for a in range(accum)]
        if relayout is not None:
            batches = [relayout(b) for b in batches]
        tokens = sum(trainer.task.count(b) for b in batches)
        trainer.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            with _autocast(recipe, env):
                loss, _ = trainer.task.loss(trainer.model, batch, step)
            (loss / max(tokens, 1)).backward()
        trainer.optimizer.step()
        if step > 0:
            times.append(time.perf_counter() - start)
    return times


def compare_padding(kind: str, work: Path, base_dir, stage1_dir, steps: int) -> dict:
    trainer = build_trainer(kind, "bf16", work, base_dir, stage1_dir)
    times = {"right": [], "left": []}
    for layout in ("right", "left", "right", "left"):  # interleaved
        times[layout].extend(time_steps(trainer, max(1, steps // 2), None if layout == "right" else left_padded))
    batch = trainer.recipe.global_batch
    row = {"kind": kind, "global_batch": batch, "precision": "bf16"}
    for layout, values in times.items():
        row[f"{layout}_padded_samples_per_s"] = batch / statistics.median(values)
    row["right_over_left"] = row["right_padded_samples_per_s"] / row["left_padded_samples_per_s"]
    print(f"{kind:<14} batch {batch:>3}  bf16  right-padded {row['right_padded_samples_per_s']:7.2f} samples/s  "
          f"left-padded {row['left_padded_samples_per_s']:7.2f} samples/s  right/left {row['right_over_left']:.2f}x", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps per recipe and precision")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--kinds", nargs="+", default=["vision", "base", "visor-stage1", "visor-stage2"])
    parser.add_argument("--compare", choices=["precision", "padding"], default="precision",
                        help="bf16 vs fp32 (default), or right- vs left-padded batches in bf16")
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_dir = stage1_dir = None
        if {"visor-stage1", "visor-stage2"} & set(args.kinds):
            from visor.train import models

            trainer = build_trainer("base", "fp32", work, None, None)
            base_dir = work / "base-export"
            models.export_llava_onevision(trainer.model, base_dir, trainer.tokenizer, trainer.image_processor)
            from visor.model.modeling import VisorForConditionalGeneration

            stage1 = VisorForConditionalGeneration.from_llava_onevision(base_dir)
            stage1.config.viable_configs = [list(stage1.plan.first_slots(k)) for k in range(stage1.plan.num_slots + 1)]
            stage1_dir = work / "stage1-export"
            stage1.save_pretrained(str(stage1_dir))
            trainer.tokenizer.save_pretrained(str(stage1_dir))
        for kind in args.kinds:
            if args.compare == "padding":
                rows.append(compare_padding(kind, work, base_dir, stage1_dir, args.steps))
                continue
            per_precision = {}
            trainers = {p: build_trainer(kind, p, work, base_dir, stage1_dir) for p in ("bf16", "fp32")}
            for p in ("bf16", "fp32", "bf16", "fp32"):  # interleaved
                per_precision.setdefault(p, []).extend(time_steps(trainers[p], max(1, args.steps // 2)))
            batch = trainers["bf16"].recipe.global_batch
            row = {"kind": kind, "global_batch": batch}
            for p, times in per_precision.items():
                row[f"{p}_samples_per_s"] = batch / statistics.median(times)
            row["bf16_speedup"] = row["bf16_samples_per_s"] / row["fp32_samples_per_s"]
            rows.append(row)
            print(f"{kind:<14} batch {batch:>3}  bf16 {row['bf16_samples_per_s']:7.2f} samples/s  "
                  f"fp32 {row['fp32_samples_per_s']:7.2f} samples/s  bf16/fp32 {row['bf16_speedup']:.2f}x", flush=True)
    result = {"rows": rows, "compare": args.compare, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "steps": args.steps}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
