"""Does the language model learn the keyed lookup when every visual token says plainly which place it belongs to?

The baselines answer the keyed families (a shape by its kind, a document row by its key, a bar by its label) at the
pick-at-random floor, and every continuation of them stayed there. ``benchmarks/token_key_probe.py`` shows the
visual tokens carry the shapes' kinds only partly after the projector. This separates the two candidate causes:
it continues a baseline on one keyed family with an *oracle key* added to the visual features, a fixed random
direction per place tag (``visor.train.marking.image_token_tags``: the shape's kind, the row's key, the bar's
label), scaled to ``--oracle`` times the visual features' mean norm, on every token of that place, in training and
in evaluation alike. If the answer then leaves the floor, the language model can learn the lookup and the missing
piece is a clear key in the visual tokens; if it does not, the lookup itself does not form at this length and
learning rate. ``--oracle 0`` is the control (the same continuation without the key).

``--fresh`` re-initialises the language model and the projector (``visor.train.models.fresh_language_model``)
before training: does a model that has not learned to answer without the question learn the lookup sooner?

``--input text`` (kind_color only) drops the image and states the scene in words before the question ("red circle,
blue square. What colour is the square?"): the same lookup where the keys are the very words the question uses.

The model, the trainable parameters and the batches are those of the recipe (default: focus5's continuation recipe
with the projector training, as the keyed runs of ``docs/training-log.md``); one process, plain AdamW, no
checkpoints (a diagnostic, not a training run: nothing is saved but the metrics, and a rerun into the same ``--out``
starts its ``metrics.jsonl`` afresh).

    python benchmarks/oracle_key_lookup.py checkpoints-focus5/base --family kind_color --oracle 1.0 --steps 400 \\
        --out runs/oracle-kind-1

Evaluation: first-token accuracy of the answer on ``--n-eval`` test items (teacher-forced prompt), with the
uniform pick (mean of 1 / candidate places). Rows go to ``OUT/metrics.jsonl``; one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visor.train.lookup import KEYED_FAMILIES, crop_geometry


class OracleKeys:
    """Adds a fixed direction per place tag to each image's packed visual features (wrapping ``encode_images``)."""

    def __init__(self, model, scale: float, seed: int = 0) -> None:
        from visor.train.marking import TAGS

        generator = torch.Generator().manual_seed(seed)
        hidden = model.config.text_config.hidden_size
        directions = torch.randn(len(TAGS) + 1, hidden, generator=generator)
        directions = directions / directions.norm(dim=-1, keepdim=True)
        directions[0] = 0.0  # "no place" gets nothing
        self.directions, self.scale = directions, float(scale)
        self.tags: list[torch.Tensor] = []  # per image of the next forward, [tokens] tag ids (<= 0: none)
        self.feature_norm: float | None = None
        self._encode = model.encode_images
        model.encode_images = self.encode_images

    def encode_images(self, *args, **kwargs) -> list[torch.Tensor]:
        features = self._encode(*args, **kwargs)
        if self.scale == 0:
            return features
        if len(features) != len(self.tags):
            raise RuntimeError(f"{len(features)} images encoded, tags were set for {len(self.tags)}")
        if self.feature_norm is None:  # fixed on the first forward, so the key's size never follows training
            self.feature_norm = float(torch.cat(features).detach().float().norm(dim=-1).mean())
        out = []
        for image, tags in zip(features, self.tags):
            keys = self.directions[tags.clamp(min=0)] * (self.scale * self.feature_norm)
            out.append(image + keys.to(image.dtype))
        return out


def scene_in_words(scene: dict) -> str:
    """A kind_color scene as text, its shapes in the scene's (random) order: ``"red circle, blue square."``."""
    if scene["family"] != "kind_color":
        raise ValueError(f"--input text states kind_color scenes only, got {scene['family']}")
    return ", ".join(f"{shape['color']} {shape['kind']}" for shape in scene["shapes"]) + "."


def make_sample(item, text: bool):
    """The item's prompt and answer as a ``Sample``: with its image, or (``text``) with the scene in words instead."""
    from visor.data.batch import Sample

    if not text:
        return Sample([item.image], item.conversations())
    return Sample([], [{"from": "human", "value": f"{scene_in_words(item.scene)} {item.question}"},
                       {"from": "gpt", "value": item.answer}])


def first_token_accuracy(model, batcher, oracle: OracleKeys, items, geometry, precision: str,
                         text: bool = False) -> tuple[float, float]:
    """``(accuracy, uniform pick)`` of the answer's first token over ``items``, one prompt at a time."""
    from visor.precision import autocast
    from visor.train.lookup import answer_query_positions, lookup_candidates
    from visor.train.marking import image_token_tags

    model.eval()
    hits, uniform = [], []
    with torch.no_grad():
        for item in items:
            batch = batcher.train_batch([make_sample(item, text)])  # question and answer
            oracle.tags = [] if text else [image_token_tags(item.scene, geometry)]
            position = answer_query_positions(batch["labels"][0])[0]
            with autocast(precision):
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
            (slot,) = (out.text_index[0] == position).nonzero()[:, 0].tolist()
            hits.append(int(out.logits[0, slot].argmax()) == int(batch["labels"][0, position + 1]))
            uniform.append(1 / max(1, len(lookup_candidates(item.scene))))
    model.train()
    return sum(hits) / len(hits), sum(uniform) / len(uniform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the LLaVA-OV baseline to continue")
    parser.add_argument("--family", choices=KEYED_FAMILIES, default="kind_color")
    parser.add_argument("--oracle", type=float, default=1.0, help="the key's norm over the features' mean norm; 0: control")
    parser.add_argument("--input", choices=["image", "text"], default="image",
                        help="text: the scene in words instead of the image (kind_color; --oracle is ignored)")
    parser.add_argument("--fresh", action="store_true",
                        help="re-initialise the language model and projector (the tower stays the checkpoint's)")
    parser.add_argument("--recipe", default="recipes/base-tiny-focus5.yaml")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--seed", type=int, default=8, help="data seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="folder for metrics.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = args.input == "text"
    if text and args.family != "kind_color":
        parser.error("--input text needs --family kind_color")
    if text:
        args.oracle = 0.0

    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.data.synth.generate import generate_item
    from visor.precision import autocast
    from visor.train.loop import Trainer
    from visor.train.marking import image_token_tags
    from visor.train.plain import PlainTraining
    from visor.train.recipe import load_recipe

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").write_text("")  # this run's rows only
    overrides = [f"init={args.checkpoint}", "reducers=null", f"data.families=[{args.family}]",
                 "data.family_weights=null", f"data.seed={args.seed}", f"data.synth_image_size={args.image_size}",
                 f"precision={args.precision}"]
    recipe = load_recipe(args.recipe, overrides)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(dataclasses.replace(recipe, out_dir=scratch), progress=False)
        trainer.build()
    model, task = trainer.model, trainer.task
    if args.fresh:
        from visor.train.models import fresh_language_model

        fresh_language_model(model)
    model.train()
    geometry = crop_geometry(model.config)
    oracle = OracleKeys(model, args.oracle)
    training = PlainTraining(model.parameters(), args.lr, args.steps, warmup=min(50, args.steps // 10))
    config = DEFAULT_CONFIG.with_image_size(args.image_size)
    test = [generate_item("test", i, seed=args.seed, config=config, families=[args.family]) for i in range(args.n_eval)]
    rows = []

    def evaluate(step: int, loss: float | None) -> None:
        accuracy, uniform = first_token_accuracy(model, task.batcher, oracle, test, geometry, args.precision, text)
        row = {"step": step, "loss": loss, "test_first_token_accuracy": accuracy, "uniform_pick": uniform,
               "oracle": args.oracle, "input": args.input, "fresh": args.fresh, "family": args.family,
               "time": time.time()}
        rows.append(row)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(f"step {step:>5}  loss {loss if loss is None else round(loss, 4)}  "
                   f"test first-token accuracy {100 * accuracy:.1f}% (uniform pick {100 * uniform:.1f}%)")

    evaluate(0, None)
    bar = tqdm(range(args.steps), desc=f"{args.input}, oracle {args.oracle}")
    for step in bar:
        indices = list(range(step * args.batch, (step + 1) * args.batch))
        if text:  # one question per item, in words
            batch = task.batcher.train_batch([make_sample(task.source.item(i), True) for i in indices])
            oracle.tags = []
        else:
            batch = task.batch(indices)
            oracle.tags = [image_token_tags(task.source.item(i).scene, geometry) for i in indices]
        with autocast(args.precision):
            out = model(**batch, loss_reduction="sum")
        loss = out.loss / out.num_loss_tokens
        training.step(loss)
        bar.set_postfix(loss=f"{training.mean_loss(10):.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1, training.mean_loss(args.eval_every))
    print(json.dumps({"checkpoint": args.checkpoint, "family": args.family, "oracle": args.oracle, "input": args.input,
                      "fresh": args.fresh, "steps": args.steps, "batch": args.batch, "lr": args.lr, "rows": rows}))


if __name__ == "__main__":
    main()
