"""Resolution on request: route on the base view, encode the anyres tiles only for samples that need them.

How a batch runs (``generate_on_request``):

1. Every sample is laid out *base-only* (``visor.model.resolution``: its image as one image of a
   multi-image prompt, base grid + 1 newline, positions numbered for that input) and only the base views go
   through the vision tower (one crop per image).
2. The routing pass (``visor.routing.router.routing_logits``: routing token(s) after the prompt, the layers
   up to ``read_after_layer`` under the CA-only configuration, then the MLP) reads those base-view tokens and
   the question, and picks a ``Configuration`` (resolution + active SA slots) per sample. Placement: by
   default after the layer before the first SA slot (default plan: text-only layer 0 + CA layer 1, so the
   base view has been read once through cross-attention); ``attach_router(read_after_layer=...)`` moves it
   deeper for a resolution router (the pass then runs more CA layers; ``benchmarks/resolution_e2e.py``
   measures what each placement costs).
3. One mixed batch is generated: samples routed to ``base`` keep their base-only prompt and the base-view
   features already computed; samples routed to ``full`` are laid out again with their tiles, and only
   their tiles go through the tower: the base view's features are reused when its pixels are the same in
   both layouts (the multi-image path pads to a square before resizing, the anyres path does not, so they
   agree exactly for square images, e.g. every procedural-benchmark image) and encoded again otherwise.
   Samples are grouped by active SA slots inside ``generate`` and returned in the original order.

Cost (``on_request_flops``): the routing pass (its layers on the base layout + routing tokens, and the MLP)
is counted on top of the chosen configuration's LLM prefill; the vision tower is counted for the crops it
really encoded (1 per image for ``base``; for ``full`` the tiles, plus the base view again when it could not
be reused). Not reused (counted): the routing pass's LLM layers, which a full-resolution sample runs again
on its longer layout; for a base-routed sample the same prefix could be kept, which would save
``router_overhead`` minus the MLP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from visor.model.resolution import BASE, FULL, Configuration, image_tiled
from visor.model.vision import num_crops, pack_image


# ---------------------------------------------------------------------- cost
def _layout(model, sizes: Sequence[Sequence[int]], resolution: str) -> tuple[int, int]:
    """(visual tokens, crops) of one sample's images at ``resolution``."""
    cfg = model.config
    flags = image_tiled(resolution, [len(sizes)])
    n_visual = sum(model.num_image_tokens(tuple(int(v) for v in s), tiled=t) for s, t in zip(sizes, flags))
    crops = sum(num_crops([int(v) for v in s], cfg.image_grid_pinpoints, cfg.vision_config.image_size, t) for s, t in zip(sizes, flags))
    return n_visual, crops


def configuration_flops(model, config: Configuration, sizes: Sequence[Sequence[int]], n_text: int, geometry=None):
    """``CostBreakdown`` of one sample under ``config``: LLM prefill lines plus the vision tower and projector
    for the crops its resolution encodes (``.total`` is end to end). A text-only sample runs every layer on
    its text alone, as ``visor.eval.harness`` counts it."""
    from visor.cost import Geometry, count_prefill
    from visor.model.plan import LayerPlan

    geometry = geometry or Geometry.from_config(model.config)
    plan = model.plan
    n_visual, crops = _layout(model, sizes, config.resolution) if sizes else (0, 0)
    active = config.active_sa
    if n_visual == 0:
        plan, active, n_visual = LayerPlan(plan.num_layers, (), ()), (), 1
    return count_prefill(geometry, plan, active, n_visual, max(int(n_text), 1),
                         ca_kv_layout=getattr(model.config, "ca_kv_layout", "gqa"), n_crops=crops or None)


def end_to_end_costs(model, configs: Sequence[Configuration], sizes_per_sample: Sequence, n_text: Sequence[int]) -> torch.Tensor:
    """[B, num_configs] end-to-end FLOPs (vision + LLM) of each configuration / the most expensive one."""
    from visor.cost import Geometry

    geometry = Geometry.from_config(model.config)
    rows = []
    for sizes, nt in zip(sizes_per_sample, n_text):
        flops = [float(configuration_flops(model, c, sizes, int(nt), geometry).total) for c in configs]
        top = max(flops)
        rows.append([f / top for f in flops])
    return torch.tensor(rows, dtype=torch.float32)


def on_request_flops(model, config: Configuration, sizes: Sequence[Sequence[int]], n_text: int,
                     base_reused: bool = True, geometry=None) -> dict:
    """What one sample routed on request costs (module docstring): ``llm`` (prefill of the chosen
    configuration + the routing pass), ``vision`` (tower + projector on every crop encoded), ``crops``."""
    from visor.cost import Geometry
    from visor.routing.router import router_overhead_flops

    geometry = geometry or Geometry.from_config(model.config)
    chosen = configuration_flops(model, config, sizes, n_text, geometry)
    base_visual, base_crops = _layout(model, sizes, BASE) if sizes else (0, 0)
    routing = router_overhead_flops(model, base_visual, int(n_text))
    crops = base_crops  # the base views, encoded for the routing pass
    if config.resolution == FULL and sizes:
        _, full_crops = _layout(model, sizes, FULL)
        extra = full_crops - base_crops  # the tiles
        if extra and not base_reused:
            extra += base_crops
        crops += extra
    vision = 0.0
    if crops:
        base_cost = configuration_flops(model, Configuration((), BASE), sizes, n_text, geometry)
        per_crop = ((base_cost.vision_encoder or 0) + (base_cost.projector or 0)) / max(base_cost.n_crops or 1, 1)
        vision = per_crop * crops
    return {"llm": float(chosen.llm_total + routing), "vision": float(vision), "crops": int(crops),
            "routing": float(routing), "chosen_llm": float(chosen.llm_total)}


# ---------------------------------------------------------------------- routing
def _check_base_layout(model, input_ids, attention_mask, image_sizes, batch_num_images, image_tiled_flags) -> None:
    """A resolution router reads base-only prompts: every single-image sample must be laid out base-only."""
    if image_sizes is None:
        return
    counts = [1] * input_ids.shape[0] if batch_num_images is None else [int(n) for n in batch_num_images]
    flags = image_tiled_flags if image_tiled_flags is not None else [n == 1 for n in counts for _ in range(n)]
    if image_tiled_flags is None and any(flags):
        # no flags: look at the placeholders (a caller may hand over base-only ids with precomputed features)
        mask = attention_mask.bool()
        tokens = ((input_ids == model.config.image_token_id) & mask).sum(1).tolist()
        start = 0
        for b, n in enumerate(counts):
            sizes = [tuple(int(v) for v in image_sizes[start + i]) for i in range(n)]
            start += n
            if n == 1 and tokens[b] != sum(model.num_image_tokens(s, tiled=False) for s in sizes):
                raise ValueError("this router picks the resolution from the base view: lay the prompts out base-only "
                                 "(Batcher/processor resolution='base'), or use generate_on_request")
    elif any(flags):
        raise ValueError("this router picks the resolution from the base view: got tiled images (use resolution='base')")


@torch.no_grad()
def route_on_request(model, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                     image_features=None, budget: float = 0.0, image_tiled_flags=None) -> list[Configuration]:
    """The ``Configuration`` a resolution router picks per sample, from base-only inputs.

    ``budget`` biases the logits by each configuration's end-to-end cost relative to the dearest, at the
    sample's own image sizes (needs ``image_sizes``)."""
    from visor.routing.router import router_configurations, routing_logits

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_base_layout(model, input_ids, attention_mask, image_sizes, batch_num_images, image_tiled_flags)
    if image_features is None and pixel_values is not None:
        counts = [1] * input_ids.shape[0] if batch_num_images is None else batch_num_images
        flags = image_tiled_flags if image_tiled_flags is not None else image_tiled(BASE, counts)
        image_features = model.encode_images(pixel_values, image_sizes, batch_num_images, flags)
    per_sample = model._assign_images(image_features or [], input_ids.shape[0], batch_num_images)
    logits = routing_logits(model, input_ids, attention_mask, per_sample).float()
    configs = router_configurations(model)
    if budget:
        if image_sizes is None and any(per_sample):
            raise ValueError("a budget on a resolution router needs image_sizes (its costs depend on the tiles)")
        mask = attention_mask.bool()
        n_text = (mask & (input_ids != model.config.image_token_id)).sum(1).tolist()
        sizes, start = [], 0
        for images in per_sample:
            sizes.append([tuple(int(v) for v in image_sizes[start + i]) for i in range(len(images))])
            start += len(images)
        costs = end_to_end_costs(model, configs, sizes, n_text)
        logits = logits - float(budget) * costs.to(logits.device)
    return [configs[int(i)] for i in logits.argmax(-1)]


# ---------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_tiles(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                 base_features: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Full-layout features of single images (anyres ``pixel_values`` [n, crops, 3, H, W]) where the base
    view's projected grid is taken from ``base_features[i]`` (a base-only layout: grid + newline) when given,
    so only the tiles go through the tower; ``None`` encodes the base view too."""
    cfg = model.config
    base = cfg.vision_config.image_size
    crops, counts = [], []
    for pv, size, reuse in zip(pixel_values, image_sizes, base_features):
        n = num_crops(size.tolist(), cfg.image_grid_pinpoints, base, True)
        part = pv[1:n] if reuse is not None else pv[:n]
        crops.append(part)
        counts.append(part.shape[0])
    encoded = model.multi_modal_projector(model.vision_features(torch.cat(crops).to(model.dtype))) if sum(counts) else None
    out, start = [], 0
    for size, reuse, count in zip(image_sizes, base_features, counts):
        own = encoded[start:start + count]
        start += count
        if reuse is not None:
            own = torch.cat([reuse[:-1][None].to(own.dtype), own], dim=0)  # the base grid, without its newline
        out.append(pack_image(own, size.tolist(), model.image_newline, grid_pinpoints=cfg.image_grid_pinpoints,
                              base_size=base, vision_aspect_ratio=cfg.vision_aspect_ratio))
    return out


# ---------------------------------------------------------------------- generation
@dataclass
class OnRequest:
    """What ``generate_on_request`` returns: the sequences of the mixed batch (``prompt_length`` prompt
    columns, then the new tokens), the configuration each sample ran, the crops the tower encoded per
    sample, whether a full-resolution sample's base view was reused, and the batch that was generated."""

    sequences: torch.Tensor
    prompt_length: int
    configurations: list[Configuration]
    crops: list[int]
    base_reused: list[bool]
    batch: dict = field(repr=False, default_factory=dict)


@dataclass
class RoutedInputs:
    """What ``route_and_encode`` returns: the batch laid out per sample at its chosen resolution (token ids;
    ``batch_num_images``/``image_tiled``), the configurations, what to pass the model for the images
    (``image_features`` in image order, or the pixels when a reducer needs the tower again), the crops the
    tower encoded per sample, and whether a full-resolution sample's base view was reused."""

    batch: dict
    configurations: list[Configuration]
    image_kwargs: dict
    crops: list[int]
    base_reused: list[bool]


@torch.no_grad()
def route_and_encode(model, batcher, samples: Sequence, *, budget: float = 0.0, reuse_base_view: bool = True,
                     configurations: Sequence[Configuration] | None = None, reducer=None) -> RoutedInputs:
    """Steps 1-2 of the module docstring and the image half of step 3: encode the base views, route, lay
    every sample out at its resolution and encode the tiles of the samples routed to full. Generation
    (``generate_on_request``) and scoring (the lmms-eval plugin's log-likelihoods) share it."""
    samples = list(samples)
    device = next(model.parameters()).device
    base_batch = batcher.prompt_batch(samples, resolution=BASE)
    counts = [len(s.images) for s in samples]
    sizes = base_batch.get("image_sizes")
    flags_base = image_tiled(BASE, counts)
    base_features: list[torch.Tensor] = []
    if "pixel_values" in base_batch:
        base_features = model.encode_images(base_batch["pixel_values"].to(device), sizes, counts, flags_base)
    if configurations is None:
        ids, mask = base_batch["input_ids"].to(device), base_batch["attention_mask"].to(device)
        configurations = route_on_request(model, ids, mask, image_sizes=sizes, batch_num_images=counts,
                                          image_features=base_features, budget=budget, image_tiled_flags=flags_base)
    configurations = [c if isinstance(c, Configuration) else Configuration(tuple(c)) for c in configurations]
    if len(configurations) != len(samples):
        raise ValueError(f"{len(configurations)} configurations for {len(samples)} samples")
    resolutions = [c.resolution for c in configurations]
    batch = batcher.prompt_batch(samples, resolution=resolutions, pixels=False)
    flags = image_tiled(resolutions, counts)
    # features in image order: base views as computed, tiles encoded for the images routed to full
    tiled_index = [i for i, t in enumerate(flags) if t]
    features = list(base_features)
    reused = [False] * len(flags)
    image_kwargs: dict = {}
    images = [im for s in samples for im in s.images]
    from visor.processing.processor import images_to_pixels

    if reducer is not None:  # a reducer may score with the tower's attention: the pixels, all encoded again
        image_kwargs = images_to_pixels(batcher.image_processor, [s.images for s in samples], flags) if images else {}
        image_kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in image_kwargs.items()}
    else:
        if tiled_index:
            pixels = images_to_pixels(batcher.image_processor, [[images[i]] for i in tiled_index])
            reuse = []
            for row, i in enumerate(tiled_index):
                same = reuse_base_view and torch.equal(pixels["pixel_values"][row, 0], base_batch["pixel_values"][i, 0])
                reuse.append(base_features[i] if same else None)
                reused[i] = bool(same)
            full = encode_tiles(model, pixels["pixel_values"].to(device), pixels["image_sizes"], reuse)
            for i, f in zip(tiled_index, full):
                features[i] = f
        image_kwargs["image_features"] = features
    cfg = model.config
    crops_per_image = []
    for i, t in enumerate(flags):  # the base view for routing, then what the chosen layout encoded on top
        again = num_crops(sizes[i].tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size, t) if t else 0
        if reducer is not None:
            again = again or 1
        crops_per_image.append(1 + again - (1 if reused[i] else 0))
    crops, start = [], 0
    for n in counts:
        crops.append(sum(crops_per_image[start:start + n]))
        start += n
    return RoutedInputs(batch=batch, configurations=list(configurations), image_kwargs=image_kwargs, crops=crops,
                        base_reused=[any(reused[j] for j in _images_of(counts, b)) for b in range(len(samples))])


@torch.no_grad()
def generate_on_request(model, batcher, samples: Sequence, *, budget: float = 0.0, reuse_base_view: bool = True,
                        configurations: Sequence[Configuration] | None = None, **generate_kwargs) -> OnRequest:
    """Route on the base view, then generate one mixed batch, tiles encoded only where routed to full.

    ``samples``: ``visor.data.batch.Sample``s (images + turns). ``configurations``: skip the router and run
    these (one per sample; what the tests compare against). ``generate_kwargs`` go to ``model.generate``
    (``max_new_tokens``, ``eos_token_id``, ``reducer``, ...)."""
    samples = list(samples)
    device = next(model.parameters()).device
    routed = route_and_encode(model, batcher, samples, budget=budget, reuse_base_view=reuse_base_view,
                              configurations=configurations, reducer=generate_kwargs.get("reducer"))
    batch, counts = routed.batch, [len(s.images) for s in samples]
    flags = image_tiled([c.resolution for c in routed.configurations], counts)
    sequences = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               batch_num_images=counts if any(counts) else None,
                               image_tiled=flags if any(counts) else None,
                               active_sa=[c.active_sa for c in routed.configurations], **routed.image_kwargs,
                               **generate_kwargs)
    return OnRequest(sequences=sequences, prompt_length=batch["input_ids"].shape[1],
                     configurations=routed.configurations, crops=routed.crops, base_reused=routed.base_reused, batch=batch)


def _images_of(counts: Sequence[int], b: int) -> range:
    start = sum(counts[:b])
    return range(start, start + counts[b])
