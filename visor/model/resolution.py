"""Resolution on request: a configuration is a *resolution* and a set of active SA slots.

Resolutions (per sample):

* ``full``: LLaVA-OneVision's single-image layout, the base view followed by the anyres tiles (base + tiles,
  up to 37 crops through the vision tower). This is what every configuration meant before resolutions
  existed, and it stays the default everywhere: a configuration without a resolution part is ``full``.
* ``base``: the base view only, laid out as LLaVA-OV lays out one image of a multi-image prompt: its
  ``g x g`` grid plus one newline token, pixels from Hugging Face's multi-image preprocessing (padded to a
  square with the mean colour, then resized), so no tile is cut, let alone encoded. Positions are numbered
  for that (shorter) input. A multi-image prompt is already base-only: ``full`` changes nothing there.

A middle rung (fewer tiles) is not implemented: it needs a second grid-pinpoint set on both sides
(processor and packing) and the two rungs above already bracket the cost (1 crop vs up to 37).

Forms of a configuration:

* JSON (``config.json``'s ``viable_configs``, a router's ``configs``, label files): a plain list of slots is a
  full-resolution configuration (every checkpoint written before resolutions), a dict
  ``{"resolution": "base", "active_sa": [0, 2]}`` names the resolution;
* string (CLI, reports): ``"0+2"`` (full), ``"base:0+2"``, ``"base:none"`` (CA only on the base view),
  ``"full:all"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from visor.model.plan import format_slots

FULL = "full"
BASE = "base"
RESOLUTIONS: tuple[str, ...] = (FULL, BASE)


@dataclass(frozen=True)
class Configuration:
    """One configuration of the universal model: the input resolution and the active SA slots."""

    active_sa: tuple[int, ...]
    resolution: str = FULL

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {list(RESOLUTIONS)}, got {self.resolution!r}")
        object.__setattr__(self, "active_sa", tuple(sorted(int(s) for s in self.active_sa)))

    @property
    def tiled(self) -> bool:
        """Whether a single-image prompt is laid out with its anyres tiles."""
        return self.resolution == FULL

    def to_json(self) -> list | dict:
        """A plain list for full resolution (backward compatible), a dict otherwise."""
        if self.resolution == FULL:
            return list(self.active_sa)
        return {"resolution": self.resolution, "active_sa": list(self.active_sa)}

    def label(self) -> str:
        """``"0+2"`` for full resolution, ``"base:0+2"`` otherwise (``none`` = no SA slot)."""
        slots = format_slots(self.active_sa)
        return slots if self.resolution == FULL else f"{self.resolution}:{slots}"

    def __str__(self) -> str:
        return self.label()


def parse_configuration(entry, plan=None) -> Configuration:
    """A ``Configuration`` from any accepted form (module docstring); ``plan`` validates the slots.

    ``None`` is every slot of ``plan`` at full resolution."""
    if isinstance(entry, Configuration):
        active, resolution = entry.active_sa, entry.resolution
    elif isinstance(entry, dict):
        unknown = set(entry) - {"resolution", "active_sa"}
        if unknown:
            raise ValueError(f"a configuration names 'resolution' and 'active_sa', got unknown key(s) {sorted(unknown)}")
        resolution = entry.get("resolution", FULL)
        active = entry.get("active_sa")
        if isinstance(active, str):
            active = _parse_slots(active, plan)
    elif isinstance(entry, str):
        text = entry.strip().lower()
        resolution, _, slots = text.rpartition(":")
        resolution = resolution or FULL
        active = _parse_slots(slots, plan)
    elif entry is None:
        active, resolution = None, FULL
    else:
        active, resolution = entry, FULL
    if active is None:
        if plan is None:
            raise ValueError("'every slot' needs the layer plan")
        active = plan.all_slots
    if plan is not None:
        active = plan.resolve_active(active)
    return Configuration(tuple(active), resolution)


def _parse_slots(text: str, plan) -> tuple[int, ...] | None:
    text = text.strip().lower()
    if text == "all":
        return None
    if plan is not None:
        return plan.parse_slots(text)
    if text in ("", "none", "ca", "ca-only"):
        return ()
    return tuple(int(part) for part in text.split("+"))


def parse_configurations(entries: Iterable, plan=None) -> list[Configuration]:
    return [parse_configuration(e, plan) for e in entries]


def names_resolution(entries: Iterable | None) -> bool:
    """Whether any entry is a configuration at a resolution other than ``full``."""
    return any(parse_configuration(e).resolution != FULL for e in entries or [] if e is not None)


def cross(active_sets: Iterable[Sequence[int]], resolutions: Sequence[str]) -> list[Configuration]:
    """Every active set at every resolution (resolution-major: all of ``resolutions[0]`` first)."""
    active_sets = [tuple(a) for a in active_sets]
    return [Configuration(a, r) for r in resolutions for a in active_sets]


def image_tiled(resolutions: Sequence[str] | str | None, batch_num_images: Sequence[int]) -> list[bool]:
    """Per image: anyres tiles or not. An image is tiled when its sample has exactly one image and asks for
    full resolution (LLaVA-OV never tiles an image of a multi-image prompt)."""
    counts = [int(n) for n in batch_num_images]
    if resolutions is None or isinstance(resolutions, str):
        resolutions = [resolutions or FULL] * len(counts)
    if len(resolutions) != len(counts):
        raise ValueError(f"{len(resolutions)} resolutions for {len(counts)} samples")
    for r in resolutions:
        if r not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {list(RESOLUTIONS)}, got {r!r}")
    return [n == 1 and r == FULL for n, r in zip(counts, resolutions) for _ in range(n)]
