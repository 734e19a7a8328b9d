"""KV cache matched to VISOR's layer kinds.

* SA layer: keys/values of every token of the interleaved sequence (visual + text), then each new token.
* CA layer: the projected visual keys/values, computed once from the visual states the layer read at
  prefill (``cross``), plus the layer's own text-only keys/values (``self``).
* text-only layer: keys/values of text tokens only.

In-LLM token pruning (``visor.compression.in_llm``) leaves later layers fewer visual keys: each drop adds
a ``CacheSegment`` saying, from its first layer on, which SA keys and CA visual keys are valid and how far
new tokens' RoPE positions shift (PyramidDrop renumbers positions).

One cache serves one active configuration (the model groups samples by configuration), so the kind of
every layer is fixed for the cache's lifetime and recorded in ``kinds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from visor.model.layers import KVSlot
from visor.model.plan import LayerKind


@dataclass
class CacheSegment:
    """From decoder layer ``start`` on: SA key validity ``full_valid`` ([B, S]), CA visual-key validity
    ``visual_valid`` ([B, Nv']), and ``position_shift`` ([B], subtracted from new tokens' positions; None = 0)."""

    start: int
    full_valid: torch.Tensor
    visual_valid: torch.Tensor
    position_shift: torch.Tensor | None = None


@dataclass
class VisorCache:
    kinds: list[LayerKind]
    self_kv: list[KVSlot] = field(default_factory=list)
    cross_kv: list[KVSlot] = field(default_factory=list)
    full_valid: torch.Tensor | None = None  # [B, S_full] keys of SA layers
    text_valid: torch.Tensor | None = None  # [B, S_text] keys of text-only / CA layers
    visual_valid: torch.Tensor | None = None  # [B, Nv] keys of CA blocks
    next_position: torch.Tensor | None = None  # [B] position id of the next token
    segments: list[CacheSegment] = field(default_factory=list)  # in-LLM token pruning, in layer order

    def __post_init__(self) -> None:
        if not self.self_kv:
            self.self_kv = [KVSlot() for _ in self.kinds]
            self.cross_kv = [KVSlot() for _ in self.kinds]

    @property
    def batch_size(self) -> int:
        return int(self.next_position.shape[0])

    def extend_masks(self, new_valid: torch.Tensor) -> None:
        """Record ``new_valid`` ([B, t]) new text tokens; they are keys of SA and text layers alike."""
        self.full_valid = torch.cat([self.full_valid, new_valid], dim=1)
        self.text_valid = torch.cat([self.text_valid, new_valid], dim=1)
        self.next_position = self.next_position + new_valid.shape[1]
        for segment in self.segments:
            segment.full_valid = torch.cat([segment.full_valid, new_valid], dim=1)

    def num_bytes_by_kind(self) -> dict[str, int]:
        """Bytes held per layer kind (CA counts its visual K/V and its text K/V)."""
        out = {kind.value: 0 for kind in LayerKind}
        for kind, own, cross in zip(self.kinds, self.self_kv, self.cross_kv):
            out[kind.value] += own.num_bytes + cross.num_bytes
        return out

    @property
    def num_bytes(self) -> int:
        return sum(self.num_bytes_by_kind().values())
