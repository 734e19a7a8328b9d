"""Vision-tower cues for the pre-LLM reducers: attention received, keys, pre-projector features.

The tower keeps running with its own attention kernel (SDPA): nothing switches it to eager. Forward hooks
on the ``q_proj`` / ``k_proj`` of the one or two vision layers a reducer asks for record their outputs
while ``encode_images`` runs; the attention probabilities of *that layer only* are then recomputed from
them, a few crops at a time. A hook on the projector's input records the pre-projector features.

Every cue is laid out like the features: per image, ``pack_image`` applies to it the same tile stitching,
unpadding, anyres_max bilinear shrink and newline column (newline rows are zeros), so cue row ``i`` is
about LLM token ``i`` of that image.

SigLIP has no CLS token, so the CLS-attention score of VisionZip / VisPruner / HiRED becomes the
attention each token *receives*: softmax(QK^T / sqrt(d)) averaged over heads and over all queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch

from visor.compression.base import ImageTokens, VisionCues
from visor.compression.layout import ImageLayout
from visor.model.vision import num_crops, pack_image


def feature_layer_index(config) -> int:
    """The vision encoder layer whose output the LLM reads (``vision_feature_layer``, last entry if a list)."""
    layer = config.vision_feature_layer
    if isinstance(layer, (list, tuple)):
        layer = layer[-1]
    num_layers = config.vision_config.num_hidden_layers
    index = layer if layer >= 0 else num_layers + 1 + layer  # an index into hidden_states (0 = embeddings)
    return max(0, min(num_layers - 1, index - 1))


def resolve_layer(config, layer) -> int:
    if layer == "feature":
        return feature_layer_index(config)
    num_layers = config.vision_config.num_hidden_layers
    index = int(layer) if int(layer) >= 0 else num_layers + int(layer)
    if not 0 <= index < num_layers:
        raise ValueError(f"vision layer {layer} is outside the tower's {num_layers} layers")
    return index


def attention_received(q: torch.Tensor, k: torch.Tensor, num_heads: int, chunk: int = 4) -> torch.Tensor:
    """[crops, T, D] queries and keys -> [crops, T]: softmax(QK^T/sqrt(d)) averaged over heads and queries."""
    crops, tokens, dim = q.shape
    head_dim = dim // num_heads
    out = []
    for start in range(0, crops, chunk):
        qs = q[start:start + chunk].float().view(-1, tokens, num_heads, head_dim).transpose(1, 2)
        ks = k[start:start + chunk].float().view(-1, tokens, num_heads, head_dim).transpose(1, 2)
        probs = torch.softmax((qs @ ks.transpose(-1, -2)) * head_dim ** -0.5, dim=-1)
        out.append(probs.mean(dim=(1, 2)))
    return torch.cat(out)


@contextmanager
def _record(model, layers: Sequence[int], want_features: bool):
    tower = model.vision_tower
    store: dict = {("q", i): [] for i in layers} | {("k", i): [] for i in layers} | {"features": []}
    handles = []
    for i in layers:
        attn = tower.encoder.layers[i].self_attn
        handles.append(attn.q_proj.register_forward_hook(lambda m, a, out, i=i: store[("q", i)].append(out.detach())))
        handles.append(attn.k_proj.register_forward_hook(lambda m, a, out, i=i: store[("k", i)].append(out.detach())))
    if want_features:
        handles.append(model.multi_modal_projector.register_forward_pre_hook(
            lambda m, args: store["features"].append(args[0].detach())))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def image_layouts(config, image_sizes: torch.Tensor, batch_num_images: Sequence[int] | None,
                  image_tiled: Sequence[bool] | None = None) -> list[ImageLayout]:
    tiled = [True] * len(image_sizes) if batch_num_images is None else [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    if image_tiled is not None:  # a base-only image (visor.model.resolution)
        tiled = [bool(t) for t in image_tiled]
    return [ImageLayout.from_config(config, size.tolist(), t) for size, t in zip(image_sizes, tiled)]


@torch.no_grad()
def encode_with_cues(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                     batch_num_images: Sequence[int] | None, cues: VisionCues, clock=None,
                     image_tiled: Sequence[bool] | None = None) -> list[ImageTokens]:
    """``model.encode_images`` plus the ``cues`` a reducer asked for, per image (see module docstring).

    ``clock`` (a context manager) times the cue computation only, not the tower it rides along with."""
    config = model.config
    layers = sorted({resolve_layer(config, l) for l in cues.attention_layers}
                    | ({feature_layer_index(config)} if cues.keys else set()))
    with _record(model, layers, cues.features) as store:
        features = model.encode_images(pixel_values, image_sizes, batch_num_images, image_tiled)
    with clock if clock is not None else nullcontext():
        return _pack_cues(model, features, store, image_sizes, batch_num_images, cues, image_tiled)


def _pack_cues(model, features, store, image_sizes, batch_num_images, cues: VisionCues, image_tiled=None) -> list[ImageTokens]:
    config = model.config
    layouts = image_layouts(config, image_sizes, batch_num_images, image_tiled)
    base = config.vision_config.image_size
    crops = [num_crops(size.tolist(), config.image_grid_pinpoints, base, lay.tiled) for size, lay in zip(image_sizes, layouts)]
    per_crop: dict = {}  # cue name -> [total_crops, T, C]
    for name in cues.attention_layers:
        index = resolve_layer(config, name)
        attn = model.vision_tower.encoder.layers[index].self_attn
        q, k = torch.cat(store[("q", index)]), torch.cat(store[("k", index)])
        per_crop[("attention", name)] = attention_received(q, k, attn.num_heads)[..., None]
    if cues.keys:
        index = feature_layer_index(config)
        attn = model.vision_tower.encoder.layers[index].self_attn
        k = torch.cat(store[("k", index)])
        per_crop["keys"] = k.float().view(*k.shape[:2], attn.num_heads, -1).mean(2)
    if cues.features:
        per_crop["features"] = torch.cat(store["features"]).float()
    images = []
    offsets = [0]
    for n in crops:
        offsets.append(offsets[-1] + n)
    for i, (feat, layout, size) in enumerate(zip(features, layouts, image_sizes)):
        if feat.shape[0] != layout.num_tokens:
            raise ValueError(f"image {i}: {feat.shape[0]} features but its layout has {layout.num_tokens} tokens")
        packed = {}
        for name, values in per_crop.items():
            values = values[offsets[i]:offsets[i + 1]]
            tokens = layout.grid * layout.grid
            values = values[:, -tokens:]  # a dropped first (CLS-like) token is not laid out
            packed[name] = pack_image(
                values, size.tolist(), values.new_zeros(values.shape[-1]), grid_pinpoints=config.image_grid_pinpoints,
                base_size=base, vision_aspect_ratio=config.vision_aspect_ratio,
            )
        images.append(ImageTokens(
            features=feat, layout=layout,
            attention={name: packed[("attention", name)][:, 0] for name in cues.attention_layers},
            keys=packed.get("keys"), vision_features=packed.get("features"),
        ))
    return images
