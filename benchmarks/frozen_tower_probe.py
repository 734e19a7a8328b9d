"""What the frozen vision tower's base-view features say about the easy questions: a linear probe.

The base stage trains the LLM on top of a frozen tower (pre-trained on dense glyph/colour heads only). If an
easy family stays at chance in the base stage's validation, is the answer missing from the features, or has
the LLM not found it yet? This fits a logistic-regression probe per family on the tower's base-view tokens
(one crop, flattened) of procedural-benchmark images, and on the same tower with random weights as the
floor (``--classifier mlp``: one hidden layer instead, a stronger reader). Families whose answer depends only on the image: colour / kind / count of the large shapes, side.
``presence-kinds`` (opt-in): the presence family's question names a kind, so its answer is not the image's alone;
this probes the image's half of it instead, one binary probe per shape kind ("is a KIND among the 1-3 large shapes?",
from the scene) on the presence family's images, and reports their mean accuracy and mean majority class.

    python benchmarks/frozen_tower_probe.py --checkpoint runs/reproduce/2-base/run/checkpoints/step_00001250
    python benchmarks/frozen_tower_probe.py --tower runs/vision-shape/final   # a vision run's tower alone
    python benchmarks/frozen_tower_probe.py --checkpoint checkpoints/base --image-size 128 --families shape,presence-kinds

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

FAMILIES = ("color", "shape", "count", "side")


def base_view_features(model, processor, images) -> np.ndarray:
    """[n, tokens * hidden] features of each image's base view (crop 0 of its anyres layout)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            pixels = processor(images=images[start:start + 64], return_tensors="pt")["pixel_values"][:, 0]
            out.append(model.vision_features(pixels.to(model.dtype)).float().flatten(1).numpy())
    return np.concatenate(out)


class TowerOnly(torch.nn.Module):
    """A vision run's exported SigLIP tower, read as the LVLM reads it (last layer, before post_layernorm)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        from transformers import SiglipVisionModel

        self.tower = SiglipVisionModel.from_pretrained(folder).eval()
        self.dtype = next(self.tower.parameters()).dtype
        self.image_size = self.tower.config.image_size

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower.encoder(inputs_embeds=self.tower.embeddings(pixels)).last_hidden_state


def base_view_processor(size: int):
    """The base view of a square image as LLaVA-OV's processor gives it: resized to ``size``, SigLIP's 0.5/0.5."""
    def process(images, return_tensors="pt"):
        arrays = [(np.asarray(im.convert("RGB").resize((size, size)), np.float32) / 255.0 - 0.5) / 0.5 for im in images]
        return {"pixel_values": torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)[:, None]}
    return process


def presence_kind_labels(split: str, n: int, config) -> tuple[list, dict[str, list[bool]]]:
    """The presence family's images and, per shape kind, whether it is among the image's large shapes."""
    from visor.data.synth.families import SHAPES
    from visor.data.synth.generate import generate_items

    items = list(generate_items(split, n, config=config, families=["presence"]))
    kinds = [{shape["kind"] for shape in item.scene["shapes"]} for item in items]
    return [item.image for item in items], {k: [k in present for present in kinds] for k in SHAPES}


def probe(train_x, train_y, test_x, test_y, classifier: str = "linear") -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    if classifier == "mlp":  # one hidden layer: can combine patches (a shape's outline), which a linear probe cannot
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-2, max_iter=200, early_stopping=True, random_state=0)
    else:
        clf = LogisticRegression(max_iter=300, C=0.05)
    clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == np.asarray(test_y)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", help="an LVLM checkpoint folder (its tower is probed)")
    where.add_argument("--tower", help="a vision run's exported tower (RUN/final)")
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--classifier", choices=("linear", "mlp"), default="linear",
                        help="logistic regression, or an MLP with one hidden layer of 256")
    parser.add_argument("--image-size", type=int, default=None,
                        help="synth canvas in px (default: the benchmark's default; 128 for the shipped models)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from visor.eval.harness import synth_items
    from visor.analysis.common import load
    from visor.train.models import image_processor_for

    if args.tower:
        model = TowerOnly(args.tower)
        processor = base_view_processor(model.image_size)
        tower = model.tower
    else:
        model = load(args.checkpoint)[0]  # a LLaVA-OV folder (a base stage's) or a VISOR one
        processor = image_processor_for(model.config)
        tower = None
    random_tower = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (random_tower.tower if tower is not None else random_tower.vision_tower).parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    from visor.data.synth.config import DEFAULT_CONFIG

    config = DEFAULT_CONFIG.with_image_size(args.image_size) if args.image_size else DEFAULT_CONFIG
    results = {}
    for family in args.families.split(","):
        started = time.time()
        # images and, per probe target, their labels: the family's answer, or one target per kind (presence-kinds)
        if family == "presence-kinds":
            (images_train, targets_train), (images_test, targets_test) = (
                presence_kind_labels(split, n, config) for split, n in (("train", args.n_train), ("test", args.n_test)))
        else:
            train = synth_items("train", args.n_train, config=config, families=[family])
            test = synth_items("test", args.n_test, config=config, families=[family])
            images_train, targets_train = [it.images[0] for it in train], {family: [it.answers[0] for it in train]}
            images_test, targets_test = [it.images[0] for it in test], {family: [it.answers[0] for it in test]}
        row = {"majority": float(np.mean([max(v.count(a) for a in set(v)) / len(v) for v in targets_test.values()]))}
        for name, tower in (("trained tower", model), ("random tower", random_tower)):
            x_train = base_view_features(tower, processor, images_train)
            x_test = base_view_features(tower, processor, images_test)
            row[name] = float(np.mean([probe(x_train, targets_train[t], x_test, targets_test[t], args.classifier)
                                       for t in targets_train]))
        results[family] = row
        print(f"{family:<8} trained tower {100 * row['trained tower']:5.1f}%   random tower {100 * row['random tower']:5.1f}%   "
              f"majority class {100 * row['majority']:5.1f}%   ({time.time() - started:.0f}s)", flush=True)
    print(json.dumps({"checkpoint": args.checkpoint or args.tower, "classifier": args.classifier, "n_train": args.n_train,
                      "n_test": args.n_test, "results": results}))


if __name__ == "__main__":
    main()
