"""Layer plan: which decoder layers are cross-attention, optional self-attention slots, or text-only.

VISOR gives every decoder layer one of three kinds (DESIGN.md section 1):

* ``SA``  (self-attention): the original layer over the interleaved [text; visual; text] sequence.
  The only place the visual states change.
* ``CA``  (cross-attention): a new block where text queries the current visual states, then the
  original layer on the text tokens only.
* ``TEXT`` (text-only): the original layer on the text tokens only; visual states are not touched.

A plan fixes the CA layers and the *optional* SA slots. An *active configuration* is the subset of SA
slots switched on for one forward pass (slot numbers ``0..k-1`` in layer order); a switched-off slot
runs as a text-only layer. Layers that are neither CA nor SA slots are text-only.

Default (DESIGN.md section 2): with ``k = L // 3``, CA at layers ``3i+1`` and SA slots at ``3i+2``
for ``i < k``; e.g. 24 layers -> CA 1,4,...,22 and SA slots 2,5,...,23.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class LayerKind(str, enum.Enum):
    """What a decoder layer does in one forward pass."""

    SELF_ATTENTION = "sa"
    CROSS_ATTENTION = "ca"
    TEXT_ONLY = "text"


ActiveConfig = tuple[int, ...]
"""An active configuration: sorted SA slot numbers that are switched on."""


@dataclass(frozen=True)
class LayerPlan:
    """A validated layer plan.

    Args:
        num_layers: number of decoder layers ``L``.
        cross_attention_layers: layer indices that carry a cross-attention block.
        self_attention_layers: layer indices of the optional SA slots, in layer order; slot ``j`` is
            ``self_attention_layers[j]``.
        slot_order: the order in which ``sa_count=K`` switches slots on (the first K of this order);
            defaults to layer order. Written by the viable-configuration search.
    """

    num_layers: int
    cross_attention_layers: tuple[int, ...]
    self_attention_layers: tuple[int, ...]
    slot_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers <= 0:
            raise ValueError(f"LayerPlan: num_layers must be a positive integer, got {self.num_layers!r}")
        ca = tuple(int(i) for i in self.cross_attention_layers)
        sa = tuple(int(i) for i in self.self_attention_layers)
        object.__setattr__(self, "cross_attention_layers", ca)
        object.__setattr__(self, "self_attention_layers", sa)
        for name, layers in (("cross_attention_layers", ca), ("self_attention_layers", sa)):
            bad = [i for i in layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(
                    f"LayerPlan: {name} names layer(s) {bad} but the model has {self.num_layers} layers "
                    f"(valid indices 0..{self.num_layers - 1})"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"LayerPlan: {name} lists a layer twice: {list(layers)}")
            if list(layers) != sorted(layers):
                raise ValueError(f"LayerPlan: {name} must be in increasing layer order, got {list(layers)}")
        overlap = sorted(set(ca) & set(sa))
        if overlap:
            raise ValueError(f"LayerPlan: layer(s) {overlap} are both cross-attention and self-attention slots")
        order = tuple(range(len(sa))) if self.slot_order is None else tuple(int(s) for s in self.slot_order)
        if sorted(order) != list(range(len(sa))):
            raise ValueError(
                f"LayerPlan: slot_order must be a permutation of the slots 0..{len(sa) - 1}, got {list(order)}"
            )
        object.__setattr__(self, "slot_order", order)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def default(cls, num_layers: int) -> LayerPlan:
        """The DESIGN.md default: ``k = L // 3`` CA layers at ``3i+1``, SA slots at ``3i+2``."""
        if num_layers < 3:
            raise ValueError(f"LayerPlan.default needs at least 3 layers, got {num_layers}")
        k = num_layers // 3
        return cls(num_layers, tuple(3 * i + 1 for i in range(k)), tuple(3 * i + 2 for i in range(k)))

    @classmethod
    def all_self_attention(cls, num_layers: int) -> LayerPlan:
        """Every layer an SA slot, no CA: with all slots active this is the original LLaVA-OV model."""
        return cls(num_layers, (), tuple(range(num_layers)))

    @classmethod
    def from_dict(cls, data: dict) -> LayerPlan:
        return cls(
            num_layers=int(data["num_layers"]),
            cross_attention_layers=tuple(data["cross_attention_layers"]),
            self_attention_layers=tuple(data["self_attention_layers"]),
            slot_order=tuple(data["slot_order"]) if data.get("slot_order") is not None else None,
        )

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "cross_attention_layers": list(self.cross_attention_layers),
            "self_attention_layers": list(self.self_attention_layers),
            "slot_order": list(self.slot_order),
        }

    # ------------------------------------------------------------------ queries
    @property
    def num_slots(self) -> int:
        return len(self.self_attention_layers)

    @property
    def all_slots(self) -> ActiveConfig:
        return tuple(range(self.num_slots))

    def resolve_active(self, active_sa: Iterable[int] | None) -> ActiveConfig:
        """Validate an active configuration; ``None`` means every slot of the plan."""
        if active_sa is None:
            return self.all_slots
        if isinstance(active_sa, (str, bytes)):
            return self.parse_slots(active_sa)
        slots = [int(s) for s in active_sa]
        bad = [s for s in slots if not 0 <= s < self.num_slots]
        if bad:
            raise ValueError(
                f"active SA slot(s) {bad} are not in the plan, which has {self.num_slots} slot(s) "
                f"(valid slot numbers 0..{self.num_slots - 1}; slots are numbered, not layer indices)"
            )
        if len(set(slots)) != len(slots):
            raise ValueError(f"active SA configuration lists a slot twice: {slots}")
        return tuple(sorted(slots))

    def first_slots(self, count: int) -> ActiveConfig:
        """The first ``count`` slots in the plan's slot order (``--sa-count K``)."""
        if not 0 <= count <= self.num_slots:
            raise ValueError(f"sa_count must be in 0..{self.num_slots} for this plan, got {count}")
        return tuple(sorted(self.slot_order[:count]))

    def parse_slots(self, text: str) -> ActiveConfig:
        """Parse the string form ``"0+2"`` (``""``, ``"none"`` = no slot, ``"all"`` = every slot)."""
        text = text.strip().lower()
        if text in ("", "none", "ca", "ca-only"):
            return ()
        if text == "all":
            return self.all_slots
        try:
            slots = [int(part) for part in text.split("+")]
        except ValueError as err:
            raise ValueError(f"cannot parse SA slots {text!r}: expected slot numbers joined by '+', e.g. '0+2'") from err
        return self.resolve_active(slots)

    def layer_kinds(self, active_sa: Iterable[int] | None = None) -> list[LayerKind]:
        """The kind every layer runs as under an active configuration."""
        active = self.resolve_active(active_sa)
        active_layers = {self.self_attention_layers[s] for s in active}
        ca = set(self.cross_attention_layers)
        kinds = []
        for layer in range(self.num_layers):
            if layer in active_layers:
                kinds.append(LayerKind.SELF_ATTENTION)
            elif layer in ca:
                kinds.append(LayerKind.CROSS_ATTENTION)
            else:
                kinds.append(LayerKind.TEXT_ONLY)
        return kinds

    def describe(self, active_sa: Iterable[int] | None = None) -> str:
        """One character per layer: ``S`` SA, ``C`` CA, ``.`` text-only (``s`` = inactive SA slot)."""
        kinds = self.layer_kinds(active_sa)
        slots = set(self.self_attention_layers)
        chars = []
        for layer, kind in enumerate(kinds):
            if kind is LayerKind.SELF_ATTENTION:
                chars.append("S")
            elif kind is LayerKind.CROSS_ATTENTION:
                chars.append("C")
            else:
                chars.append("s" if layer in slots else ".")
        return "".join(chars)


def format_slots(active: Sequence[int]) -> str:
    """String form of an active configuration: ``"0+2"``, or ``"none"`` for CA only."""
    return "+".join(str(s) for s in active) if active else "none"
