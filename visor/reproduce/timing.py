"""Measured prefill speedup of every method on the evaluated (tiny) models, LLM-only and end to end.

What is timed: the LLM prefill that generation runs before the first token (``forward(..., logits_to_keep=1,
use_cache=True)``, batch 1) with the image features precomputed, and, apart, the vision tower (SigLIP +
projector + anyres packing) on preprocessed pixels. On top of the prefill:

* a pre-LLM reducer: its selection (cues + ranking/merging, ``visor.compression.timing.selection_seconds``)
  plus the prefill on the tokens it kept;
* an in-LLM reducer (FastV, PyramidDrop): inside the prefill (scoring and pruning included);
* routed: the routing pass (``model.route``) plus, per configuration, its prefill time weighted by how often
  the router chose it on the test items;
* routed with a resolution router (``visor.routing.resolution``): the routing pass on the base-only layout,
  then per chosen configuration its prefill on its own layout (base-only or full), weighted as above.

End to end (``method_seconds_e2e``) adds the vision tower: every full-resolution item encodes all its crops;
a resolution-routed item encodes its base view (for routing), plus, when routed to full, its tiles (the base
view's features reused, as ``route_and_encode`` does for square images). Pixel preprocessing (PIL resizing)
is not timed for any method. A resolution router combined with a reducer is not timed (``None``): its tiles
go through the tower again for the reducer's cues, a path this composition does not model.

Every *atom* (one model, configuration, reducer and layout) is timed over the same few test items; the atoms
are interleaved, in a rotated order each repeat, so load drift on a shared machine hits all of them alike;
the median over repeats is kept after one warm-up pass. Speedup = baseline time / method time.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch
from tqdm.auto import tqdm

from visor.model.resolution import BASE, FULL, image_tiled, names_resolution, parse_configuration
from visor.precision import autocast as _autocast

ROUTE, VISION, TILES = "route", "vision", "tiles"  # atom kinds besides a configuration (None | slot tuple)


class _Prepared:
    """One timing item prepared for one model: prompt and precomputed features per layout, reduced inputs
    per reducer, and closures for the vision tower's work."""

    def __init__(self, model, batch: dict, base_batch: dict | None = None) -> None:
        self.model = model
        self.batch = batch
        self.counts = batch.get("batch_num_images") or [1] * batch["input_ids"].shape[0]
        with torch.no_grad():
            self.features = self.encode_full() if "pixel_values" in batch else None
        self.base_batch = base_batch
        self.base_features = None
        if base_batch is not None and "pixel_values" in base_batch:
            with torch.no_grad():
                self.base_features = self.encode_base()
        self.reduced: dict[str, dict] = {}

    def encode_full(self):
        b = self.batch
        return self.model.encode_images(b["pixel_values"], b["image_sizes"], b["batch_num_images"])

    def encode_base(self):
        b = self.base_batch
        return self.model.encode_images(b["pixel_values"], b["image_sizes"], self.counts, image_tiled(BASE, self.counts))

    def encode_tiles(self):
        """The tiles of the images a full layout tiles, the base view's features reused where its pixels agree."""
        from visor.routing.resolution import encode_tiles

        flags = image_tiled(FULL, self.counts)
        index = [i for i, t in enumerate(flags) if t]
        if not index or self.base_features is None:
            return []
        full, base = self.batch["pixel_values"], self.base_batch["pixel_values"]
        reuse = [self.base_features[i] if torch.equal(full[i, 0], base[i, 0]) else None for i in index]
        return encode_tiles(self.model, full[index], self.batch["image_sizes"][index], reuse)

    def inputs(self, layout: str = FULL) -> dict:
        if layout == BASE:
            b = self.base_batch
            return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "image_features": self.base_features,
                    "batch_num_images": self.counts, "image_tiled": image_tiled(BASE, self.counts)}
        return {"input_ids": self.batch["input_ids"], "attention_mask": self.batch["attention_mask"],
                "image_features": self.features, "batch_num_images": self.batch.get("batch_num_images")}

    def route(self, layout: str) -> None:
        from visor.routing.resolution import route_on_request

        if layout == BASE:
            b = self.base_batch
            route_on_request(self.model, b["input_ids"], b["attention_mask"], image_sizes=b.get("image_sizes"),
                             batch_num_images=self.counts, image_features=self.base_features,
                             image_tiled_flags=image_tiled(BASE, self.counts))
        else:
            b = self.batch
            self.model.route(b["input_ids"], b["attention_mask"], image_features=self.features,
                             batch_num_images=b.get("batch_num_images"))

    def reduced_inputs(self, reducer: str) -> dict:
        from visor.compression import build_reducer
        from visor.compression.timing import reduced_forward_inputs

        if reducer not in self.reduced:
            r = build_reducer(reducer)
            if r.stage == "pre_llm":
                full = {**self.inputs(), "pixel_values": self.batch["pixel_values"], "image_sizes": self.batch["image_sizes"]}
                out = reduced_forward_inputs(self.model, r, full)
                out.pop("pixel_values", None)
                out.pop("image_sizes", None)
                self.reduced[reducer] = out
            else:
                self.reduced[reducer] = {**self.inputs(), "reducer": r}
        return self.reduced[reducer]

    def selection(self, reducer: str) -> float:
        from visor.compression import build_reducer
        from visor.compression.timing import selection_seconds

        r = build_reducer(reducer)
        if r.stage != "pre_llm":
            return 0.0  # counted inside the prefill
        full = {**self.inputs(), "pixel_values": self.batch["pixel_values"], "image_sizes": self.batch["image_sizes"]}
        return selection_seconds(self.model, r, full)


def atoms_for(methods, router_configs: list | None) -> list[tuple]:
    """The timed units ``(model, config, reducer, layout)``: ``config`` is ``None`` (every slot), a slot tuple,
    ``"route"`` (the routing pass), ``"vision"`` (the tower on the layout's crops) or ``"tiles"`` (the tiles
    alone, the base view reused); ``layout`` is ``"full"`` or ``"base"``."""
    resolution = names_resolution(router_configs)
    atoms = []
    for m in methods:
        atoms.append((m.model, VISION, None, FULL))
        if m.route and resolution:
            if m.reducer:
                continue  # not timed (module docstring)
            atoms += [(m.model, VISION, None, BASE), (m.model, TILES, None, FULL), (m.model, ROUTE, None, BASE)]
            for entry in router_configs:
                c = parse_configuration(entry)
                atoms.append((m.model, c.active_sa, None, c.resolution))
        elif m.route:
            atoms.append((m.model, ROUTE, None, FULL))
            for config in router_configs or []:
                atoms.append((m.model, tuple(config), m.reducer, FULL))
        else:
            atoms.append((m.model, None if m.active_sa is None else tuple(m.active_sa), m.reducer, FULL))
    return list(dict.fromkeys(atoms))  # unique, in order


@torch.no_grad()
def measure(models: dict, tokenizer, image_processor, items, methods, router_configs, *, repeats: int = 5,
            precision: str = "bf16", progress: bool = True) -> dict:
    """Median seconds per atom over the timing items, and the selection seconds per (model, reducer)."""
    from visor.data.batch import Batcher, Sample

    atoms = atoms_for(methods, router_configs)
    base_layout = {a[0] for a in atoms if a[3] == BASE}
    prepared = {}
    for kind, model in models.items():
        model.eval()
        batcher = Batcher.for_model(model, tokenizer[kind], image_processor[kind])
        prepared[kind] = []
        for it in items:
            sample = Sample(it.images, it.turns)
            base = batcher.prompt_batch([sample], resolution=BASE) if kind in base_layout else None
            prepared[kind].append(_Prepared(model, batcher.prompt_batch([sample]), base))

    def call(atom) -> None:
        kind, config, reducer, layout = atom
        model = models[kind]
        for item in prepared[kind]:
            if config == ROUTE:
                item.route(layout)
            elif config == VISION:
                if item.features is not None:  # an item without an image has nothing to encode
                    (item.encode_base if layout == BASE else item.encode_full)()
            elif config == TILES:
                item.encode_tiles()
            else:
                inputs = item.reduced_inputs(reducer) if reducer else item.inputs(layout)
                model(**inputs, active_sa=config, logits_to_keep=1, use_cache=True)

    samples: dict[tuple, list[float]] = {atom: [] for atom in atoms}
    selections: dict[tuple, list[float]] = {}
    with _autocast(precision):
        for atom in atoms:  # warm-up (and reduced inputs prepared outside the timed region)
            call(atom)
        bar = tqdm(total=repeats * len(atoms), desc="prefill timing", disable=not progress, leave=False)
        for rep in range(repeats):
            shift = rep % len(atoms)
            for atom in atoms[shift:] + atoms[:shift]:
                start = time.perf_counter()
                call(atom)
                samples[atom].append(time.perf_counter() - start)
                bar.update(1)
            for kind, config, reducer, _ in atoms:
                if reducer and config not in (ROUTE, VISION, TILES):
                    key = (kind, reducer)
                    if len(selections.get(key, [])) <= rep:
                        selections.setdefault(key, []).append(sum(p.selection(reducer) for p in prepared[kind]))
        bar.close()
    return {"atoms": {atom: statistics.median(v) for atom, v in samples.items()},
            "selection": {key: statistics.median(v) for key, v in selections.items()},
            "repeats": repeats, "items": len(items)}


def method_seconds(method, measured: dict, chosen: Counter | None, end_to_end: bool = False) -> float | None:
    """A method's seconds over the timing items, composed from the measured atoms: the LLM prefill (with
    routing and selection), or with ``end_to_end`` the vision tower too. ``chosen``: a routed method's
    configurations as ``chosen_layouts`` counts them. ``None`` where an atom is missing."""
    atoms, selection = measured["atoms"], measured["selection"]
    extra = selection.get((method.model, method.reducer), 0.0) if method.reducer else 0.0
    vision_full = atoms.get((method.model, VISION, None, FULL)) if end_to_end else 0.0
    if vision_full is None:
        return None
    if not method.route:
        key = (method.model, None if method.active_sa is None else tuple(method.active_sa), method.reducer, FULL)
        return atoms[key] + extra + vision_full if key in atoms else None
    total = sum((chosen or {}).values())
    if not total:
        return None
    if any(resolution == BASE for resolution, _ in chosen) or (method.model, ROUTE, None, BASE) in atoms:
        if method.reducer:
            return None
        route = atoms.get((method.model, ROUTE, None, BASE))
        base_vision = atoms.get((method.model, VISION, None, BASE)) if end_to_end else 0.0
        tiles = atoms.get((method.model, TILES, None, FULL)) if end_to_end else 0.0
        if route is None or base_vision is None or tiles is None:
            return None
        seconds = route + base_vision
        for (resolution, config), n in chosen.items():
            key = (method.model, config, None, resolution)
            if key not in atoms:
                return None
            seconds += (atoms[key] + (tiles if resolution == FULL else 0.0)) * n / total
        return seconds
    route = atoms.get((method.model, ROUTE, None, FULL))
    if route is None:
        return None
    seconds = route + extra + vision_full
    for (_, config), n in chosen.items():
        key = (method.model, config, method.reducer, FULL)
        if key not in atoms:
            return None
        seconds += atoms[key] * n / total
    return seconds


def chosen_layouts(predictions) -> Counter:
    """How often each (resolution, slots) configuration was chosen (the harness's ``resolution`` and
    ``active_sa`` strings; no resolution = full)."""
    counts: Counter = Counter()
    for row in predictions:
        active = row.get("active_sa")
        if active is None:
            continue
        slots = () if active == "none" else tuple(int(s) for s in active.split("+"))
        counts[(row.get("resolution") or FULL, slots)] += 1
    return counts


def chosen_configs(predictions) -> Counter:
    """How often each set of active slots was chosen, whatever the resolution."""
    counts: Counter = Counter()
    for (_, slots), n in chosen_layouts(predictions).items():
        counts[slots] += n
    return counts
