"""Where along the stack does a visual token stop saying which place it belongs to? A per-token linear probe.

In the keyed families (``presence``/``kind_color``: a shape by its kind; ``doc``: a row by its key; ``chart``: a bar
by its label) the answer needs one lookup: the question's word against the visual tokens of the place it names. An
attention head can only do that if each token of the place carries the place's name in a linear direction (a key
is a linear map of the token's normed state). This measures it. For every test item it keeps the tokens of the
scene's places (``visor.train.marking.image_token_tags``: each token's place tag, by the name a question would use)
at each stage of the model:

- ``tower``: the vision tower's features before the projector, packed as the language model sees them;
- ``layer K``: the visual states entering decoder layer ``K`` (``layer 0`` = the projector's output).

and fits a fresh multinomial logistic regression per stage on the tokens of the training items (no model weights
change). It reports, on the test items, the token accuracy over the places' tokens and the place-level accuracy
(per place: does its own tag get the highest mean log-probability over its tokens among the tags of the scene's
places; chance = mean of 1 / places), as ``benchmarks/token_heads.py`` reports for a trained tag head.

    python benchmarks/token_key_probe.py checkpoints-focus5/base --family kind_color --image-size 128

Prints a table and, last, one JSON line. bf16 autocast for the model's forward.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from visor.train.lookup import KEYED_FAMILIES, crop_geometry

def _tower_packed(model, batch: dict) -> torch.Tensor:
    """The tower's features of the batch's one image, packed in LLaVA-OV token order ([tokens, vision_hidden]): the
    projector is bypassed and the newline tokens are zeros."""
    projector, newline = model.multi_modal_projector, model.image_newline
    try:
        model.multi_modal_projector = torch.nn.Identity()
        model.image_newline = torch.nn.Parameter(torch.zeros(model.config.vision_config.hidden_size,
                                                             dtype=newline.dtype), requires_grad=False)
        features = model.encode_images(batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"])
    finally:
        model.multi_modal_projector, model.image_newline = projector, newline
    return features[0]


def collect(model, batcher, family: str, split: str, n: int, config, layers: list[int], seed: int):
    """``(features {stage: [T, D]}, tags [T], item [T])`` over the tagged tokens of ``n`` items."""
    from visor.analysis.common import walk_layers
    from visor.data.batch import Sample
    from visor.data.synth.generate import generate_item
    from visor.train.marking import image_token_tags

    geometry = crop_geometry(model.config)
    stages: dict[str, list[torch.Tensor]] = {"tower": [], **{f"layer {k}": [] for k in layers}}
    tags, owners = [], []
    for index in tqdm(range(n), desc=f"{family} {split}", leave=False):
        item = generate_item(split, index, seed=seed, config=config, families=[family])
        labels = image_token_tags(item.scene, geometry)
        keep = labels > 0  # the places' tokens (0: no place, -100: a patch two places share)
        if not keep.any():
            continue
        batch = batcher.prompt_batch([Sample([item.image], item.conversations()[:1])])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            tower = _tower_packed(model, batch)
            if tower.shape[0] != labels.shape[0]:
                raise RuntimeError(f"{tower.shape[0]} image tokens, {labels.shape[0]} tags: geometry mismatch")
            stages["tower"].append(tower[keep].float())

            def grab(layer, kind, streams):
                if layer in layers:
                    stages[f"layer {layer}"].append(streams.visual[0][keep].float())

            walk_layers(model, batch, before=grab)
        tags.append(labels[keep])
        owners.append(torch.full((int(keep.sum()),), index))
    return {k: torch.cat(v) for k, v in stages.items()}, torch.cat(tags), torch.cat(owners)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int = 300, lr: float = 0.05,
              weight_decay: float = 1e-4) -> torch.nn.Linear:
    """Multinomial logistic regression (full-batch Adam, balanced class weights) on standardised features."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    counts = torch.bincount(y, minlength=classes).float()
    weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros(()))
    optimiser = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimiser.zero_grad()
        F.cross_entropy(probe(x), y, weight=weight).backward()
        optimiser.step()
    return probe


def score(log_probs: torch.Tensor, tags: torch.Tensor, owners: torch.Tensor) -> dict:
    """Token accuracy, place-level accuracy and its chance (module docstring)."""
    token = float((log_probs.argmax(-1) == tags).float().mean())
    hits, chance = [], []
    for owner in owners.unique():
        mine = owners == owner
        present = tags[mine].unique()
        if len(present) < 2:
            continue
        for tag in present:
            means = torch.stack([log_probs[mine & (tags == tag)][:, other].mean() for other in present])
            hits.append(float(present[int(means.argmax())] == tag))
            chance.append(1 / len(present))
    return {"token": token, "place": sum(hits) / len(hits), "place_chance": sum(chance) / len(chance),
            "places": len(hits)}


def main() -> None:
    from visor.analysis.common import add_probe_arguments, start_probe
    from visor.train.marking import TAGS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_probe_arguments(parser, KEYED_FAMILIES, family="kind_color", layers="0,2,4,6,8", n_train=300, n_test=100)
    args = parser.parse_args()
    model, batcher, config, layers = start_probe(parser, args)
    train = collect(model, batcher, args.family, "train", args.n_train, config, layers, args.seed)
    test = collect(model, batcher, args.family, "test", args.n_test, config, layers, args.seed)
    classes = len(TAGS) + 1
    results = {}
    print(f"{args.family}: {len(train[1])} training tokens, {len(test[1])} test tokens "
          f"({args.n_train} / {args.n_test} items)")
    print(f"{'stage':<10} {'token acc.':>10} {'place acc.':>10} {'chance':>7}")
    for stage, x in train[0].items():
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        probe = fit_probe((x - mean) / std, train[1], classes)
        with torch.no_grad():
            log_probs = probe((test[0][stage] - mean) / std).log_softmax(-1)
        results[stage] = score(log_probs, test[1], test[2])
        row = results[stage]
        print(f"{stage:<10} {100 * row['token']:>9.1f}% {100 * row['place']:>9.1f}% {100 * row['place_chance']:>6.1f}%")
    print(json.dumps({"checkpoint": args.checkpoint, "family": args.family, "n_train": args.n_train,
                      "n_test": args.n_test, "image_size": config.image_size, "stages": results}))


if __name__ == "__main__":
    main()
