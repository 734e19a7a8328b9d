"""Timing a reducer's own selection work, apart from the model it runs in (for ``visor bench``).

The selection overhead is what a reducer adds on top of running fewer tokens: for pre-LLM reducers the
vision cues (attention received, keys, packing them like the features) and ``reduce_image`` (ranking,
merging, pooling); for in-LLM reducers the last-token scores at every drop and the per-image choice. The
vision tower and the decoder layers are *not* included: they are what the prefill timing measures.
Clocks synchronise the device before reading, so GPU times are real.

    from visor.compression.timing import time_selection, reduced_forward_inputs

    overhead = time_selection(model, "visionzip:0.25", inputs, repeats=5)   # {'seconds': ..., ...}
    kwargs = reduced_forward_inputs(model, "visionzip:0.25", inputs)        # prefill on the kept tokens
    model(**kwargs)
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager

import torch

from visor.compression.apply import apply_pre_llm
from visor.compression.in_llm import TIMING
from visor.compression.registry import build_reducer


@contextmanager
def selection_timing():
    """Inside this block, forward/generate time the reducers' selection (device-synchronised)."""
    previous = TIMING["enabled"]
    TIMING["enabled"] = True
    try:
        yield
    finally:
        TIMING["enabled"] = previous


@torch.no_grad()
def selection_seconds(model, reducer, inputs: dict, active_sa=None) -> float:
    """Seconds of selection work in one prefill of ``inputs`` (a processor output) under ``reducer``."""
    reducer = build_reducer(reducer)
    with selection_timing():
        if reducer.stage == "pre_llm":
            reduction = apply_pre_llm(model, reducer, inputs["input_ids"], inputs.get("attention_mask"), None, None,
                                      inputs.get("pixel_values"), inputs.get("image_sizes"), inputs.get("batch_num_images"),
                                      inputs.get("image_features"))
            return 0.0 if reduction is None else reduction.seconds
        out = model(**inputs, reducer=reducer, active_sa=active_sa, logits_to_keep=1)
        return out.selection.seconds


def time_selection(model, reducer, inputs: dict, *, repeats: int = 3, warmup: int = 1, active_sa=None) -> dict:
    """Median selection overhead over ``repeats`` runs (after ``warmup``): a row for a benchmark table.

    Pre-LLM reducers run the vision tower too (their cues ride along with it) but only the cue and
    selection work is counted; in-LLM reducers run a whole prefill and count the scoring and choosing.
    """
    reducer = build_reducer(reducer)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        selection_seconds(model, reducer, inputs, active_sa)
    runs = [selection_seconds(model, reducer, inputs, active_sa) for _ in range(repeats)]
    return {"reducer": reducer.spec, "stage": reducer.stage, "seconds": statistics.median(runs), "runs": runs}


@torch.no_grad()
def reduced_forward_inputs(model, reducer, inputs: dict) -> dict:
    """``forward`` keyword arguments for a prefill on the tokens ``reducer`` keeps.

    Pre-LLM: the shortened prompt with the reduced ``image_features`` (selection done once, here, so a
    timed forward measures the LLM on the kept tokens only). In-LLM: the inputs plus ``reducer`` (the
    pruning is part of the prefill). The keys of ``inputs`` are kept otherwise.
    """
    reducer = build_reducer(reducer)
    if reducer.stage != "pre_llm":
        return {**inputs, "reducer": reducer}
    reduction = apply_pre_llm(model, reducer, inputs["input_ids"], inputs.get("attention_mask"), None, None,
                              inputs.get("pixel_values"), inputs.get("image_sizes"), inputs.get("batch_num_images"),
                              inputs.get("image_features"))
    if reduction is None:
        return dict(inputs)
    out = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_ids", "attention_mask", "image_features")}
    if reduction.position_ids is not None:  # a selector's original positions (``NAME:AMOUNT@original``)
        out["position_ids"] = reduction.position_ids
    return {**out, "input_ids": reduction.input_ids, "attention_mask": reduction.attention_mask,
            "image_features": reduction.image_features}


@torch.no_grad()
def bench_prefill_inputs(model, reducer, input_ids: torch.Tensor, image_size, *, image_features=None,
                         seed: int = 0) -> dict:
    """Everything a benchmark row needs for one single-image prompt under ``reducer``.

    ``input_ids``: [1, N] with the image's placeholders expanded for ``image_size`` (height, width).
    Reducers that need the vision tower's attention get random pixel values with the right crop count
    (random weights: only shapes matter); others use ``image_features`` when given. Returns:

    * ``forward``: keyword arguments for the timed LLM prefill (pre-LLM: the shortened prompt and reduced
      features, selection already done; in-LLM: the features plus the reducer, pruning inside the prefill);
    * ``visual_tokens_per_layer``: tokens each decoder layer carries;
    * ``selection_s``: the selection overhead of this prompt, timed once (use ``time_selection`` for a median).
    """
    from visor.compression.cues import image_layouts
    from visor.model.vision import num_crops

    reducer = build_reducer(reducer)
    device = input_ids.device
    sizes = torch.tensor([list(image_size)], device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "image_sizes": sizes,
              "batch_num_images": [1]}
    if image_features is None or (reducer.stage == "pre_llm" and reducer.cues.any):
        side = model.config.vision_config.image_size
        crops = num_crops(list(image_size), model.config.image_grid_pinpoints, side)
        generator = torch.Generator().manual_seed(seed)
        inputs["pixel_values"] = torch.randn(1, crops, 3, side, side, generator=generator).to(device, model.dtype)
    else:
        inputs["image_features"] = image_features
    num_layers = model.config.text_config.num_hidden_layers
    n_visual = int((input_ids == model.config.image_token_id).sum())
    selection_s = selection_seconds(model, reducer, inputs)
    if reducer.stage == "pre_llm":
        layout = image_layouts(model.config, sizes, [1])[0]
        per_layer = [reducer.kept_count(layout)] * num_layers
    else:
        per_layer = reducer.visual_tokens_per_layer(num_layers, n_visual)
    return {"forward": reduced_forward_inputs(model, reducer, inputs), "visual_tokens_per_layer": per_layer,
            "selection_s": selection_s}
