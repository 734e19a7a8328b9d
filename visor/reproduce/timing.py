"""Measured prefill speedup of every method on the evaluated (tiny) models.

What is timed: the LLM prefill that generation runs before the first token (``forward(..., logits_to_keep=1,
use_cache=True)``, batch 1) with the image features precomputed, since the vision tower is the same for
every method. On top of it:

* a pre-LLM reducer: its selection (cues + ranking/merging, ``visor.compression.timing.selection_seconds``)
  plus the prefill on the tokens it kept;
* an in-LLM reducer (FastV, PyramidDrop): inside the prefill (scoring and pruning included);
* routed: the routing pass (``model.route``) plus, per configuration, its prefill time weighted by how often
  the router chose it on the test items.

Every *atom* (one model, configuration and reducer) is timed over the same few test items; the atoms are
interleaved, in a rotated order each repeat, so load drift on a shared machine hits all of them alike; the
median over repeats is kept after one warm-up pass. Speedup = baseline time / method time.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class _Prepared:
    """One timing item prepared for one model: prompt, precomputed features, reduced inputs per reducer."""

    def __init__(self, model, batch: dict) -> None:
        self.model = model
        self.batch = batch
        with torch.no_grad():
            self.features = model.encode_images(batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"])
        self.reduced: dict[str, dict] = {}

    def inputs(self) -> dict:
        return {"input_ids": self.batch["input_ids"], "attention_mask": self.batch["attention_mask"],
                "image_features": self.features, "batch_num_images": self.batch["batch_num_images"]}

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


def atoms_for(methods, router_configs: list[tuple[int, ...]] | None) -> list[tuple]:
    """The timed units: ``(model, config | "route", reducer)``."""
    atoms = []
    for m in methods:
        if m.route:
            atoms.append((m.model, "route", None))
            for config in router_configs or []:
                atoms.append((m.model, tuple(config), m.reducer))
        else:
            atoms.append((m.model, None if m.active_sa is None else tuple(m.active_sa), m.reducer))
    seen, out = set(), []
    for atom in atoms:
        if atom not in seen:
            seen.add(atom)
            out.append(atom)
    return out


@torch.no_grad()
def measure(models: dict, tokenizer, image_processor, items, methods, router_configs, *, repeats: int = 5,
            precision: str = "bf16", progress: bool = True) -> dict:
    """Median seconds per atom over the timing items, and the selection seconds per (model, reducer)."""
    from visor.data.batch import Batcher, Sample

    prepared = {}
    for kind, model in models.items():
        model.eval()
        batcher = Batcher.for_model(model, tokenizer[kind], image_processor[kind])
        prepared[kind] = [_Prepared(model, batcher.prompt_batch([Sample(it.images, it.turns)])) for it in items]
    atoms = atoms_for(methods, router_configs)

    def call(atom) -> None:
        kind, config, reducer = atom
        model = models[kind]
        for item in prepared[kind]:
            if config == "route":
                model.route(item.batch["input_ids"], item.batch["attention_mask"], image_features=item.features,
                            batch_num_images=item.batch["batch_num_images"])
                continue
            inputs = item.reduced_inputs(reducer) if reducer else item.inputs()
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
            for kind, config, reducer in atoms:
                if reducer and config != "route":
                    key = (kind, reducer)
                    if len(selections.get(key, [])) <= rep:
                        selections.setdefault(key, []).append(sum(p.selection(reducer) for p in prepared[kind]))
        bar.close()
    return {"atoms": {atom: statistics.median(v) for atom, v in samples.items()},
            "selection": {key: statistics.median(v) for key, v in selections.items()},
            "repeats": repeats, "items": len(items)}


def method_seconds(method, measured: dict, chosen: Counter | None) -> float | None:
    """A method's prefill seconds over the timing items, composed from the measured atoms."""
    atoms, selection = measured["atoms"], measured["selection"]
    extra = selection.get((method.model, method.reducer), 0.0) if method.reducer else 0.0
    if not method.route:
        key = (method.model, None if method.active_sa is None else tuple(method.active_sa), method.reducer)
        return atoms[key] + extra if key in atoms else None
    total = sum((chosen or {}).values())
    if not total:
        return None
    seconds = atoms[(method.model, "route", None)] + extra
    for config, n in chosen.items():
        key = (method.model, config, method.reducer)
        if key not in atoms:
            return None
        seconds += atoms[key] * n / total
    return seconds


def chosen_configs(predictions) -> Counter:
    """How often each configuration was chosen (from the harness's ``active_sa`` strings)."""
    counts: Counter = Counter()
    for row in predictions:
        active = row.get("active_sa")
        if active is None:
            continue
        counts[() if active == "none" else tuple(int(s) for s in active.split("+"))] += 1
    return counts
