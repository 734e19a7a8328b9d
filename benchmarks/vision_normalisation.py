"""How much the pixel normalisation matters to the dense-pre-trained tiny vision tower.

Loads a step checkpoint of a ``vision`` run (the tower with its dense heads: ``RUN/checkpoints/step_N``;
``RUN/final`` keeps the tower only) and measures its per-patch accuracies (glyph halves that hold a glyph,
empty halves, colour) on validation crops normalised two ways: SigLIP's 0.5 mean/std, which the
pre-training used and ``visor.train.models.image_processor_for`` now gives the LVLM, and CLIP's mean/std,
transformers' default for the LLaVA-OV image processor (what the LVLM saw before commit 510beca).

    python benchmarks/vision_normalisation.py --checkpoint runs/reproduce/1-vision/run/checkpoints/step_00001872

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a vision run's step checkpoint (tower + dense heads)")
    parser.add_argument("--recipe", default="recipes/vision-tiny.yaml", help="the vision recipe it was trained with")
    parser.add_argument("--n", type=int, default=256, help="validation crops (default 256)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from visor.data.synth.dense import COLOR_CLASSES, GLYPH_CLASSES
    from visor.train.loop import DenseVisionTask
    from visor.train.models import SIGLIP_MEAN, SIGLIP_STD, DenseVisionModel
    from visor.train.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    model = DenseVisionModel(recipe.model, len(GLYPH_CLASSES), len(COLOR_CLASSES))
    model.load_state_dict(load_file(str(Path(args.checkpoint) / "model.safetensors")))
    model.eval()
    task = DenseVisionTask(recipe)
    siglip_batch = task.batch
    mean, std = torch.tensor(SIGLIP_MEAN)[:, None, None], torch.tensor(SIGLIP_STD)[:, None, None]
    clip_mean, clip_std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]

    def clip_batch(indices):  # the same crops, renormalised as CLIP's numbers would give them
        batch = siglip_batch(indices)
        batch["pixel_values"] = (batch["pixel_values"] * std + mean - clip_mean) / clip_std
        return batch

    results = {}
    with torch.no_grad():
        results["siglip 0.5/0.5"] = task.evaluate(model, n=args.n)
        task.batch = clip_batch
        results["clip mean/std"] = task.evaluate(model, n=args.n)
    print(f"{'normalisation':<16} {'glyph':>7} {'none':>7} {'colour':>7}")
    for name, r in results.items():
        print(f"{name:<16} {100 * r['glyph_acc']:>6.1f}% {100 * r['none_acc']:>6.1f}% {100 * r['color_acc']:>6.1f}%")
    print(json.dumps({"checkpoint": args.checkpoint, "n": args.n, "results": results}))


if __name__ == "__main__":
    main()
