"""Analytic FLOPs and KV-cache bytes of VISOR and the baseline LLaVA-OneVision, per sample.

Counting choices (read these first):

* A FLOP is one multiply or one add. A matmul (m x k) @ (k x n) counts ``2mkn``, as
  ``torch.utils.flop_counter`` does; a depthwise conv counts ``2 * kernel`` per output element.
* Only matmul-like work is counted: linear layers, the two attention matmuls (``QK^T`` and ``AV``), the
  convolutions and the LM head. Elementwise work (RMSNorm, biases, residual adds, SiLU/GELU, softmax,
  RoPE) is left out: it is bandwidth-bound, under 1% of the total here, and ``FlopCounterMode`` does not
  count it either, so the two can be cross-checked line by line.
* Grouped-query attention is exact: Q and O are ``hidden x heads*head_dim``, K and V
  ``hidden x kv_heads*head_dim``; the attention matmuls are per *query* head (``4 * Nq * Nk *
  heads * head_dim``), since sharing K/V between heads saves projection work and cache, not matmuls.
* Causal attention is counted over the full ``N x N`` score matrix by default (what a dense
  SDPA/eager kernel computes, and the convention of the paper-style figures this module is tested
  against). ``causal_halving=True`` counts ``N(N+1)/2`` query-key pairs instead (an ideal causal
  kernel). Cross-attention is never halved: text placed after the image sees every visual token.
* Prefill runs the LM head on the last position only (one row per sample; generation needs no other
  logits). A decode step counts one new token per sample: its layers, its attention over the cache,
  and the LM head.
* The vision encoder and the projector are reported on their own lines, per crop (``n_crops``
  encoded); they are *not* part of ``llm_total``, the figure the paper's reductions refer to. The
  projector runs on every encoded patch token (``n_crops * tokens_per_crop``), before LLaVA-OV's
  anyres unpadding, so its token count need not equal ``n_visual``.
* Token compression is expressed as the number of visual tokens each decoder layer sees
  (``visual_tokens_per_layer``): reduce ``n_visual`` for a reducer that acts before the LLM
  (pooling, VisionZip), or give a per-layer list for pruning inside the LLM (FastV after layer K,
  PyramidDrop stages; see ``visual_tokens_schedule``). A reducer's own selection work goes on the
  ``compression_overhead`` line; ``reducer_schedule`` gives both for any ``visor.compression`` reducer.

Per layer kind, with ``Nt`` text and ``Nv`` visual tokens (``h`` hidden, ``m`` MLP width):

* SA: the original layer over ``N = Nt + Nv`` tokens.
* text-only (and a switched-off SA slot): the original layer over ``Nt`` tokens.
* CA: the cross-attention block (Q on ``Nt``; K, V on ``Nv``, GQA or full width; attention
  ``Nt x Nv``; output projection on ``Nt``; depthwise conv over ``Nv``) plus the original layer on ``Nt``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from visor.compression.spec import kept_tokens
from visor.cost.geometry import Geometry, TextGeometry, VisionGeometry
from visor.model.plan import LayerKind, LayerPlan

CaKvLayout = Literal["gqa", "full"]
CA_KV_LAYOUTS: tuple[str, ...] = ("gqa", "full")

# LLM lines of a breakdown, in reading order; the sum of these is ``llm_total``
LLM_LINES: tuple[str, ...] = (
    "self_attention_layers",
    "text_only_layers",
    "ca_text_layers",
    "ca_attention",
    "ca_kv_projection",
    "ca_conv",
    "lm_head",
    "router",
    "compression_overhead",
)
LINE_LABELS: dict[str, str] = {
    "self_attention_layers": "SA layers (text + visual)",
    "text_only_layers": "text-only layers",
    "ca_text_layers": "CA layers: original layer on text",
    "ca_attention": "CA blocks: Q, attention, out proj",
    "ca_kv_projection": "CA blocks: visual K/V proj",
    "ca_conv": "CA blocks: depthwise conv",
    "lm_head": "LM head",
    "router": "router",
    "compression_overhead": "token-selection overhead",
    "vision_encoder": "vision encoder",
    "projector": "projector",
}


@dataclass(frozen=True)
class RouterGeometry:
    """The configuration router: an MLP ``hidden -> router_hidden -> n_configs`` over routing tokens.

    The routing tokens are appended to the prompt and run through the decoder layers
    ``0..read_after_layer`` (as text tokens), then the router reads their states (flattened into one
    input of ``num_tokens * hidden`` features) and they are dropped. ``read_after_layer=None`` means
    the layer before the plan's first SA slot (DESIGN.md section 2).
    """

    router_hidden: int
    n_configs: int
    num_tokens: int = 1
    read_after_layer: int | None = None

    def __post_init__(self) -> None:
        for name in ("router_hidden", "n_configs", "num_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RouterGeometry.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class CostBreakdown:
    """FLOPs per sample, one field per line. ``vision_encoder``/``projector`` are None when not counted."""

    self_attention_layers: int
    text_only_layers: int
    ca_text_layers: int
    ca_attention: int
    ca_kv_projection: int
    ca_conv: int
    lm_head: int
    router: int
    compression_overhead: int
    vision_encoder: int | None
    projector: int | None
    n_crops: int | None
    kinds: tuple[LayerKind, ...]
    per_layer: tuple[int, ...]  # decoder-layer FLOPs (CA block included), without LM head/router/overhead

    @property
    def llm_total(self) -> int:
        """LLM FLOPs: every decoder layer, CA blocks, LM head, router and selection overhead."""
        return sum(getattr(self, name) for name in LLM_LINES)

    @property
    def total(self) -> int:
        """LLM plus vision encoder and projector (those counted as 0 when not given)."""
        return self.llm_total + (self.vision_encoder or 0) + (self.projector or 0)

    def lines(self) -> dict[str, int | None]:
        """Every line by name, LLM lines first, then vision encoder and projector."""
        return {name: getattr(self, name) for name in (*LLM_LINES, "vision_encoder", "projector")}

    def to_dict(self) -> dict:
        return {
            **self.lines(),
            "llm_total": self.llm_total,
            "total": self.total,
            "n_crops": self.n_crops,
            "kinds": [k.value for k in self.kinds],
            "per_layer": list(self.per_layer),
        }


@dataclass(frozen=True)
class KvCacheBytes:
    """KV-cache bytes per sample, by what is cached."""

    self_attention: int  # SA layers: visual + text (+ generated) positions
    text_only: int  # text-only layers: text (+ generated) positions
    ca_visual: int  # CA blocks: the projected visual K/V, written once at prefill
    ca_text: int  # CA layers' original self-attention over text (+ generated) positions
    per_layer: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.self_attention + self.text_only + self.ca_visual + self.ca_text

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "per_layer"}, "total": self.total}


# ---------------------------------------------------------------------------------------------- pieces
def _self_attention_pairs(n: int, causal_halving: bool) -> int:
    return n * (n + 1) // 2 if causal_halving else n * n


def _attention_flops(t: TextGeometry, pairs: int) -> int:
    """``QK^T`` and ``AV`` for ``pairs`` query-key pairs, every query head: 2 matmuls x 2 FLOPs."""
    return 4 * pairs * t.heads * t.head_dim


def _linear_flops_per_token(t: TextGeometry) -> int:
    """Q, K, V, O projections and the gated MLP (gate, up, down) for one token."""
    attn_proj = t.hidden * t.q_dim + 2 * t.hidden * t.kv_dim + t.q_dim * t.hidden
    mlp = 3 * t.hidden * t.mlp
    return 2 * (attn_proj + mlp)


def decoder_layer_flops(t: TextGeometry, n_query: int, attention_pairs: int) -> int:
    """One original (Qwen2) decoder layer: ``n_query`` tokens through it, ``attention_pairs`` scored."""
    return n_query * _linear_flops_per_token(t) + _attention_flops(t, attention_pairs)


def ca_kv_width(t: TextGeometry, ca_kv_layout: str) -> int:
    if ca_kv_layout not in CA_KV_LAYOUTS:
        raise ValueError(f"ca_kv_layout must be one of {CA_KV_LAYOUTS}, got {ca_kv_layout!r}")
    return t.kv_dim if ca_kv_layout == "gqa" else t.q_dim


def ca_block_flops(geometry: Geometry, n_text: int, n_visual: int, ca_kv_layout: str) -> tuple[int, int, int]:
    """The CA block at prefill: (Q + attention + out proj, visual K/V projection, conv)."""
    t = geometry.text
    kv_width = ca_kv_width(t, ca_kv_layout)
    q_attn_o = 2 * n_text * t.hidden * t.q_dim + _attention_flops(t, n_text * n_visual) + 2 * n_text * t.q_dim * t.hidden
    kv_proj = 2 * 2 * n_visual * t.hidden * kv_width
    conv = 2 * geometry.ca_conv_kernel * t.hidden * n_visual
    return q_attn_o, kv_proj, conv


def vision_encoder_flops(v: VisionGeometry, n_crops: int) -> int:
    """SigLIP: patch-embedding conv, then per layer Q/K/V/O, attention over one crop's tokens, MLP."""
    n = v.tokens_per_crop
    patch_embed = 2 * n * (v.channels * v.patch * v.patch) * v.hidden
    per_layer = 2 * n * 4 * v.hidden * v.hidden + 4 * n * n * v.hidden + 2 * n * 2 * v.hidden * v.mlp
    return n_crops * (patch_embed + v.num_layers * per_layer)


def projector_flops(v: VisionGeometry, n_crops: int) -> int:
    """The 2-layer MLP projector on every encoded patch token."""
    return n_crops * 2 * v.tokens_per_crop * (v.projector_in * v.projector_out + v.projector_out * v.projector_out)


def router_mlp_flops(geometry: Geometry, router: RouterGeometry) -> int:
    return 2 * (router.num_tokens * geometry.text.hidden * router.router_hidden + router.router_hidden * router.n_configs)


# ---------------------------------------------------------------------------------------------- inputs
def _check_inputs(
    geometry: Geometry,
    plan: LayerPlan,
    n_visual: int,
    n_text: int,
    visual_tokens_per_layer: Sequence[int] | None,
) -> list[int]:
    """Validate the common arguments; return the visual-token count of every layer."""
    for name, value in (("n_visual", n_visual), ("n_text", n_text)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if plan.num_layers != geometry.text.num_layers:
        raise ValueError(
            f"the layer plan has {plan.num_layers} layers but geometry {geometry.name!r} has "
            f"{geometry.text.num_layers}; build the plan for this geometry, e.g. "
            f"LayerPlan.default({geometry.text.num_layers})"
        )
    if visual_tokens_per_layer is None:
        return [n_visual] * plan.num_layers
    per_layer = [int(v) for v in visual_tokens_per_layer]
    if len(per_layer) != plan.num_layers:
        raise ValueError(
            f"visual_tokens_per_layer has {len(per_layer)} entries; the model has {plan.num_layers} layers"
        )
    bad = [v for v in per_layer if not 0 <= v <= n_visual]
    if bad:
        raise ValueError(f"visual_tokens_per_layer entries must be in 0..n_visual ({n_visual}), got {bad}")
    return per_layer


def visual_tokens_schedule(num_layers: int, n_visual: int, drops: Iterable[tuple[int, float]]) -> list[int]:
    """Visual tokens per layer for in-LLM pruning: from layer ``start`` on, keep ``keep`` of ``n_visual``.

    FastV (prune after layer K to half): ``[(K, 0.5)]``; PyramidDrop: ``[(6, 0.5), (12, 0.25), (18, 0.125)]``.
    """
    counts = [n_visual] * num_layers
    last_start, last_keep = -1, 1.0
    for start, keep in drops:
        if not 0 <= start < num_layers or start <= last_start:
            raise ValueError(f"drop layers must be increasing and in 0..{num_layers - 1}, got {start}")
        if not 0 < keep <= last_keep:
            raise ValueError(f"kept fractions must be in (0, 1] and non-increasing, got {keep} after {last_keep}")
        counts[start:] = [kept_tokens(n_visual, keep)] * (num_layers - start)
        last_start, last_keep = start, keep
    return counts


def reducer_schedule(
    geometry: Geometry, reducer, n_visual: int, n_text: int, n_crops: int | None = None
) -> tuple[list[int], int]:
    """(visual tokens per layer, selection-overhead FLOPs) of a ``visor.compression`` reducer.

    ``reducer``: a ``Reducer`` or a ``"NAME[:AMOUNT]"`` spec. Pre-LLM reducers give every layer their kept
    count (``kept_tokens(n_visual, keep)``: the newline tokens they keep on top are counted as ordinary
    tokens here, a < 1.5% difference at anyres_max_9); in-LLM reducers shrink the count from each drop on.
    Pass the result as ``visual_tokens_per_layer=`` / ``compression_overhead_flops=`` to ``count_prefill``.
    """
    from visor.compression.registry import build_reducer

    reducer = build_reducer(reducer)
    per_layer = reducer.visual_tokens_per_layer(geometry.text.num_layers, n_visual)
    return per_layer, int(reducer.selection_flops(geometry, n_visual, n_text, n_crops))


# ---------------------------------------------------------------------------------------------- counts
def count_prefill(
    geometry: Geometry,
    plan: LayerPlan,
    active_sa: Iterable[int] | str | None,
    n_visual: int,
    n_text: int,
    *,
    visual_tokens_per_layer: Sequence[int] | None = None,
    ca_kv_layout: CaKvLayout = "gqa",
    causal_halving: bool = False,
    n_crops: int | None = None,
    router: RouterGeometry | None = None,
    compression_overhead_flops: int = 0,
) -> CostBreakdown:
    """FLOPs of one prefill of one sample.

    Args:
        geometry: model shapes (``get_geometry(name)`` or ``Geometry.from_config``).
        plan: the layer plan; ``LayerPlan.all_self_attention(L)`` with ``active_sa=None`` is the baseline.
        active_sa: active SA slots (slot numbers, ``"0+2"``, or None for every slot of the plan).
        n_visual: visual tokens entering the LLM (after any reducer that acts before it).
        n_text: text tokens of the prompt.
        visual_tokens_per_layer: visual tokens each layer sees, for pruning inside the LLM.
        ca_kv_layout: ``"gqa"`` (K/V with the LLM's KV heads) or ``"full"`` (``heads * head_dim``).
        causal_halving: count ``N(N+1)/2`` query-key pairs in self-attention instead of ``N^2``.
        n_crops: crops through the vision encoder; None leaves vision and projector uncounted.
        router: the configuration router, if any.
        compression_overhead_flops: a reducer's own selection work, reported on its own line.
    """
    t = geometry.text
    visual = _check_inputs(geometry, plan, n_visual, n_text, visual_tokens_per_layer)
    ca_kv_width(t, ca_kv_layout)  # validate early, also for plans without CA layers
    if compression_overhead_flops < 0:
        raise ValueError(f"compression_overhead_flops must be >= 0, got {compression_overhead_flops}")
    kinds = plan.layer_kinds(active_sa)

    def layer_cost(kind: LayerKind, nt: int, nv: int) -> tuple[int, int, int, int]:
        """(original layer, CA Q/attention/O, CA K/V projection, CA conv) for one layer."""
        if kind is LayerKind.SELF_ATTENTION:
            n = nt + nv
            return decoder_layer_flops(t, n, _self_attention_pairs(n, causal_halving)), 0, 0, 0
        text_layer = decoder_layer_flops(t, nt, _self_attention_pairs(nt, causal_halving))
        if kind is LayerKind.CROSS_ATTENTION:
            return (text_layer, *ca_block_flops(geometry, nt, nv, ca_kv_layout))
        return text_layer, 0, 0, 0

    lines = dict.fromkeys(LLM_LINES, 0)
    per_layer = []
    for kind, nv in zip(kinds, visual):
        layer, ca_qo, ca_kv, ca_conv = layer_cost(kind, n_text, nv)
        key = {
            LayerKind.SELF_ATTENTION: "self_attention_layers",
            LayerKind.TEXT_ONLY: "text_only_layers",
            LayerKind.CROSS_ATTENTION: "ca_text_layers",
        }[kind]
        lines[key] += layer
        lines["ca_attention"] += ca_qo
        lines["ca_kv_projection"] += ca_kv
        lines["ca_conv"] += ca_conv
        per_layer.append(layer + ca_qo + ca_kv + ca_conv)

    lines["lm_head"] = 2 * t.hidden * t.vocab  # last position only
    lines["compression_overhead"] = int(compression_overhead_flops)

    if router is not None:
        read_after = router.read_after_layer
        if read_after is None:
            if not plan.self_attention_layers:
                raise ValueError("router.read_after_layer=None needs a plan with at least one SA slot")
            read_after = plan.self_attention_layers[0] - 1
        if not -1 <= read_after < plan.num_layers:
            raise ValueError(f"router.read_after_layer must be in -1..{plan.num_layers - 1}, got {read_after}")
        # routing tokens ride along as extra text tokens up to the router, then are dropped
        extra = 0
        for kind, nv in list(zip(kinds, visual))[: read_after + 1]:
            extra += sum(layer_cost(kind, n_text + router.num_tokens, nv)) - sum(layer_cost(kind, n_text, nv))
        lines["router"] = extra + router_mlp_flops(geometry, router)

    vision = projector = None
    if n_crops is not None:
        if not isinstance(n_crops, int) or n_crops <= 0:
            raise ValueError(f"n_crops must be a positive integer, got {n_crops!r}")
        if geometry.vision is None:
            raise ValueError(f"geometry {geometry.name!r} has no vision tower; leave n_crops unset")
        vision = vision_encoder_flops(geometry.vision, n_crops)
        projector = projector_flops(geometry.vision, n_crops)

    return CostBreakdown(
        **lines,
        vision_encoder=vision,
        projector=projector,
        n_crops=n_crops,
        kinds=tuple(kinds),
        per_layer=tuple(per_layer),
    )


def count_baseline_prefill(geometry: Geometry, n_visual: int, n_text: int, **kwargs) -> CostBreakdown:
    """The original LLaVA-OV model: every layer self-attention (``LayerPlan.all_self_attention``)."""
    plan = LayerPlan.all_self_attention(geometry.text.num_layers)
    return count_prefill(geometry, plan, None, n_visual, n_text, **kwargs)


def count_decode_step(
    geometry: Geometry,
    plan: LayerPlan,
    active_sa: Iterable[int] | str | None,
    n_visual: int,
    n_text: int,
    *,
    step: int = 1,
    visual_tokens_per_layer: Sequence[int] | None = None,
    ca_kv_layout: CaKvLayout = "gqa",
) -> CostBreakdown:
    """FLOPs of decode step ``step`` (>= 1) for one sample: one new token through every layer.

    The new token attends to ``Nv + Nt + step`` keys in SA layers (itself included), ``Nt + step`` in
    text-only layers and in the original layer of CA layers, and to the ``Nv`` cached visual K/V in CA
    blocks (no K/V projection or conv: those were cached at prefill). Multiply by the batch size for a
    batched step.
    """
    t = geometry.text
    visual = _check_inputs(geometry, plan, n_visual, n_text, visual_tokens_per_layer)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"decode step must be an integer >= 1, got {step!r}")
    ca_kv_width(t, ca_kv_layout)
    kinds = plan.layer_kinds(active_sa)
    text_keys = n_text + step
    lines = dict.fromkeys(LLM_LINES, 0)
    per_layer = []
    for kind, nv in zip(kinds, visual):
        ca_qo = 0
        if kind is LayerKind.SELF_ATTENTION:
            layer = decoder_layer_flops(t, 1, nv + text_keys)
            lines["self_attention_layers"] += layer
        else:
            layer = decoder_layer_flops(t, 1, text_keys)
            if kind is LayerKind.CROSS_ATTENTION:
                ca_qo = 2 * t.hidden * t.q_dim + _attention_flops(t, nv) + 2 * t.q_dim * t.hidden
                lines["ca_text_layers"] += layer
                lines["ca_attention"] += ca_qo
            else:
                lines["text_only_layers"] += layer
        per_layer.append(layer + ca_qo)
    lines["lm_head"] = 2 * t.hidden * t.vocab
    return CostBreakdown(
        **lines, vision_encoder=None, projector=None, n_crops=None, kinds=tuple(kinds), per_layer=tuple(per_layer)
    )


def kv_cache_bytes(
    geometry: Geometry,
    plan: LayerPlan,
    active_sa: Iterable[int] | str | None,
    n_visual: int,
    n_text: int,
    *,
    n_generated: int = 0,
    visual_tokens_per_layer: Sequence[int] | None = None,
    ca_kv_layout: CaKvLayout = "gqa",
    dtype_bytes: int = 2,
) -> KvCacheBytes:
    """KV-cache bytes of one sample after prefill plus ``n_generated`` decoded tokens.

    Per cached position and layer: K and V, ``kv_heads * head_dim`` each (CA visual K/V: ``heads *
    head_dim`` in the ``"full"`` layout), ``dtype_bytes`` per element (2 for bf16/fp16).
    """
    t = geometry.text
    visual = _check_inputs(geometry, plan, n_visual, n_text, visual_tokens_per_layer)
    if not isinstance(n_generated, int) or n_generated < 0:
        raise ValueError(f"n_generated must be an integer >= 0, got {n_generated!r}")
    if not isinstance(dtype_bytes, int) or dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be a positive integer, got {dtype_bytes!r}")
    ca_width = ca_kv_width(t, ca_kv_layout)
    per_position = 2 * t.kv_dim * dtype_bytes  # K and V
    text_positions = n_text + n_generated
    sa = text = ca_visual = ca_text = 0
    per_layer = []
    for kind, nv in zip(plan.layer_kinds(active_sa), visual):
        if kind is LayerKind.SELF_ATTENTION:
            layer = (nv + text_positions) * per_position
            sa += layer
        elif kind is LayerKind.CROSS_ATTENTION:
            vis = nv * 2 * ca_width * dtype_bytes
            txt = text_positions * per_position
            ca_visual += vis
            ca_text += txt
            layer = vis + txt
        else:
            layer = text_positions * per_position
            text += layer
        per_layer.append(layer)
    return KvCacheBytes(sa, text, ca_visual, ca_text, tuple(per_layer))


def format_flops(flops: float) -> str:
    """Human form: ``9.92 TFLOPs``, ``88.7 GFLOPs``."""
    for unit, scale in (("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.0f} FLOPs"


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
