"""Shared pieces of the analysis tools: loading, items, and walking the decoder one layer at a time.

``walk_layers`` runs the model's own prefill (``VisorDecoder.run_layers``) one layer at a time on one
prompt and calls ``before(index, kind, streams)`` / ``after(index, kind, streams)`` around each layer, so a
tool can read the text and visual streams exactly as the layer sees them, without switching the model to
an eager attention implementation or patching it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from visor.precision import autocast  # noqa: F401  (the analysis tools' precision switch)


def load(folder: str | Path):
    """``(model, tokenizer, image_processor, kind)`` for any LLaVA-OV or VISOR checkpoint folder."""
    from visor.convert.llava_onevision import load_checkpoint
    from visor.data.tokenizer import load_tokenizer
    from visor.train.models import image_processor_for

    model, kind = load_checkpoint(folder)
    return model.eval(), load_tokenizer(folder), image_processor_for(model.config), kind


def add_probe_arguments(parser, families, family: str, layers: str, n_train: int, n_test: int) -> None:
    """The probe scripts' shared command line (``benchmarks/``): a checkpoint, ``--family`` (one of ``families``),
    ``--layers``, ``--n-train``/``--n-test`` items, ``--image-size``, ``--seed`` and ``--threads``."""
    parser.add_argument("checkpoint", help="a LLaVA-OV or VISOR checkpoint folder")
    parser.add_argument("--family", choices=families, default=family)
    parser.add_argument("--layers", default=layers, help="decoder layers whose input visual states are probed")
    parser.add_argument("--n-train", type=int, default=n_train)
    parser.add_argument("--n-test", type=int, default=n_test)
    parser.add_argument("--image-size", type=int, default=None,
                        help="synth canvas in px (default: the benchmark's; 128 for the shipped models)")
    parser.add_argument("--seed", type=int, default=9, help="data seed of the train and test items")
    parser.add_argument("--threads", type=int, default=2)


def start_probe(parser, args):
    """``(model, batcher, synth_config, layers)`` from :func:`add_probe_arguments`' parsed ``args``: the thread count
    set, the checkpoint loaded (``load``) with a batcher, the benchmark's config at ``--image-size`` and the
    ``--layers`` checked against the model's depth (a bad one is a usage error of ``parser``)."""
    from visor.data.batch import Batcher
    from visor.data.synth.config import DEFAULT_CONFIG

    torch.set_num_threads(args.threads)
    model, tokenizer, processor, _ = load(args.checkpoint)
    try:
        layers = decoder_layers(args.layers, model)
    except ValueError as error:
        parser.error(f"--layers: {error}")
    config = DEFAULT_CONFIG.with_image_size(args.image_size) if args.image_size else DEFAULT_CONFIG
    return model, Batcher.for_model(model, tokenizer, processor), config, layers


def decoder_layers(spec: str, model) -> list[int]:
    """Comma-separated decoder layer indices (``"0,4,8"``), each checked against the model's depth."""
    layers = [int(x) for x in spec.split(",")]
    bad = [layer for layer in layers if not 0 <= layer < model.plan.num_layers]
    if bad:
        raise ValueError(f"layers {bad} outside 0..{model.plan.num_layers - 1}")
    return layers


def items_from(data: str, split: str = "test", n: int = 100, seed: int = 0, families=None, image_root=None,
               synth_config=None):
    """Evaluation items: ``synth`` (generated with ``synth_config``, default SynthConfig's) or a LLaVA JSON/JSONL
    file (unreadable records left out)."""
    from visor.eval.harness import llava_items, synth_items

    if data == "synth":
        return synth_items(split, n, seed=seed, config=synth_config, families=families)
    items = [it for it in llava_items(data, image_root)[0] if it.problem is None]
    if families:
        items = [it for it in items if it.family in families]
    return items[:n]


@torch.no_grad()
def walk_layers(model, batch: dict, active_sa=None, before: Callable | None = None, after: Callable | None = None):
    """Prefill ``batch`` (one prompt; a ``Batcher`` output) layer by layer (module docstring); returns the streams."""
    features = []
    if "pixel_values" in batch:
        features = model.encode_images(batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"])
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    images = model._assign_images(features, input_ids.shape[0], batch.get("batch_num_images"))
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    streams = model.build_streams(input_ids, mask, positions, images)
    kinds = model.plan.layer_kinds(active_sa)
    decoder = model.language_model
    for index, kind in enumerate(kinds):
        if before is not None:
            before(index, kind, streams)
        decoder.run_layers(streams, kinds, index, index + 1, None)
        if after is not None:
            after(index, kind, streams)
    return streams


def layer_kind_letters(model, active_sa=None) -> str:
    return model.plan.describe(active_sa)


def save_csv(rows: list[dict], path: Path) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plt():
    from visor.plotting import pyplot

    return pyplot()
