"""Reducers that prune visual tokens inside the LLM: FastV and PyramidDrop.

How a drop runs (``run_layers_with_drops``): the decoder runs up to the scoring layer; the attention of
the prompt's *last token* over the sequence is computed from that layer's own q/k projections with RoPE
(``last_token_attention``: one query, one layer, no eager attention anywhere else), averaged over heads;
each image keeps ``kept_tokens(its current visual tokens, keep)`` of its tokens by that score; the streams
are compacted (``prune_streams``) and the following layers run on the shorter sequence.

What is pruned under VISOR. Visual tokens live in their own stream: SA layers refine them, CA layers
read them, text-only layers ignore them. A drop before layer K removes tokens *from the visual stream*:
every later SA layer attends over, and every later CA layer reads, the kept tokens only; the earlier
layers (and their KV cache) keep the full set. The score is the same for every layer kind: the layer's
own (Qwen2) q/k over the merged [text; visual] sequence in original order, i.e. exactly FastV's signal
in an SA layer, and in a CA or text-only layer the attention that layer would pay to the current visual
states had it seen them. On the baseline (every layer SA) this is the published method.

Positions: FastV keeps each token's original position id (its in-place variant does); PyramidDrop
renumbers the sequence contiguously after every drop, as published. Under renumbering, a later token's
position drops by the number of visual tokens pruned before it; decoding applies the same shift per layer
(``CacheSegment.position_shift``), so cached and uncached generation agree.

Selection once per prompt: the ranking query is the last prompt token. The selection made at prefill is
returned (``TokenSelection``, absolute visual-token indices per sample and drop) and replayed by the
uncached generation path (``forward(..., selection=...)``), so both paths prune the same tokens; the
cached path keeps them in its KV cache.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from visor.compression.base import InLLMReducer, LayerDrop, budget
from visor.model.layers import apply_rope, repeat_kv


class FastV(InLLMReducer):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
    for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764).

    After layer ``K`` (default 2), keep the top ``keep`` (= 1 - R; default R = 50%) image tokens ranked by
    the attention the last prompt token pays them in layer ``K - 1``, averaged over heads; later layers
    never see the rest, decoding included. Original position ids are kept. AMOUNT: the kept fraction
    ``1 - R`` (``fastv:0.5`` = ``fastv:2x`` = the paper's K=2, R=50%).

    Adapted for LLaVA-OV: the budget is per image (with one image, as in the paper, the same thing); the
    attention is recomputed from layer K-1's q/k for the last token only, so the model keeps its SDPA
    kernels; in a VISOR model the visual stream itself shrinks for every SA and CA layer after K (module
    docstring).
    """

    name = "fastv"
    default_keep = 0.5
    paper = "FastV (Chen et al., ECCV 2024, arXiv 2403.06764)"

    def __init__(self, keep: float | None = None, layer: int = 2) -> None:
        super().__init__(keep)
        if not isinstance(layer, int) or layer < 1:
            raise ValueError(f"FastV prunes after layer K >= 1, got K={layer!r}")
        self.layer = layer

    def describe(self) -> dict:
        return {**super().describe(), "layer": self.layer}

    def drops(self, num_layers: int) -> list[LayerDrop]:
        if self.layer >= num_layers:
            raise ValueError(f"FastV layer K={self.layer} must be below the model's {num_layers} layers")
        return [LayerDrop(self.layer - 1, self.layer, self.keep)]


class PyramidDrop(InLLMReducer):
    """PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247).

    The LLM is split into stages at layers ``[L/4, L/2, 3L/4]`` (default); at the start of each stage the
    image tokens are ranked by the last instruction token's attention computed from that layer's q/k with
    RoPE, and a fraction ``lambda`` (default 0.5) of the current ones is kept (1, 1/2, 1/4, 1/8 of the
    tokens per stage). Positions are renumbered contiguously after each drop, and decoding shifts new tokens'
    positions by the tokens dropped, as the authors' code does. AMOUNT: lambda. Each stage keeps
    ``kept_tokens(current, lambda)`` (the authors floor ``N * lambda**s``: at most one token apart per stage).

    Adapted for LLaVA-OV: the budget is per image (batches, multi-image prompts); under VISOR the visual
    stream shrinks stage by stage for every SA and CA layer (module docstring).
    """

    name = "pdrop"
    default_keep = 0.5
    paper = "PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247)"
    renumber_positions = True

    def __init__(self, keep: float | None = None, layers: list[int] | tuple[int, ...] | None = None) -> None:
        super().__init__(keep)
        self.layers = None if layers is None else tuple(int(l) for l in layers)

    def describe(self) -> dict:
        return {**super().describe(), "layers": list(self.layers) if self.layers is not None else "L/4,L/2,3L/4"}

    def stage_layers(self, num_layers: int) -> list[int]:
        layers = self.layers
        if layers is None:
            layers = sorted({max(1, num_layers * i // 4) for i in (1, 2, 3)})
        if list(layers) != sorted(set(layers)) or not all(0 <= l < num_layers for l in layers):
            raise ValueError(f"PyramidDrop layers must be increasing and in 0..{num_layers - 1}, got {list(layers)}")
        return list(layers)

    def drops(self, num_layers: int) -> list[LayerDrop]:
        return [LayerDrop(l, l, self.keep) for l in self.stage_layers(num_layers)]


# ---------------------------------------------------------------------------------------------- selection record
@dataclass
class TokenSelection:
    """The visual tokens an in-LLM reducer kept, per sample and drop: absolute indices into the sample's
    visual stream as built from the prompt (image order, placeholder order). Replayable."""

    reducer: str
    kept: list[list[torch.Tensor]]  # [sample][drop] -> sorted absolute indices
    seconds: float = 0.0  # time spent scoring and choosing (see visor.compression.timing)

    def subset(self, members) -> "TokenSelection":
        return TokenSelection(self.reducer, [self.kept[int(i)] for i in members], self.seconds)

    @staticmethod
    def merge(parts: list[tuple[list[int], "TokenSelection"]], batch: int) -> "TokenSelection":
        kept: list = [None] * batch
        for members, part in parts:
            for i, row in zip(members, part.kept):
                kept[i] = row
        return TokenSelection(parts[0][1].reducer, kept, sum(p.seconds for _, p in parts))

    def kept_per_sample(self) -> list[int]:
        """Visual tokens left after the last drop, per sample."""
        return [int(rows[-1].numel()) if rows else -1 for rows in self.kept]


@dataclass
class _Clock:
    enabled: bool = False
    seconds: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self):
        if self.enabled:
            _sync()
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            _sync()
            self.seconds += time.perf_counter() - self._start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


TIMING = {"enabled": False}  # switched on by visor.compression.timing


# ---------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def last_token_attention(layer, rotary_emb, streams) -> torch.Tensor:
    """[B, Nv]: the attention the last valid token pays each visual token in ``layer``'s self-attention,
    computed from the layer's input states (``input_layernorm`` -> q/k -> RoPE), mean over heads; 0 for
    padding slots. One query per sample: O(N) work, no attention matrix."""
    x = streams.merged()
    h = layer.input_layernorm(x)
    attn = layer.self_attn
    b, n, _ = h.shape
    valid = streams.seq_valid
    last = (valid.long() * torch.arange(n, device=h.device)).argmax(dim=1)
    h_last = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))
    q = attn.q_proj(h_last).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = rotary_emb(streams.seq_pos, h.dtype)
    pick = last[:, None, None].expand(-1, 1, cos.shape[-1])
    q = apply_rope(q, cos.gather(1, pick), sin.gather(1, pick))
    k = repeat_kv(apply_rope(k, cos, sin), attn.num_heads // attn.num_kv_heads)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)  # [B, H, 1, N]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]  # [B, N]
    return probs.gather(1, streams.visual_src) * streams.visual_valid


def choose_per_image(scores: torch.Tensor, streams, keep: float) -> torch.Tensor:
    """[B, Nv] keep-mask: per sample and image, the ``budget(tokens, keep)`` best-scored slots
    (ties: the earlier token)."""
    mask = torch.zeros_like(streams.visual_valid)
    for b in range(scores.shape[0]):
        ids = torch.where(streams.visual_valid[b], streams.image_ids[b], torch.full_like(streams.image_ids[b], -1))
        for image in torch.unique(ids[ids >= 0]).tolist():
            slots = (ids == image).nonzero()[:, 0]
            order = torch.sort(scores[b, slots], descending=True, stable=True).indices
            mask[b, slots[order[: budget(slots.numel(), keep)]]] = True
    return mask


# ---------------------------------------------------------------------------------------------- pruning
def prune_streams(streams, keep: torch.Tensor, renumber: bool) -> torch.Tensor:
    """Drop the visual slots whose ``keep`` is False from ``streams`` (in place); return the tokens dropped
    per sample ([B]). The merged sequence is re-left-padded, so its last slot stays the last token.
    ``renumber``: every later token's position id drops by the number of tokens dropped before it."""
    device = keep.device
    batch, n_seq = streams.seq_valid.shape
    n_text = streams.text.shape[1]
    drop_slot = streams.visual_valid & ~keep  # [B, Nv]
    dropped_at = torch.zeros(batch, n_seq, dtype=torch.long, device=device)
    dropped_at.scatter_add_(1, streams.visual_src, drop_slot.long())
    kept_seq = dropped_at == 0  # [B, N]
    position = streams.seq_pos - (dropped_at.cumsum(1) - dropped_at) if renumber else streams.seq_pos

    # new slot of every old merged position, and the old position of every new slot (pads -> 0)
    new_len = kept_seq.sum(1)
    width = int(new_len.max())
    offset = width - new_len
    new_index = (offset[:, None] + kept_seq.long().cumsum(1) - 1).clamp(min=0)
    target = torch.where(kept_seq, new_index, torch.full_like(new_index, width))
    src = torch.zeros(batch, width + 1, dtype=torch.long, device=device)
    src.scatter_(1, target, torch.arange(n_seq, device=device).expand(batch, -1).contiguous())
    is_pad = torch.arange(width, device=device)[None] < offset[:, None]
    src = src[:, :width].masked_fill(is_pad, 0)

    # text stream: same tokens, new slots (and positions)
    if renumber:
        streams.text_pos = position.gather(1, streams.text_src)
    streams.text_src = new_index.gather(1, streams.text_src)

    # visual stream: kept slots compacted to the front, in order
    kept_slot = keep & streams.visual_valid
    n_kept = kept_slot.sum(1)
    n_visual = int(n_kept.max()) if n_kept.numel() else 0
    order = torch.sort((~kept_slot).long(), dim=1, stable=True).indices[:, :n_visual]
    valid_slot = torch.arange(n_visual, device=device)[None] < n_kept[:, None]
    old_src = streams.visual_src.gather(1, order)
    dim = streams.visual.shape[-1]
    streams.visual = streams.visual.gather(1, order[..., None].expand(-1, -1, dim)) * valid_slot[..., None].to(streams.visual.dtype)
    streams.visual_pos = torch.where(valid_slot, position.gather(1, old_src), 0)
    streams.visual_src = torch.where(valid_slot, new_index.gather(1, old_src), 0)
    streams.image_ids = torch.where(valid_slot, streams.image_ids.gather(1, order), -1)
    old_to_new = (kept_slot.long().cumsum(1) - 1).clamp(min=0)
    streams.visual_valid = valid_slot

    # merged order: text indices unchanged, visual indices renumbered
    seq_order = streams.seq_order.gather(1, src)
    if old_to_new.shape[1]:
        visual_old = (seq_order - n_text).clamp(min=0, max=old_to_new.shape[1] - 1)
        seq_order = torch.where(seq_order >= n_text, n_text + old_to_new.gather(1, visual_old), seq_order)
    streams.seq_order = seq_order.clamp(max=n_text + max(n_visual, 1) - 1)
    streams.seq_pos = position.gather(1, src)
    streams.seq_valid = streams.seq_valid.gather(1, src) & ~is_pad
    return drop_slot.sum(1)


# ---------------------------------------------------------------------------------------------- runner
def run_layers_with_drops(decoder, streams, kinds, cache, reducer: InLLMReducer,
                          selection: TokenSelection | None = None) -> TokenSelection:
    """Prefill every layer like ``decoder.run_layers``, pruning visual tokens at ``reducer.drops``.

    With ``selection`` (from an earlier prefill of the same prompt) its kept tokens are replayed instead of
    scored. ``streams.text_src`` is restored at the end, so text indices refer to the input sequence.
    Returns the selection made (absolute visual indices per sample and drop).
    """
    drops = reducer.drops(len(kinds))
    batch = streams.text.shape[0]
    if selection is not None:
        if selection.reducer != reducer.name or len(selection.kept) != batch or any(len(r) != len(drops) for r in selection.kept):
            raise ValueError(f"the selection to replay ({selection.reducer}, {len(selection.kept)} samples) does not "
                             f"match reducer {reducer.name} with {len(drops)} drop(s) on a batch of {batch}")
    input_text_src = streams.text_src
    absolute = torch.arange(streams.visual.shape[1], device=streams.visual.device).expand(batch, -1)
    kept_record: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    clock = _Clock(enabled=TIMING["enabled"])
    shift = torch.zeros(batch, dtype=torch.long, device=streams.visual.device)
    start = 0
    for step, drop in enumerate(drops):
        decoder.run_layers(streams, kinds, start, drop.score_layer, cache)
        start = drop.score_layer
        scores = None
        if selection is None and streams.has_visual and not reducer.is_identity:
            with clock:
                scores = last_token_attention(decoder.layers[drop.score_layer], decoder.rotary_emb, streams)
        decoder.run_layers(streams, kinds, start, drop.prune_layer, cache)
        start = drop.prune_layer
        with clock:
            if selection is not None:
                keep = torch.zeros_like(streams.visual_valid)
                for b in range(batch):
                    keep[b] = torch.isin(absolute[b], selection.kept[b][step].to(absolute.device)) & streams.visual_valid[b]
            elif scores is not None:
                keep = choose_per_image(scores, streams, drop.keep)
            else:
                keep = streams.visual_valid.clone()
        for b in range(batch):
            kept_record[b].append(absolute[b][keep[b] & streams.visual_valid[b]].sort().values)
        if not bool((streams.visual_valid & ~keep).any()):
            continue  # nothing to drop: the streams and the cache stay as they are
        order = torch.sort((~(keep & streams.visual_valid)).long(), dim=1, stable=True).indices
        shift = shift + prune_streams(streams, keep, reducer.renumber_positions)
        absolute = absolute.gather(1, order[:, : streams.visual.shape[1]])
        if cache is not None:
            from visor.model.cache import CacheSegment

            cache.segments.append(CacheSegment(
                start=drop.prune_layer, full_valid=streams.seq_valid.clone(), visual_valid=streams.visual_valid.clone(),
                position_shift=shift.clone() if reducer.renumber_positions else None,
            ))
    decoder.run_layers(streams, kinds, start, len(kinds), cache)
    streams.text_src = input_text_src
    return TokenSelection(reducer.name, kept_record, clock.seconds)
