"""Running a reducer inside ``VisorForConditionalGeneration.forward`` / ``generate``.

``forward(..., reducer=R)`` and ``generate(..., reducer=R)`` take a ``Reducer`` or a ``"NAME[:AMOUNT]"``
string (``visor.compression.registry``). The baseline (``LayerPlan.all_self_attention``) and VISOR plans
are treated alike.

Pre-LLM reducers (``apply_pre_llm``): the images are encoded once (with the vision cues the reducer
asked for), each image's token sequence is reduced, and the prompt is *shortened*: every image keeps the
first ``m_i`` of its ``<image>`` placeholders, the surplus ones are removed from ``input_ids`` /
``attention_mask`` / ``labels`` and the batch is left-padded again. Positions are those of the shortened
prompt (explicit ``position_ids`` drop by the placeholders removed before them): the LLM sees what the
methods' own code gives it, a shorter sequence with contiguous positions. A selector built with
``positions="original"`` (spec ``NAME:AMOUNT@original``) instead gives every token the position it had in the full
prompt, each kept visual token that of the image token it stands for (``original_positions``), so the LLM still sees
where in the image a kept token was; generation then continues from the full prompt's last position. The reduced
features are then
scattered exactly as unreduced ones would be. ``text_index`` in the output still refers to the caller's
``input_ids``; ``generate`` returns the caller's prompt followed by the new tokens. The selection depends
only on the images, so it is made once per prompt.

In-LLM reducers run inside the prefill (``visor.compression.in_llm``); the output carries the
``TokenSelection`` made, which ``forward(..., selection=...)`` replays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from visor.compression.base import ImageTokens, PreLLMReducer, ReducedImage, Reducer
from visor.compression.cues import encode_with_cues, image_layouts
from visor.compression.in_llm import TIMING, TokenSelection, _Clock
from visor.compression.registry import build_reducer


def prepare_reducer(reducer) -> Reducer | None:
    return build_reducer(reducer)


@dataclass
class PromptReduction:
    """A prompt shortened for a pre-LLM reducer (see module docstring)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    labels: torch.Tensor | None
    image_features: list[torch.Tensor]
    source_index: torch.Tensor  # [B, N'] position in the caller's input_ids (-1 = added padding)
    reduced: list[ReducedImage]
    seconds: float = 0.0  # selection time (scoring + reducing), when timing is on

    def restore_text_index(self, text_index: torch.Tensor) -> torch.Tensor:
        mapped = self.source_index.gather(1, text_index.clamp(min=0))
        return torch.where(text_index >= 0, mapped, text_index)


@torch.no_grad()
def reduce_images(model, reducer: PreLLMReducer, pixel_values, image_sizes, batch_num_images,
                  image_features: list[torch.Tensor] | None = None, clock: _Clock | None = None,
                  image_tiled=None) -> list[ReducedImage]:
    """Encode (unless ``image_features`` are given and no cue is needed) and reduce every image."""
    clock = clock or _Clock()
    if reducer.cues.any:
        if pixel_values is None:
            raise ValueError(f"reducer {reducer.name!r} scores tokens with the vision tower's attention: "
                             f"pass pixel_values (precomputed image_features are not enough)")
        images = encode_with_cues(model, pixel_values, image_sizes, batch_num_images, reducer.cues, clock, image_tiled)
    else:
        if image_features is None:
            image_features = model.encode_images(pixel_values, image_sizes, batch_num_images, image_tiled)
        if image_sizes is None:
            raise ValueError(f"reducer {reducer.name!r} needs image_sizes to know each image's anyres layout")
        layouts = image_layouts(model.config, image_sizes, batch_num_images, image_tiled)
        if len(layouts) != len(image_features):
            raise ValueError(f"{len(image_features)} image features but {len(layouts)} image sizes")
        images = [ImageTokens(f, layout) for f, layout in zip(image_features, layouts)]
    out = []
    with clock:
        for i, image in enumerate(images):
            if image.features.shape[0] != image.layout.num_tokens:
                raise ValueError(f"image {i}: {image.features.shape[0]} features, its layout has {image.layout.num_tokens}")
            reduced = reducer.reduce_image(image)
            expected = reducer.kept_count(image.layout)
            if reduced.features.shape[0] != expected:  # a reducer bug, never the user's input
                raise RuntimeError(f"{reducer.name} returned {reduced.features.shape[0]} tokens for image {i}, "
                                   f"its budget is {expected}")
            out.append(reduced)
    return out


def drop_placeholders(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                      labels: torch.Tensor | None, counts: Sequence[Sequence[int]], kept: Sequence[Sequence[int]],
                      image_token_id: int):
    """Keep the first ``kept[b][i]`` of image ``i``'s ``counts[b][i]`` placeholders in sample ``b``.

    Returns ``(input_ids, attention_mask, position_ids, labels, source_index)`` of the shortened,
    left-padded batch."""
    batch, length = input_ids.shape
    device = input_ids.device
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for b in range(batch):
        places = (input_ids[b] == image_token_id).nonzero()[:, 0]
        if places.numel() != sum(counts[b]):
            raise ValueError(f"sample {b}: the prompt has {places.numel()} image tokens but its image(s) give "
                             f"{sum(counts[b])} visual features; expand each image placeholder with the processor")
        start = 0
        for n, m in zip(counts[b], kept[b]):
            keep[b, places[start + m:start + n]] = False
            start += n
    new_len = keep.sum(1)
    width = int(new_len.max())
    pad_id = 0 if image_token_id != 0 else 1
    ids = input_ids.new_full((batch, width), pad_id)
    mask = attention_mask.new_zeros((batch, width))
    source = torch.full((batch, width), -1, dtype=torch.long, device=device)
    new_labels = None if labels is None else labels.new_full((batch, width), -100)
    new_pos = None if position_ids is None else position_ids.new_zeros((batch, width))
    dropped_before = (~keep).long().cumsum(1)
    for b in range(batch):
        rows = keep[b].nonzero()[:, 0]
        sl = slice(width - rows.numel(), width)
        ids[b, sl], mask[b, sl], source[b, sl] = input_ids[b, rows], attention_mask[b, rows], rows
        if labels is not None:
            new_labels[b, sl] = labels[b, rows]
        if position_ids is not None:
            new_pos[b, sl] = position_ids[b, rows] - dropped_before[b, rows]
    return ids, mask, new_pos, new_labels, source


def original_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                       short_ids: torch.Tensor, source_index: torch.Tensor, counts: Sequence[Sequence[int]],
                       kept_index: Sequence[Sequence[torch.Tensor]], image_token_id: int) -> torch.Tensor:
    """Positions for a shortened prompt (``drop_placeholders``) that its tokens had in the full one.

    Text tokens keep theirs (``source_index`` maps them back); image ``i`` of sample ``b`` keeps the positions of
    its placeholders ``kept_index[b][i]`` (``ReducedImage.kept``: indices into the image's ``counts[b][i]``
    tokens). Padding gets position 0."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    pos = torch.where(source_index >= 0, position_ids.gather(1, source_index.clamp(min=0)),
                      torch.zeros_like(source_index))
    for b in range(input_ids.shape[0]):
        full_slots = (input_ids[b] == image_token_id).nonzero()[:, 0]
        short_slots = (short_ids[b] == image_token_id).nonzero()[:, 0]
        full_start = short_start = 0
        for n, index in zip(counts[b], kept_index[b]):
            m = index.numel()
            pos[b, short_slots[short_start:short_start + m]] = position_ids[b, full_slots[full_start + index.to(pos.device)]]
            full_start, short_start = full_start + n, short_start + m
    return pos


@torch.no_grad()
def apply_pre_llm(model, reducer: PreLLMReducer, input_ids, attention_mask, position_ids, labels, pixel_values,
                  image_sizes, batch_num_images, image_features=None, image_tiled=None) -> PromptReduction | None:
    """Reduce the images and shorten the prompt (module docstring); None when there is nothing to reduce."""
    if reducer.is_identity or (pixel_values is None and not image_features):
        return None
    clock = _Clock(enabled=TIMING["enabled"])
    reduced = reduce_images(model, reducer, pixel_values, image_sizes, batch_num_images, image_features, clock, image_tiled)
    batch = input_ids.shape[0]
    per_sample = [int(n) for n in batch_num_images] if batch_num_images is not None else [1] * batch
    if len(per_sample) != batch or sum(per_sample) != len(reduced):
        raise ValueError(f"batch_num_images {per_sample} does not match {len(reduced)} images in a batch of {batch}")
    layouts = image_layouts(model.config, image_sizes, batch_num_images, image_tiled)
    counts, kept, start = [], [], 0
    for n in per_sample:
        counts.append([layouts[i].num_tokens for i in range(start, start + n)])
        kept.append([reduced[i].features.shape[0] for i in range(start, start + n)])
        start += n
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, mask, pos, new_labels, source = drop_placeholders(
        input_ids, attention_mask, position_ids, labels, counts, kept, model.config.image_token_id)
    if reducer.positions == "original":
        kept_index, start = [], 0
        for n in per_sample:
            kept_index.append([reduced[i].kept for i in range(start, start + n)])
            start += n
        if any(index is None for sample in kept_index for index in sample):
            raise ValueError(f"{reducer.name} resampled an image's tokens: they have no original positions")
        pos = original_positions(input_ids, attention_mask, position_ids, ids, source, counts, kept_index,
                                 model.config.image_token_id)
    return PromptReduction(ids, mask, pos, new_labels, [r.features for r in reduced], source, reduced, clock.seconds)


def finish_output(out, results, batch: int, reduction: PromptReduction | None):
    """Merge per-group selections and map ``text_index`` back to the caller's input (forward's last step)."""
    selections = [(members, r.selection) for members, r in results if getattr(r, "selection", None) is not None]
    if len(results) > 1 and selections:
        out.selection = TokenSelection.merge(selections, batch)
    if reduction is not None and out.text_index is not None:
        out.text_index = reduction.restore_text_index(out.text_index)
    return out
