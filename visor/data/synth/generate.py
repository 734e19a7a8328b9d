"""Generate benchmark items: one at a time, as a map-style dataset, as an endless stream, or to disk.

Determinism: item ``i`` of a split is drawn from its own ``numpy`` generator seeded with
``item_seed(split, seed, i)`` (see :mod:`visor.data.synth.seeds`), and its family is
``families[i % len(families)]`` (round robin, so families are balanced in every prefix). With integer
``weights`` a family of weight w appears w times per cycle of ``sum(weights)`` items, spread evenly
(:func:`family_cycle`): a training mix that shows some families more often. The same
(split, seed, index, config, families, weights) therefore gives the same item and byte-identical PNG on
every run, on any worker, in any order.

On disk (:func:`write_split`) a split is the standard LLaVA conversation format::

    DIR/{split}.jsonl                      one record per line
    DIR/images/{split}/{id}.png            the image, referenced relative to DIR
    DIR/{split}.meta.json                  config, seed, families, counts (for reproducibility)

each record being ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n<q>"},
{"from": "gpt", "value": "<a>"}], "family", "difficulty", "grader", "scene"}``. ``scene`` (a few hundred
bytes) lets a reader re-render the image, re-derive the answer and compute dense targets; pass
``include_scene=False`` to leave it out. Glyph boxes are never written: they are recomputed from the
scene by :func:`visor.data.synth.render.render_scene`.

Nothing here imports torch. :class:`SynthDataset` has ``__len__``/``__getitem__`` so a
``torch.utils.data.DataLoader`` takes it as a map-style dataset; :class:`SynthStream` is an endless
iterable that shards itself across DataLoader workers and distributed ranks when torch is present.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from visor.data.synth.config import DEFAULT_CONFIG, FAMILIES, SynthConfig, difficulty_of
from visor.data.synth.families import FAMILY_GRADERS, SAMPLERS, question_text
from visor.data.synth.render import Glyph, render_scene
from visor.data.synth.seeds import check_split, item_seed

IMAGE_TAG = "<image>"


@dataclass
class SynthItem:
    """One generated question about one image.

    ``scene`` is the JSON-serialisable description the image is drawn from; ``glyphs`` lists every
    small readable mark with its box (for dense pre-training, see :mod:`visor.data.synth.dense`);
    neither ``image`` nor ``glyphs`` is written to JSONL.
    """

    id: str
    split: str
    index: int
    seed: int
    family: str
    difficulty: str
    question: str
    answer: str
    grader: str
    scene: dict
    image: Image.Image = field(repr=False, compare=False)
    glyphs: list[Glyph] = field(default_factory=list, repr=False, compare=False)

    def png_bytes(self) -> bytes:
        """The image encoded as PNG (deterministic for a given Pillow/zlib)."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()

    def conversations(self, question_first: bool = False) -> list[dict[str, str]]:
        """The LLaVA conversation: one human turn with the image tag, one gpt turn. The image comes first, as in
        LLaVA-OV's own data; ``question_first`` puts the question before it, so the visual tokens can attend to the
        question in self-attention layers (an experiment: ``docs/training-log.md``)."""
        human = f"{self.question}\n{IMAGE_TAG}" if question_first else f"{IMAGE_TAG}\n{self.question}"
        return [
            {"from": "human", "value": human},
            {"from": "gpt", "value": self.answer},
        ]

    def to_llava(self, image_path: str, include_scene: bool = True) -> dict[str, Any]:
        """The LLaVA-format record with ``image`` set to ``image_path`` (relative to the data root)."""
        record: dict[str, Any] = {
            "id": self.id,
            "image": image_path,
            "conversations": self.conversations(),
            "family": self.family,
            "difficulty": self.difficulty,
            "grader": self.grader,
        }
        if include_scene:
            record["scene"] = self.scene
        return record


def _check_families(families: Sequence[str] | None) -> tuple[str, ...]:
    fams = tuple(families) if families else FAMILIES
    for f in fams:
        difficulty_of(f)  # raises on unknown names
    if len(set(fams)) != len(fams):
        raise ValueError(f"repeated family in {fams}")
    return fams


def family_cycle(families: Sequence[str] | None = None, weights: Mapping[str, int] | None = None) -> tuple[str, ...]:
    """The order in which item indices visit the procedural families (:func:`weighted_cycle` over the checked
    ``families``, default all)."""
    return weighted_cycle(_check_families(families), weights)


def weighted_cycle(families: Sequence[str], weights: Mapping[str, int] | None = None) -> tuple[str, ...]:
    """Each family once (round robin), or, with ``weights`` (family -> positive int; unnamed families weigh 1),
    a family of weight w w times per cycle, its visits spread evenly over the cycle."""
    fams = tuple(families)
    if not weights:
        return fams
    unknown = sorted(set(weights) - set(fams))
    if unknown:
        raise ValueError(f"family weights name families outside the mix: {unknown} (mix: {list(fams)})")
    counts = {}
    for f in fams:
        w = weights.get(f, 1)
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"family weight of {f!r} must be a positive integer, got {w!r}")
        counts[f] = w
    visits = [((k + 0.5) / w, i, f) for i, (f, w) in enumerate(counts.items()) for k in range(w)]
    return tuple(f for _, _, f in sorted(visits))


def item_id(split: str, seed: int, index: int) -> str:
    """The id of item ``index`` of ``split`` under ``seed``."""
    return f"synth-{split}-{seed}-{index:07d}"


def generate_item(split: str, index: int, seed: int = 0, config: SynthConfig = DEFAULT_CONFIG,
                  families: Sequence[str] | None = None, weights: Mapping[str, int] | None = None) -> SynthItem:
    """Generate item ``index`` of ``split`` (module doc: determinism, family round robin or weighted cycle)."""
    check_split(split)
    cycle = family_cycle(families, weights)
    family = cycle[index % len(cycle)]
    s = item_seed(split, seed, index)
    rng = np.random.default_rng(s)
    scene, answer = SAMPLERS[family](rng, config, split)
    image, glyphs = render_scene(scene)
    return SynthItem(
        id=item_id(split, seed, index),
        split=split,
        index=index,
        seed=s,
        family=family,
        difficulty=difficulty_of(family),
        question=question_text(scene),
        answer=answer,
        grader=FAMILY_GRADERS[family],
        scene=scene,
        image=image,
        glyphs=glyphs,
    )


def generate_items(split: str, n: int, seed: int = 0, config: SynthConfig = DEFAULT_CONFIG,
                   families: Sequence[str] | None = None, start: int = 0) -> Iterator[SynthItem]:
    """Items ``start .. start+n-1`` of ``split``, lazily."""
    fams = _check_families(families)
    for i in range(start, start + n):
        yield generate_item(split, i, seed, config, fams)


class SynthDataset:
    """Map-style view of the first ``n`` items of a split (``len`` and integer indexing).

    ``transform`` (optional) maps each :class:`SynthItem` to whatever a training loop wants.
    """

    def __init__(self, split: str, n: int, seed: int = 0, config: SynthConfig = DEFAULT_CONFIG,
                 families: Sequence[str] | None = None, transform: Callable[[SynthItem], Any] | None = None):
        self.split = check_split(split)
        self.n = int(n)
        self.seed = seed
        self.config = config
        self.families = _check_families(families)
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not -self.n <= index < self.n:
            raise IndexError(index)
        item = generate_item(self.split, index % self.n, self.seed, self.config, self.families)
        return self.transform(item) if self.transform else item


def _torch_shard() -> tuple[int, int]:
    """(shard index, shard count) over distributed ranks x DataLoader workers; (0, 1) without torch."""
    try:
        import torch.distributed as dist
        import torch.utils.data as tud
    except ImportError:  # torch is optional for data generation
        return 0, 1
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    info = tud.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


class SynthStream:
    """Endless (or ``n``-long) on-the-fly stream of items of a split, for training.

    Iterating yields items ``start, start + k, start + 2k, ...`` offset by this process's shard
    (``k`` = distributed world size x DataLoader workers), so shards never repeat one another.
    To hand it to a ``DataLoader`` use :meth:`as_torch` (which wraps it in an ``IterableDataset``).
    """

    def __init__(self, split: str, seed: int = 0, config: SynthConfig = DEFAULT_CONFIG,
                 families: Sequence[str] | None = None, n: int | None = None, start: int = 0,
                 transform: Callable[[SynthItem], Any] | None = None):
        self.split = check_split(split)
        self.seed = seed
        self.config = config
        self.families = _check_families(families)
        self.n = n
        self.start = start
        self.transform = transform

    def __iter__(self) -> Iterator[Any]:
        shard, shards = _torch_shard()
        i = self.start + shard
        end = None if self.n is None else self.start + self.n
        while end is None or i < end:
            item = generate_item(self.split, i, self.seed, self.config, self.families)
            yield self.transform(item) if self.transform else item
            i += shards

    def as_torch(self):
        """This stream as a ``torch.utils.data.IterableDataset`` (imports torch)."""
        import torch.utils.data as tud

        stream = self

        class _SynthIterable(tud.IterableDataset):
            def __iter__(self):
                return iter(stream)

        return _SynthIterable()


def write_split(out_dir: str | Path, split: str, n: int, seed: int = 0, config: SynthConfig = DEFAULT_CONFIG,
                families: Sequence[str] | None = None, include_scene: bool = True,
                progress: bool | Callable[[Iterable], Iterable] = False) -> Path:
    """Write ``n`` items of ``split`` to ``out_dir`` in LLaVA format (module doc); return the JSONL path.

    ``progress=True`` wraps the loop in a tqdm bar. An existing JSONL of the same split is overwritten.
    """
    check_split(split)
    fams = _check_families(families)
    out = Path(out_dir)
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{split}.jsonl"
    indices: Iterable[int] = range(n)
    if progress is True:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"synth {split}", unit="img")
    elif callable(progress):
        indices = progress(indices)
    counts: dict[str, int] = {}
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in indices:
            item = generate_item(split, i, seed, config, fams)
            rel = f"images/{split}/{item.id}.png"
            item.image.save(out / rel, format="PNG")
            fh.write(json.dumps(item.to_llava(rel, include_scene), separators=(",", ":")) + "\n")
            counts[item.family] = counts.get(item.family, 0) + 1
    tmp.replace(jsonl)
    meta = {"split": split, "n": n, "seed": seed, "families": list(fams), "counts": counts,
            "config": config.to_dict(), "format": "llava-jsonl"}
    (out / f"{split}.meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return jsonl
