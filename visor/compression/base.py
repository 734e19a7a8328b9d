"""The reducer interface: what every visual-token compressor provides.

Two kinds, told apart by ``stage``:

* ``PreLLMReducer`` (``stage == "pre_llm"``): acts on each image's token sequence after the projector and
  the anyres packing, before the LLM (Pooling, VisionZip, VisPruner, HiRED). ``reduce_image`` gets an
  ``ImageTokens`` (features, ``ImageLayout``, and the vision-tower cues the reducer asked for in
  ``cues``) and returns a shorter ``ReducedImage``. The model then drops the surplus ``<image>``
  placeholders from the prompt (see ``visor.compression.apply``).
* ``InLLMReducer`` (``stage == "in_llm"``): prunes the visual tokens the sequence carries at given layers
  (FastV, PyramidDrop); ``drops(num_layers)`` lists them and ``visor.compression.in_llm`` runs them.

Amounts: ``keep`` is always the *kept fraction* in (0, 1] that ``--reduce NAME:AMOUNT`` parsed (``0.25``,
``4x``, ``25%``); what it is a fraction of is documented per reducer. Every budget is rounded with
``kept_tokens`` (half up, at least one token) and clamped to the tokens available, so a budget can never
exceed the tokens nor reach zero: ``keep == 1.0`` keeps everything and is exactly the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from visor.compression.layout import ImageLayout
from visor.compression.spec import kept_tokens


def check_keep(keep: float, name: str = "keep") -> float:
    """Validate a kept fraction: a number in (0, 1]. Clear errors for 0, negatives, > 1, NaN."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {keep!r}")
    keep = float(keep)
    if not math.isfinite(keep) or not 0 < keep <= 1:
        raise ValueError(
            f"{name} must be a kept fraction in (0, 1] (e.g. 0.25, or a reduction factor '4x' on the CLI), got {keep!r}"
        )
    return keep


def budget(n_tokens: int, keep: float) -> int:
    """Tokens kept out of ``n_tokens``: ``kept_tokens`` rounding, 0 for an empty unit."""
    return 0 if n_tokens <= 0 else kept_tokens(n_tokens, keep)


@dataclass(frozen=True)
class VisionCues:
    """What a pre-LLM reducer needs from the vision tower beyond the projected features.

    ``attention_layers``: vision layers whose *attention received* per token is wanted (mean over heads
    and over all queries; SigLIP has no CLS token to read it from). ``"feature"`` names the layer that
    produces the LLM's features (LLaVA-OV: the tower's last layer). ``keys``: that layer's keys, averaged
    over heads (VisionZip's merge metric). ``features``: the vision features before the projector.
    """

    attention_layers: tuple = ()
    keys: bool = False
    features: bool = False

    @property
    def any(self) -> bool:
        return bool(self.attention_layers) or self.keys or self.features


@dataclass
class ImageTokens:
    """One image as a pre-LLM reducer sees it: packed features plus the cues it asked for.

    Every per-token tensor follows the packed sequence (``layout.num_tokens`` rows); cue rows of newline
    tokens are zeros. ``attention`` maps a layer key (``"feature"`` or a vision layer index) to [n].
    """

    features: torch.Tensor  # [n, D] projected, packed
    layout: ImageLayout
    attention: dict = field(default_factory=dict)  # layer -> [n]
    keys: torch.Tensor | None = None  # [n, head_dim]
    vision_features: torch.Tensor | None = None  # [n, vision_hidden]


@dataclass
class ReducedImage:
    """A reducer's output for one image: ``features`` [m, D] in sequence order; ``kept`` [m] the packed
    indices they stand for (a merged token stands at its target's index); None for resampled tokens."""

    features: torch.Tensor
    kept: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerDrop:
    """One in-LLM pruning step: rank with layer ``score_layer``'s q/k on its input states, keep ``keep`` of
    each image's current visual tokens, and run layers ``prune_layer`` onward without the rest."""

    score_layer: int
    prune_layer: int
    keep: float


class Reducer:
    """Base of every visual-token reducer (see the module docstring)."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    default_keep: ClassVar[float] = 1.0
    paper: ClassVar[str] = ""

    def __init__(self, keep: float | None = None) -> None:
        self.keep = check_keep(self.default_keep if keep is None else keep)

    @property
    def is_identity(self) -> bool:
        return self.keep >= 1.0

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.keep:g}"

    def describe(self) -> dict:
        return {"name": self.name, "stage": self.stage, "keep_fraction": self.keep}

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k not in ("name", "stage"))
        return f"{type(self).__name__}({extra})"

    # ------------------------------------------------------------------ cost model
    def visual_tokens_per_layer(self, num_layers: int, n_visual: int) -> list[int]:
        """Visual tokens each decoder layer sees, for ``n_visual`` tokens out of the vision side."""
        raise NotImplementedError

    def selection_flops(self, geometry, n_visual: int, n_text: int, n_crops: int | None = None) -> int:
        """Matmul FLOPs of the selection itself (scoring, similarity, merging) for one sample."""
        return 0


POSITION_MODES = ("contiguous", "original")


class PreLLMReducer(Reducer):
    stage: ClassVar[str] = "pre_llm"
    cues: ClassVar[VisionCues] = VisionCues()
    # True when every output token is one of the input's (a merged one stands at its target's place), so it has a
    # place in the full prompt to keep (``positions = "original"``); False for resampling reducers (pooling)
    keeps_token_places: ClassVar[bool] = False
    # "contiguous": the shortened prompt is numbered afresh, as the methods' own code does (the default);
    # "original": each kept token keeps the position it had in the full prompt (``visor.compression.apply``)
    positions: str = "contiguous"

    def with_positions(self, mode: str) -> "PreLLMReducer":
        """Set how the shortened prompt is numbered (``POSITION_MODES``); returns ``self``."""
        if mode not in POSITION_MODES:
            raise ValueError(f"unknown position mode {mode!r}; choose one of {', '.join(POSITION_MODES)}")
        if mode == "original" and not self.keeps_token_places:
            raise ValueError(f"{self.name} resamples the visual tokens: they have no original positions to keep")
        self.positions = mode
        return self

    @property
    def spec(self) -> str:
        base = f"{self.name}:{self.keep:g}"
        return base if self.positions == "contiguous" else f"{base}@{self.positions}"

    def describe(self) -> dict:
        return super().describe() | ({} if self.positions == "contiguous" else {"positions": self.positions})

    def reduce_image(self, image: ImageTokens) -> ReducedImage:
        raise NotImplementedError

    def kept_count(self, layout: ImageLayout) -> int:
        """Tokens this reducer leaves of an image with ``layout`` (the placeholder count it needs)."""
        raise NotImplementedError

    def visual_tokens_per_layer(self, num_layers: int, n_visual: int) -> list[int]:
        return [budget(n_visual, self.keep)] * num_layers


class InLLMReducer(Reducer):
    stage: ClassVar[str] = "in_llm"
    renumber_positions: ClassVar[bool] = False

    def drops(self, num_layers: int) -> list[LayerDrop]:
        raise NotImplementedError

    def visual_tokens_per_layer(self, num_layers: int, n_visual: int) -> list[int]:
        counts, current = [n_visual] * num_layers, n_visual
        for drop in self.drops(num_layers):
            current = budget(current, drop.keep)
            counts[drop.prune_layer:] = [current] * (num_layers - drop.prune_layer)
        return counts

    def selection_flops(self, geometry, n_visual: int, n_text: int, n_crops: int | None = None) -> int:
        """Per drop: K over the whole sequence, Q for the last token, its scores over every key."""
        t = geometry.text
        total, current = 0, n_visual
        for drop in self.drops(t.num_layers):
            n = n_text + current
            total += 2 * n * t.hidden * t.kv_dim + 2 * t.hidden * t.q_dim + 2 * n * t.heads * t.head_dim
            current = budget(current, drop.keep)
        return total
