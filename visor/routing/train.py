"""Training the router on pseudo-labels (``visor route train``): cross-entropy, backbone frozen.

Only the router (routing tokens + MLP) learns. Each step runs the short routing pass (the layers before
the first SA slot) on a batch of prompts; the vision tower's features are computed once per item and
kept, since the backbone does not change. A router over configurations with a resolution
(``visor.model.resolution``) is trained on the base-only layout it reads at inference (``visor.routing.resolution``).
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from visor.routing.router import attach_router, routing_logits


def train_router(model, tokenizer, image_processor, items: Sequence, label_indices: Sequence[int],
                 configs: Sequence[Sequence[int]], *, epochs: int = 20, lr: float = 2e-3, batch_size: int = 16,
                 seed: int = 0, num_tokens: int = 1, mlp_hidden: int = 256, progress: bool = True, autocast: bool = True,
                 read_after_layer: int | None = None, score_targets: Sequence[Sequence[float]] | None = None) -> dict:
    """Attach a fresh router over ``configs`` and fit it; returns the history.

    By default a label router (cross-entropy on ``label_indices``). With ``score_targets`` (per item, its score
    under each configuration of ``configs``, in [0, 1]) a score router (``visor.routing.router``, objective
    "score"): binary cross-entropy of each output against that configuration's score. ``label_indices`` still
    give the reference accuracies and, for a score router, the history's ``train_accuracy`` is how often its
    budget-0 choice is a configuration with the item's best score."""
    from visor.data.batch import Batcher, Sample
    from visor.model.resolution import names_resolution

    layout = {"resolution": "base"} if names_resolution(configs) else {}
    if len(items) != len(label_indices):
        raise ValueError(f"{len(items)} items but {len(label_indices)} labels")
    scores = None
    if score_targets is not None:
        scores = torch.tensor([list(map(float, row)) for row in score_targets], dtype=torch.float32)
        if scores.shape != (len(items), len(configs)):
            raise ValueError(f"score_targets must be {len(items)} rows of {len(configs)} scores, got {tuple(scores.shape)}")
        if scores.min() < 0 or scores.max() > 1:
            raise ValueError("score_targets must lie in [0, 1] (grader scores or answer probabilities)")
    torch.manual_seed(seed)
    attach_router(model, configs, num_tokens=num_tokens, mlp_hidden=mlp_hidden, read_after_layer=read_after_layer,
                  objective="label" if scores is None else "score")
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("router.")
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    # prompts and visual features once (the backbone is frozen)
    prepared = []
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc="features", disable=not progress, leave=False):
        chunk = items[start:start + batch_size]
        batch = batcher.prompt_batch([Sample(item.images, item.turns) for item in chunk], **layout)
        with torch.no_grad(), ctx():
            feats = model.encode_images(batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"],
                                        batch.get("image_tiled")) if "pixel_values" in batch else []
        per_sample = model._assign_images([f.detach() for f in feats], len(chunk), batch.get("batch_num_images"))
        for row in range(len(chunk)):
            mask = batch["attention_mask"][row].bool()
            prepared.append((batch["input_ids"][row][mask], per_sample[row]))
    optimizer = torch.optim.AdamW([p for p in model.router.parameters()], lr=lr, weight_decay=0.0)
    order = list(range(len(items)))
    rng = random.Random(seed)
    history = []
    bar = tqdm(range(epochs), desc="router", disable=not progress)
    for epoch in bar:
        rng.shuffle(order)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            ids, mask, per_sample = _pad([prepared[i] for i in chosen], batcher.pad_token_id)
            target = torch.tensor([label_indices[i] for i in chosen])
            with ctx():
                logits = routing_logits(model, ids, mask, per_sample).float()
            if scores is None:
                loss = F.cross_entropy(logits, target)
                hits = logits.argmax(-1) == target
            else:
                wanted = scores[chosen]
                loss = F.binary_cross_entropy_with_logits(logits, wanted)
                picked = wanted.gather(1, logits.argmax(-1, keepdim=True))[:, 0]
                hits = picked >= wanted.max(-1).values
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(chosen)
            correct += int(hits.sum())
            total += len(chosen)
        history.append({"epoch": epoch + 1, "loss": loss_sum / total, "train_accuracy": correct / total})
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.2f}")
    for param in model.parameters():
        param.requires_grad = True
    model.eval()
    return {"history": history, "configs": [c if isinstance(c, dict) else list(c) for c in model.config.router["configs"]],
            "reference_accuracy": reference_accuracies(label_indices, [getattr(it, "family", None) for it in items])}


def reference_accuracies(labels: Sequence[int], families: Sequence[str | None]) -> dict:
    """What a router that does not look at the sample would score on these labels: always the most common
    label (``majority``), and the most common label of the item's task family (``family_majority``, only
    when every item has a family). A router's train accuracy at ``family_majority`` means it learned the
    family, not the sample."""
    from visor.routing.labels import family_table

    if not labels:
        return {"majority": None}
    out = {"majority": max(Counter(labels).values()) / len(labels)}
    if all(f is not None for f in families):
        table = family_table(labels, families)
        out["family_majority"] = sum(table[f] == y for y, f in zip(labels, families)) / len(labels)
    return out


def save_router_checkpoint(model, tokenizer, image_processor, history: dict, out: str | Path, source: str | Path) -> Path:
    """Save the model with its trained router as a checkpoint folder: weights, tokenizer, image processor, the
    training history (``router_training.json``) and ``source``'s ``recipe.json`` when it has one, so the canvas
    the backbone was trained on stays known to ``visor eval`` / ``visor route``."""
    out = Path(out)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    image_processor.save_pretrained(str(out))
    (out / "router_training.json").write_text(json.dumps(history, indent=2))
    if (Path(source) / "recipe.json").is_file():
        shutil.copyfile(Path(source) / "recipe.json", out / "recipe.json")
    return out


def _pad(rows, pad_id: int):
    length = max(ids.numel() for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (row, _) in enumerate(rows):
        ids[r, length - row.numel():] = row
        mask[r, length - row.numel():] = 1
    return ids, mask, [feats for _, feats in rows]
