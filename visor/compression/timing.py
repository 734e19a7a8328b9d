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
    return {**out, "input_ids": reduction.input_ids, "attention_mask": reduction.attention_mask,
            "image_features": reduction.image_features}
