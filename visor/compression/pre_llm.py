"""Reducers that act before the LLM, on each image's packed LLaVA-OV token sequence.

Common adaptations for LLaVA-OneVision (all four methods were published on CLIP / LLaVA-1.5 or -NeXT):

* They run *after* the projector and the anyres packing, on the sequence the LLM would read, so the
  layout (base view, unpadded and possibly shrunk tile grid, newline tokens) stays valid. The vision cues
  (``visor.compression.cues``) are packed the same way, so a score is always about the token it ranks.
* Budgets are per *unit* (``ImageLayout``): the base view and each tile's cells, ``kept_tokens`` rounding;
  a tile whose cells the anyres_max shrink resampled is still one unit (cells assigned by centre).
  The original code selects per 576-token crop *before* unpadding, so its selected tokens that fall in
  the padding are silently lost; here every unit gets exactly its budget.
* ``image_newline`` tokens are structural and always kept (VisPruner's and HiRED's own masks keep them).
  They are not counted in the budget: an image keeps ``sum(unit budgets) + newlines`` tokens.
* No CLS token in SigLIP: the "CLS attention" score is the attention a token *receives*, averaged over
  heads and all queries, in the vision layer that produces the LLM's features (LLaVA-OV: the last one).
* Positions: the LLM sees a shorter prompt, as with the methods' own code (the reduced features are
  spliced into a prompt with fewer image tokens, positions contiguous); see ``visor.compression.apply``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visor.compression.base import ImageTokens, PreLLMReducer, ReducedImage, VisionCues, budget
from visor.compression.layout import NEWLINE, ImageLayout


def _top(indices: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` of ``indices`` with the highest ``scores`` (ties: earlier index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return indices[order[:k]]


def _assemble(image: ImageTokens, kept: list[torch.Tensor], replaced: dict | None = None) -> ReducedImage:
    """Kept unit indices + every newline, in sequence order; ``replaced``: index -> new feature row."""
    kinds = image.layout.token_kinds(image.features.device)
    newlines = (kinds == NEWLINE).nonzero()[:, 0]
    index = torch.sort(torch.cat([*kept, newlines])).values
    features = image.features[index]
    if replaced:
        pos = {int(i): p for p, i in enumerate(index.tolist())}
        rows = torch.tensor([pos[i] for i in replaced], device=features.device, dtype=torch.long)
        features = features.index_copy(0, rows, torch.stack(list(replaced.values())).to(features.dtype))
    return ReducedImage(features=features, kept=index)


def _unit_indices(layout: ImageLayout, device) -> list[torch.Tensor]:
    units = layout.token_units(device)
    return [(units == u).nonzero()[:, 0] for u in range(layout.num_units)]


class _UniformSelection(PreLLMReducer):
    """Shared by VisionZip and VisPruner: ``kept_tokens(unit size, keep)`` per unit."""

    keeps_token_places = True

    def unit_budgets(self, layout: ImageLayout) -> list[int]:
        return [budget(n, self.keep) for n in layout.unit_sizes()]

    def kept_count(self, layout: ImageLayout) -> int:
        return sum(self.unit_budgets(layout)) + layout.num_newlines


# ---------------------------------------------------------------------------------------------- Pooling
class Pooling(PreLLMReducer):
    """Spatial pooling of each view's token grid: the "TR" (token reduction) of VISOR-TR.

    VISOR (Bulat et al., CVPR 2026, arXiv 2603.23495) reduces the visual tokens 2x/4x by spatial pooling
    before the LLM (their 8.9x -> 17.8x FLOPs implies the factor is the reduction in token *count*).
    AMOUNT: the kept fraction of grid tokens (``pooling:2x`` = half). Each grid, the ``g x g`` base view
    and the packed ``h x w`` tile grid, is resized to ``round(side * sqrt(keep))`` per side (at least 1);
    the tile grid's newline column is re-appended, one per pooled row, so the anyres layout stays valid.
    ``mode="bilinear"`` (default) is LLaVA-OV's own pooling of video frames (``F.interpolate``, bilinear,
    no corner alignment; exactly a 2x2 average at 4x), ``mode="average"`` is adaptive average pooling.
    """

    name = "pooling"
    default_keep = 0.5
    paper = "VISOR (Bulat et al., CVPR 2026, arXiv 2603.23495): VISOR-TR"

    def __init__(self, keep: float | None = None, mode: str = "bilinear") -> None:
        super().__init__(keep)
        if mode not in ("bilinear", "average"):
            raise ValueError(f"pooling mode must be 'bilinear' or 'average', got {mode!r}")
        self.mode = mode

    def describe(self) -> dict:
        return {**super().describe(), "mode": self.mode}

    def pooled(self, side: int) -> int:
        return side if self.is_identity else max(1, math.floor(side * math.sqrt(self.keep) + 0.5))

    def kept_count(self, layout: ImageLayout) -> int:
        base = self.pooled(layout.grid) ** 2
        if not layout.tiled:
            return base + 1
        h, w = layout.packed
        return base + self.pooled(h) * (self.pooled(w) + 1)

    def _resize(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[h, w, D] -> [h', w', D]."""
        x = grid.permute(2, 0, 1)[None].float()
        if self.mode == "bilinear":
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        else:
            x = F.adaptive_avg_pool2d(x, size)
        return x[0].permute(1, 2, 0).to(grid.dtype)

    def reduce_image(self, image: ImageTokens) -> ReducedImage:
        layout, feats = image.layout, image.features
        if self.is_identity:
            return ReducedImage(feats, torch.arange(feats.shape[0], device=feats.device))
        g, dim = layout.grid, feats.shape[-1]
        side = self.pooled(g)
        base = self._resize(feats[: g * g].view(g, g, dim), (side, side)).reshape(-1, dim)
        if not layout.tiled:
            return ReducedImage(torch.cat([base, feats[g * g:]]))
        h, w = layout.packed
        rows = feats[g * g:].view(h, w + 1, dim)
        cells = self._resize(rows[:, :w], (self.pooled(h), self.pooled(w)))
        newline = rows[0, w].expand(cells.shape[0], 1, dim)
        return ReducedImage(torch.cat([base, torch.cat([cells, newline], dim=1).reshape(-1, dim)]))


# ---------------------------------------------------------------------------------------------- VisionZip
class VisionZip(_UniformSelection):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025, arXiv 2412.04467): dominant tokens + contextual tokens.

    Per unit with budget ``b`` (``kept_tokens(unit size, keep)``, the paper budgets per crop):
    ``d = round(b * 54/64)`` *dominant* tokens, those receiving the most attention in the feature layer,
    and ``c = b - d`` *contextual* tokens: the remaining tokens (in sequence order) give ``c`` evenly
    strided targets (stride ``len // c``), every other remaining token is assigned to the target whose key
    (the feature layer's keys, mean over heads) is most cosine-similar, and a target becomes
    ``target + mean(assigned)``, as in the authors' code. 54:10 (5.4:1) is the published split of a
    64-token budget (108:20 for 128, 162:30 for 192). AMOUNT: kept fraction of grid tokens; the default
    128/576 is the paper's middle LLaVA-1.5 setting.

    Adapted for LLaVA-OV: attention received (mean over heads and queries) replaces the CLS attention;
    merging happens on the projected, packed features (the projector runs before LLaVA-OV's packing);
    each token, a merged one at its target's place, stays in sequence order; newlines kept.
    """

    name = "visionzip"
    default_keep = 128 / 576
    paper = "VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467)"
    cues = VisionCues(attention_layers=("feature",), keys=True)

    def __init__(self, keep: float | None = None, dominant_ratio: float = 54 / 64) -> None:
        super().__init__(keep)
        if not 0 < dominant_ratio <= 1:
            raise ValueError(f"dominant_ratio must be in (0, 1], got {dominant_ratio}")
        self.dominant_ratio = dominant_ratio

    def describe(self) -> dict:
        return {**super().describe(), "dominant_ratio": self.dominant_ratio}

    def split(self, b: int) -> tuple[int, int]:
        """(dominant, contextual) for a unit budget ``b``."""
        dominant = min(b, max(1, math.floor(b * self.dominant_ratio + 0.5))) if b > 0 else 0
        return dominant, b - dominant

    def reduce_image(self, image: ImageTokens) -> ReducedImage:
        if self.is_identity:
            return ReducedImage(image.features, torch.arange(image.features.shape[0], device=image.features.device))
        scores = image.attention["feature"]
        metric = F.normalize(image.keys.float(), dim=-1)
        kept, replaced = [], {}
        for idx, b in zip(_unit_indices(image.layout, image.features.device), self.unit_budgets(image.layout)):
            if b >= idx.numel():
                kept.append(idx)
                continue
            d, c = self.split(b)
            dominant = _top(idx, scores[idx], d)
            kept.append(dominant)
            if c == 0:
                continue
            rest = idx[~torch.isin(idx, dominant)]
            step = max(1, rest.numel() // c)
            is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
            is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:c]] = True
            targets, others = rest[is_target], rest[~is_target]
            kept.append(targets)
            if others.numel() == 0:
                continue
            assign = (metric[others] @ metric[targets].T).argmax(dim=1)
            feats = image.features.float()
            summed = torch.zeros(c, feats.shape[-1], device=feats.device).index_add_(0, assign, feats[others])
            counts = torch.bincount(assign, minlength=c).clamp(min=1)[:, None]
            for t, row in zip(targets.tolist(), feats[targets] + summed / counts):
                replaced[t] = row
        return _assemble(image, kept, replaced)

    def selection_flops(self, geometry, n_visual: int, n_text: int, n_crops: int | None = None) -> int:
        """Attention recomputed in one vision layer per crop, plus per crop the key similarity and merge."""
        return _vision_attention_flops(geometry, n_visual, n_crops, layers=1) + _per_crop(
            geometry, n_visual, n_crops, lambda t: self._merge_flops(geometry, t))

    def _merge_flops(self, geometry, tokens: int) -> int:
        v = geometry.vision
        d, c = self.split(budget(tokens, self.keep))
        merged = max(0, tokens - d - c)
        head_dim = v.hidden // v.heads
        return 2 * merged * c * head_dim + 2 * c * merged * v.projector_out


# ---------------------------------------------------------------------------------------------- VisPruner
class VisPruner(_UniformSelection):
    """VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
    Pruning in VLMs", ICCV 2025, arXiv 2412.01818): important tokens, then diverse tokens.

    Per unit with budget ``b``: ``int(b * important_ratio)`` *important* tokens by attention received;
    the rest of the budget is filled with *diverse* tokens by the authors' iterative duplicate removal:
    the remaining tokens (in attention order) are split alternately into sets A and B, each A token
    scores its highest cosine similarity to B (pre-projector vision features), the ``min(8, excess)``
    most similar A tokens are removed, until the budget is met. Returns a keep-mask over the packed
    sequence, so the anyres unpad/newline layout stays intact. AMOUNT: kept fraction of grid tokens
    (default 128/576); ``important_ratio`` defaults to 0.5.

    Adapted for LLaVA-OV: attention received (mean over heads and queries) in the feature layer replaces
    the CLS attention; the per-crop budget becomes a per-unit budget in the packed layout.
    """

    name = "vispruner"
    default_keep = 128 / 576
    paper = "VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818)"
    cues = VisionCues(attention_layers=("feature",), features=True)

    def __init__(self, keep: float | None = None, important_ratio: float = 0.5) -> None:
        super().__init__(keep)
        if not 0 <= important_ratio <= 1:
            raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
        self.important_ratio = important_ratio

    def describe(self) -> dict:
        return {**super().describe(), "important_ratio": self.important_ratio}

    def reduce_image(self, image: ImageTokens) -> ReducedImage:
        if self.is_identity:
            return ReducedImage(image.features, torch.arange(image.features.shape[0], device=image.features.device))
        scores = image.attention["feature"]
        normed = F.normalize(image.vision_features.float(), dim=-1)
        kept = []
        for idx, b in zip(_unit_indices(image.layout, image.features.device), self.unit_budgets(image.layout)):
            if b >= idx.numel():
                kept.append(idx)
                continue
            important = int(b * self.important_ratio)
            ranked = _top(idx, scores[idx], idx.numel())
            kept.append(ranked[:important])
            kept.append(self.diverse(ranked[important:], normed, b - important))
        return _assemble(image, kept)

    @staticmethod
    def diverse(residual: torch.Tensor, normed: torch.Tensor, count: int) -> torch.Tensor:
        """Remove near duplicates from ``residual`` until ``count`` tokens remain (authors' loop)."""
        while True:
            excess = residual.numel() - count
            r = min(8, excess)
            if r <= 0:
                return residual
            a, b = residual[0::2], residual[1::2]
            if b.numel() == 0:
                return a[: a.numel() - r]
            similarity = (normed[a] @ normed[b].T).max(dim=1).values
            distinct = torch.sort(similarity, descending=True, stable=True).indices[r:]
            residual = torch.cat([a[distinct], b])

    def selection_flops(self, geometry, n_visual: int, n_text: int, n_crops: int | None = None) -> int:
        """Attention in one vision layer per crop, plus the pairwise similarities of the removal loop."""
        return _vision_attention_flops(geometry, n_visual, n_crops, layers=1) + _per_crop(
            geometry, n_visual, n_crops, lambda t: self._removal_flops(geometry, t))

    def _removal_flops(self, geometry, tokens: int) -> int:
        b = budget(tokens, self.keep)
        residual, count = tokens - int(b * self.important_ratio), b - int(b * self.important_ratio)
        flops = 0
        while residual - count > 0:
            r = min(8, residual - count)
            flops += 2 * math.ceil(residual / 2) * (residual // 2) * geometry.vision.hidden
            residual -= r
        return flops


# ---------------------------------------------------------------------------------------------- HiRED
class HiRED(PreLLMReducer):
    """HiRED (Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
    High-Resolution Vision-Language Models", AAAI 2025, arXiv 2408.10945).

    A fixed budget ``B = kept_tokens(grid tokens of the image, keep)`` (default 20%, the paper's HiRED-20%)
    is split: ``alpha`` (0.5) of it to the base view, the rest to the tiles in proportion to their
    *visual content*: the ``(1 - alpha)`` fraction of base-view tokens receiving the most attention in
    an early vision layer (layer 0, as the authors' code), counted in the part of the base view each
    tile covers. Inside every unit, the tokens receiving the most attention in the feature layer are kept.
    Tile budgets are apportioned by largest remainder and capped at a tile's size (surplus goes to the
    other tiles, then to the base view), so every image keeps exactly ``B`` grid tokens plus its newlines.

    Adapted for LLaVA-OV: attention received (mean over heads and queries) replaces the CLS attention
    at both layers; the base view's region of a tile is its proportional share of the ``g x g`` grid (the
    authors' code reshapes the flattened base grid instead, which is not a spatial split).
    """

    name = "hired"
    default_keep = 0.2
    keeps_token_places = True
    paper = "HiRED (Arif et al., AAAI 2025, arXiv 2408.10945)"
    cues = VisionCues(attention_layers=(0, "feature"))

    def __init__(self, keep: float | None = None, alpha: float = 0.5, content_layer: int = 0) -> None:
        super().__init__(keep)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.content_layer = content_layer
        if content_layer != 0:
            self.cues = VisionCues(attention_layers=(content_layer, "feature"))

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha, "content_layer": self.content_layer}

    def total(self, layout: ImageLayout) -> int:
        return budget(sum(layout.unit_sizes()), self.keep)

    def kept_count(self, layout: ImageLayout) -> int:
        return self.total(layout) + layout.num_newlines

    def unit_budgets(self, image: ImageTokens) -> list[int]:
        layout = image.layout
        sizes, total = layout.unit_sizes(), self.total(layout)
        if not layout.tiled:
            return [total]
        base = min(math.floor(self.alpha * total + 0.5), sizes[0])
        tiles = min(total - base, sum(sizes[1:]))
        base = total - tiles
        g2 = layout.grid * layout.grid
        early = image.attention[self.content_layer][:g2]
        top = _top(torch.arange(g2, device=early.device), early, int(g2 * (1 - self.alpha)))
        region = layout.base_region_of_tile(early.device)[top]
        content = torch.bincount(region, minlength=layout.num_tiles).tolist()
        return [base] + apportion(tiles, content, sizes[1:])

    def reduce_image(self, image: ImageTokens) -> ReducedImage:
        if self.is_identity:
            return ReducedImage(image.features, torch.arange(image.features.shape[0], device=image.features.device))
        scores = image.attention["feature"]
        kept = [_top(idx, scores[idx], b) for idx, b in zip(_unit_indices(image.layout, image.features.device),
                                                            self.unit_budgets(image))]
        return _assemble(image, kept)

    def selection_flops(self, geometry, n_visual: int, n_text: int, n_crops: int | None = None) -> int:
        return _vision_attention_flops(geometry, n_visual, n_crops, layers=2)


def apportion(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split ``total`` by ``weights`` (largest remainder, ties to the earlier entry), capped at ``caps``."""
    if total > sum(caps):
        raise ValueError(f"cannot place {total} tokens in units holding {sum(caps)}")
    alloc = [0] * len(caps)
    while (remaining := total - sum(alloc)) > 0:
        active = [i for i, cap in enumerate(caps) if alloc[i] < cap]
        w = [max(0.0, float(weights[i])) for i in active]
        if sum(w) <= 0:
            w = [float(caps[i] - alloc[i]) for i in active]
        shares = [remaining * x / sum(w) for x in w]
        give = [math.floor(s) for s in shares]
        by_remainder = sorted(range(len(active)), key=lambda j: (-(shares[j] - give[j]), j))
        for j in by_remainder[: remaining - sum(give)]:
            give[j] += 1
        for j, i in enumerate(active):
            alloc[i] += min(give[j], caps[i] - alloc[i])
    return alloc


# ---------------------------------------------------------------------------------------------- FLOPs helpers
def _crops(geometry, n_visual: int, n_crops: int | None) -> int:
    if n_crops is not None:
        return n_crops
    return max(1, math.ceil(n_visual / geometry.vision.tokens_per_crop))


def _vision_attention_flops(geometry, n_visual: int, n_crops: int | None, layers: int) -> int:
    """QK^T of ``layers`` vision layers per crop (q and k come from the tower's own projections)."""
    if geometry.vision is None:
        return 0
    t = geometry.vision.tokens_per_crop
    return layers * _crops(geometry, n_visual, n_crops) * 2 * t * t * geometry.vision.hidden


def _per_crop(geometry, n_visual: int, n_crops: int | None, per_crop) -> int:
    if geometry.vision is None:
        return 0
    return _crops(geometry, n_visual, n_crops) * per_crop(geometry.vision.tokens_per_crop)
