"""What do a tagging or marking run's per-token heads read, per family? (``visor.train.marking``)

The training metrics average over the keyed families, and the mark head's balanced accuracy is high for a marker
blind to the question too (it marks every row, bar and shape; most other tokens are background). This loads a run's
last complete resume checkpoint, which keeps the auxiliary heads that the exported model drops, and runs the run's
own batches (training indices from ``--start`` on, which a run of fewer samples never reached) through the model in
training mode, without gradients. Per family it reports:

- mark head: the balanced accuracy over the image tokens, and how often the named place gets a higher mean logit
  than every other place the question could have named (``mark_choice``; chance = mean of 1 / places);
- tag head: the accuracy on the places' tokens, and per place whether its own tag has the highest mean
  log-probability over its tokens among the tags of the scene's places (what a one-hop lookup by the question's word
  needs; chance = mean of 1 / places).

    python benchmarks/token_heads.py runs/tag-T1 --n 400 --threads 1

The run's recipe is read from ``RUN/final/recipe.json`` (written when the run ends). One JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def last_checkpoint(run: Path) -> Path:
    """The run's newest complete resume checkpoint (``checkpoints/step_*`` with its ``COMPLETE`` marker)."""
    complete = sorted(p.parent for p in (run / "checkpoints").glob("step_*/COMPLETE"))
    if not complete:
        raise FileNotFoundError(f"{run} holds no complete checkpoint under checkpoints/ (the heads live only there)")
    return complete[-1]


def read_heads(run: str | Path, n: int = 400, start: int = 100_000, checkpoint: str | Path | None = None,
               batch_size: int = 8, progress: bool = True) -> dict:
    """Per-family read-out of the mark and tag heads of the run in ``run`` (module docstring). Returns
    ``{"checkpoint", "n", "families": {family: {...}}}`` with, where the run trained the head, ``mark_balanced``,
    ``mark_choice``, ``mark_chance`` and ``tag_token_accuracy``, ``tag_place``, ``tag_chance`` and their counts."""
    from safetensors.torch import load_file

    from visor.precision import autocast
    from visor.train.loop import Trainer
    from visor.train.marking import ATTRIBUTE, TAG_ATTRIBUTE, balanced_accuracy, mark_choice
    from visor.train.recipe import load_recipe

    run = Path(run)
    recipe_path = run / "final" / "recipe.json"
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path} not found: the run's recipe is written when it ends")
    recipe = load_recipe(recipe_path)
    if not (recipe.mark_weight > 0 or recipe.tag_weight > 0):
        raise ValueError(f"{run} trained neither a mark head nor a tag head (mark_weight and tag_weight are 0)")
    if start < recipe.max_steps * recipe.global_batch:
        raise ValueError(f"--start {start} lies inside the run's {recipe.max_steps * recipe.global_batch} training "
                         "samples; pick one it never reached")
    checkpoint = Path(checkpoint) if checkpoint else last_checkpoint(run)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(dataclasses.replace(recipe, out_dir=scratch), progress=False)
        trainer.build()
    model, task = trainer.model, trainer.task
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))  # strict: the heads must be there
    model.train()  # the heads capture in training mode only; the tiny models have no dropout
    marks, tags = getattr(model, ATTRIBUTE, None), getattr(model, TAG_ATTRIBUTE, None)
    stats: dict[str, dict[str, list[float]]] = {}
    bar = tqdm(total=n, desc="token heads", disable=not progress)
    for first in range(start, start + n, batch_size):
        indices = list(range(first, min(first + batch_size, start + n)))
        batch = task.batch(indices)
        batch.pop("lookup_targets", None)
        mark_targets, tag_labels = batch.pop("mark_targets", None), batch.pop("tag_labels", None)
        with torch.no_grad(), autocast(recipe.precision):
            model(**batch)
        families = [task.source.item(i).scene["family"] for i in indices]
        if marks is not None:
            logits = marks.take()[..., 0].float()
            rows, targets, candidates = mark_targets
            image = batch["input_ids"] == model.config.image_token_id
            for j, row in enumerate(rows.tolist()):
                entry = stats.setdefault(families[row], {})
                entry.setdefault("mark_balanced", []).append(
                    balanced_accuracy(logits[row], targets[j], image[row] & ~targets[j]))
                if candidates[j] is not None:
                    entry.setdefault("mark_choice", []).append(mark_choice(logits[row:row + 1], [candidates[j]]))
                    entry.setdefault("mark_chance", []).append(1 / candidates[j].shape[0])
        if tags is not None:
            log_probs = tags.take().float().log_softmax(-1)
            for row, family in enumerate(families):
                labels = tag_labels[row]
                tagged = labels > 0
                if not tagged.any():
                    continue
                entry = stats.setdefault(family, {})
                entry.setdefault("tag_token_accuracy", []).append(
                    float((log_probs[row].argmax(-1) == labels)[tagged].float().mean()))
                present = labels[tagged].unique()
                if len(present) < 2:
                    continue
                for tag in present:
                    means = torch.stack([log_probs[row][labels == tag][:, other].mean() for other in present])
                    entry.setdefault("tag_place", []).append(float(present[int(means.argmax())] == tag))
                    entry.setdefault("tag_chance", []).append(1 / len(present))
        bar.update(len(indices))
    bar.close()
    families = {}
    for family, entry in sorted(stats.items()):
        families[family] = {key: _mean(values) for key, values in entry.items()}
        families[family].update({f"{key}_n": len(values) for key, values in entry.items()
                                 if key in ("mark_choice", "tag_place")})
    return {"checkpoint": str(checkpoint), "n": n, "start": start, "families": families}


def format_report(result: dict) -> str:
    lines = [f"{result['checkpoint']}: {result['n']} training items from index {result['start']}"]
    for family, entry in result["families"].items():
        parts = []
        if "mark_balanced" in entry:
            parts.append(f"mark: balanced accuracy {100 * entry['mark_balanced']:.1f}%")
        if "mark_choice" in entry:
            parts.append(f"named place chosen {100 * entry['mark_choice']:.1f}% of {entry['mark_choice_n']} "
                         f"(chance {100 * entry['mark_chance']:.1f}%)")
        if "tag_token_accuracy" in entry:
            parts.append(f"tag: token accuracy {100 * entry['tag_token_accuracy']:.1f}%")
        if "tag_place" in entry:
            parts.append(f"place gets its own tag among the scene's {100 * entry['tag_place']:.1f}% of "
                         f"{entry['tag_place_n']} (chance {100 * entry['tag_chance']:.1f}%)")
        lines.append(f"  {family}: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder of `visor train` with mark_weight or tag_weight > 0")
    parser.add_argument("--checkpoint", default=None, help="a resume checkpoint folder (default: the run's last)")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--start", type=int, default=100_000, help="first training index read")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = read_heads(args.run, args.n, args.start, args.checkpoint)
    print(format_report(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
