"""The building blocks of the VISOR decoder: the Qwen2 layer (ours, not patched from transformers) and
the new cross-attention block.

Design choices, in order of importance:

* The decoder layer reproduces Qwen2's math exactly (RMSNorm -> GQA attention with RoPE -> residual ->
  RMSNorm -> gated SiLU MLP -> residual) with the same parameter names, so Hugging Face weights load by
  a plain prefix mapping (see ``visor.convert.llava_onevision``). Attention runs through
  ``torch.nn.functional.scaled_dot_product_attention``; when no mask is needed (one sample, no padding)
  it uses ``is_causal`` so the fused kernel runs.
* A layer takes *any* set of tokens: the caller decides whether that is the full interleaved sequence
  (SA), or the text stream only (text-only / after CA). Masks are built from the caller's key validity;
  causality follows the token order the caller passes (original order in both streams).
* ``CrossAttention``: pre-norm on text and visual states, the LLM's GQA head layout (optionally full
  width K/V), no RoPE (visual position comes from a depthwise conv, kernel 7, run per image and added
  residually to the visual states it reads), zero-initialised output projection, so a freshly converted
  model computes exactly the text-only model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from transformers.activations import ACT2FN


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm (computed in fp32, cast back)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        # x * rsqrt(mean(x^2) + eps) in fp32 in one fused kernel (the same math as Qwen2's four ops)
        normed = F.rms_norm(hidden_states.to(torch.float32), hidden_states.shape[-1:], eps=self.variance_epsilon)
        return self.weight * normed.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin for arbitrary (per-token) position ids, as Qwen2 computes them.

    The inverse frequencies are computed on first use rather than kept as a buffer: checkpoint loading
    builds modules on the meta device, where a non-persistent buffer would come back uninitialised.
    """

    def __init__(self, text_config) -> None:
        super().__init__()
        self.text_config = text_config
        self._inv_freq: torch.Tensor | None = None
        self.attention_scaling = 1.0

    def inv_freq(self) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.is_meta:
            config = self.text_config
            rope = dict(getattr(config, "rope_parameters", None) or {})
            rope_type = rope.get("rope_type", "default")
            with torch.device("cpu"):
                if rope_type == "default":
                    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
                    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
                    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
                else:  # scaled variants (yarn, linear, ...): transformers' own initialisers
                    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                    inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
            self._inv_freq = inv_freq
        return self._inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x``: [B, heads, T, head_dim]; ``cos``/``sin``: [B, T, head_dim].

    Written as one product and two half-width multiply-adds (no rotated copy, no concatenation).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


@dataclass
class AttentionMask:
    """How a block of queries may attend to its keys.

    ``bool_mask`` ([B, 1, Tq, Tk], True = may attend) or ``is_causal`` (queries and keys are the same
    tokens in order, nothing padded). ``rows_with_keys`` ([B, Tq] bool) marks queries that have at least
    one key; the others get a zero output (cross-attention from text that precedes every image).
    """

    bool_mask: torch.Tensor | None = None
    is_causal: bool = False
    rows_with_keys: torch.Tensor | None = None
    _additive: dict = field(default_factory=dict, repr=False, compare=False)

    def additive(self, dtype: torch.dtype, groups: int = 1) -> torch.Tensor | None:
        """``bool_mask`` as SDPA's additive form (0 / -inf) in ``dtype``, its query rows repeated ``groups``
        times (GQA folding), built once per mask: every layer of a forward shares its mask, and SDPA would
        otherwise convert (and the folding copy) the boolean mask again in each of them."""
        if self.bool_mask is None:
            return None
        key = (dtype, groups)
        if key not in self._additive:
            allowed = self.bool_mask
            if groups > 1:  # [B, 1, Tq, S] -> [B, 1, groups * Tq, S]
                b, _, tq, s = allowed.shape
                allowed = allowed.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(b, 1, groups * tq, s)
            zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._additive[key] = zeros.masked_fill(~allowed, float("-inf"))
        return self._additive[key]


def padding_layout(valid: torch.Tensor) -> tuple[bool, bool]:
    """(every entry valid, each row's valid entries come first) of a [B, T] mask, in one host read."""
    flags = torch.stack([valid.all(), (valid.int().cummin(dim=1).values.bool() == valid).all()])
    every_valid, valid_first = flags.tolist()
    return bool(every_valid), bool(valid_first)


def causal_mask(key_valid: torch.Tensor, num_queries: int) -> AttentionMask:
    """Causal mask for the last ``num_queries`` tokens over ``key_valid`` ([B, Tk]) keys in order.

    No mask at all (SDPA's ``is_causal``, whose fused kernels skip the upper triangle) when every key is
    valid, or when queries and keys are the same tokens and each row's valid keys come first (right
    padding, as training batches are laid out): a valid query then sees only valid keys, and a padded
    query, whose output nothing reads, sees the valid keys before it.
    """
    batch, num_keys = key_valid.shape
    every_valid, valid_first = padding_layout(key_valid)
    if (every_valid and num_queries in (1, num_keys)) or (valid_first and num_queries == num_keys):
        return AttentionMask(is_causal=num_queries > 1)
    offset = num_keys - num_queries
    q_idx = torch.arange(num_queries, device=key_valid.device)[:, None] + offset
    k_idx = torch.arange(num_keys, device=key_valid.device)[None, :]
    allowed = (k_idx <= q_idx)[None] & key_valid[:, None, :]
    # a padded query (no valid key at or before it) attends to itself so the softmax stays finite
    allowed = allowed | ((k_idx == q_idx)[None] & ~allowed.any(-1, keepdim=True))
    return AttentionMask(bool_mask=allowed[:, None])


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * groups, T, D] (GQA)."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
_FOLD_MAX_ROWS = 4096  # fold GQA groups into the query axis up to this many rows per KV head


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """SDPA over [B, heads, T, D] queries and [B, kv_heads, S, D] keys/values, GQA without copying K/V.

    Few queries (decode, cross-attention over the text): the query heads that share a KV head are folded
    into the query axis, one kernel call per KV head (the mask does not depend on the head). Causal
    self-attention: SDPA's own ``enable_gqa``. Otherwise (a masked prefill off CPU, or torch < 2.5) K/V
    are expanded to every head, as Hugging Face does.
    """
    b, heads, tq, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if groups > 1 and not mask.is_causal and tq * groups <= _FOLD_MAX_ROWS:
        folded = q.reshape(b, kv_heads, groups * tq, dim)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.additive(q.dtype, groups)).view(b, heads, tq, dim)
    else:
        native = groups > 1 and _SDPA_HAS_GQA and (mask.is_causal or q.device.type == "cpu")
        if groups > 1 and not native:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        extra = {"enable_gqa": True} if native else {}
        if mask.is_causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=tq > 1, **extra)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.dtype), **extra)
    if mask.rows_with_keys is not None:
        out = out * mask.rows_with_keys[:, None, :, None].to(out.dtype)
    return out


class SelfAttention(nn.Module):
    """Qwen2 grouped-query self-attention (q/k/v with bias, o without), RoPE, SDPA."""

    def __init__(self, text_config) -> None:
        super().__init__()
        hidden = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        kv_cache: "KVSlot | None" = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class GatedMLP(nn.Module):
    """Qwen2 MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, text_config) -> None:
        super().__init__()
        hidden, inner = text_config.hidden_size, text_config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act_fn = ACT2FN[text_config.hidden_act]
        self.inplace_silu = text_config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.inplace_silu and not torch.is_grad_enabled():  # inference: no two extra [tokens, mlp] temporaries
            return self.down_proj(F.silu(gate, inplace=True).mul_(self.up_proj(x)))
        return self.down_proj(self.act_fn(gate) * self.up_proj(x))


class KVSlot:
    """One layer's key/value cache: [B, kv_heads, S, head_dim] tensors grown along S.

    Decode appends into a buffer with spare room (``RESERVE``: a sixteenth of the length, at least 64
    positions), so a step writes its own keys instead of copying the whole cache; ``key``/``value`` are
    views of the filled part.
    """

    RESERVE_FRACTION, RESERVE_MIN = 1 / 16, 64

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is None:
            self.key, self.value = key, value
            return key, value
        length, new = self.key.shape[2], key.shape[2]
        if self._buffers is None or length + new > self._buffers[0].shape[2]:
            capacity = length + new + max(self.RESERVE_MIN, int((length + new) * self.RESERVE_FRACTION))
            buffers = []
            for old in (self.key, self.value):
                buffer = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                buffer[:, :, :length] = old
                buffers.append(buffer)
            self._buffers = (buffers[0], buffers[1])
        key_buffer, value_buffer = self._buffers
        key_buffer[:, :, length:length + new] = key
        value_buffer[:, :, length:length + new] = value
        self.key, self.value = key_buffer[:, :, :length + new], value_buffer[:, :, :length + new]
        return self.key, self.value

    def set(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value, self._buffers = key, value, None

    @property
    def num_bytes(self) -> int:
        if self.key is None:
            return 0
        return self.key.numel() * self.key.element_size() + self.value.numel() * self.value.element_size()


class DecoderLayer(nn.Module):
    """The LLM's own layer (Qwen2), applied to whatever token set the caller passes.

    ``cross_attn`` is present only on CA layers of a VISOR plan; it is run by the model before the
    layer itself (see ``VisorDecoder``), never on SA or text-only passes.
    """

    def __init__(self, text_config, with_cross_attention: bool = False, ca_kv_layout: str = "gqa", ca_conv_kernel: int = 7) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(text_config.hidden_size, text_config.rms_norm_eps)
        self.self_attn = SelfAttention(text_config)
        self.post_attention_layernorm = RMSNorm(text_config.hidden_size, text_config.rms_norm_eps)
        self.mlp = GatedMLP(text_config)
        self.cross_attn = (
            CrossAttention(text_config, kv_layout=ca_kv_layout, conv_kernel=ca_conv_kernel) if with_cross_attention else None
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        kv_cache: KVSlot | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass(frozen=True)
class ImageSlots:
    """Which image each visual token belongs to (``ids``: [B, Nv], -1 = padding) with the two facts the
    per-image conv branches on, read from the device once per forward: every CA layer reuses them (on a GPU
    each read is a host sync that stalls the launch queue)."""

    ids: torch.Tensor
    all_valid: bool
    num_images: int

    @classmethod
    def of(cls, image_ids: torch.Tensor) -> ImageSlots:
        if image_ids.numel() == 0:
            return cls(image_ids, True, 0)
        all_valid, max_id = torch.stack([(image_ids >= 0).all().to(image_ids.dtype), image_ids.max()]).tolist()
        return cls(image_ids, bool(all_valid), int(max_id) + 1)


class PerImageConv(nn.Module):
    """Depthwise 1-D convolution over each image's visual tokens ("conditional positional encoding").

    One channels-last ``conv2d`` (a depthwise kernel; a per-tap sum of shifted copies was ~50x slower in
    bf16 on CPU). Every image is zero-padded at its own ends: with several images in a sample, ``half``
    zero slots are inserted between them first, so a token never sees a neighbour from another image or
    a padding slot. ``image_ids``: [B, Nv] with -1 for padding; tokens of one image are contiguous, in
    LLaVA-OV order (image 0, 1, ...), padding last.
    """

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"conv kernel size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, visual: torch.Tensor, image_ids: torch.Tensor | ImageSlots, residual: bool = False) -> torch.Tensor:
        """``conv(visual)``, or ``visual + conv(visual)`` with ``residual`` (the identity folded into the kernel).

        ``image_ids``: the [B, Nv] tensor, or its ``ImageSlots`` (read once per forward by the caller)."""
        batch, num_tokens, channels = visual.shape
        if num_tokens == 0:
            return visual.clone()
        slots = image_ids if isinstance(image_ids, ImageSlots) else ImageSlots.of(image_ids)
        image_ids, all_valid, n_images = slots.ids, slots.all_valid, slots.num_images
        half = self.kernel_size // 2
        valid = image_ids >= 0
        x = visual if all_valid else visual * valid[..., None].to(visual.dtype)  # padding slots read as zeros
        if n_images <= 1:
            out = self._depthwise(x, residual)
        else:  # `half` zero slots between consecutive images, so one conv never mixes two images
            shift = torch.where(valid, image_ids, torch.full_like(image_ids, n_images - 1))  # padding after the last
            slot = (torch.arange(num_tokens, device=visual.device)[None] + half * shift)[..., None].expand(-1, -1, channels)
            gapped = x.new_zeros(batch, num_tokens + half * (n_images - 1), channels).scatter_(1, slot, x)
            out = self._depthwise(gapped, residual).gather(1, slot)
        return out if all_valid else out * valid[..., None].to(out.dtype)

    def _depthwise(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        """Zero-padded depthwise conv along the tokens of [B, N, C]: one channels-last conv2d call."""
        channels = x.shape[-1]
        grid = x.transpose(1, 2).unsqueeze(2).contiguous(memory_format=torch.channels_last)  # [B, C, 1, N]
        weight = self.weight
        if residual:  # + x: a one at the centre tap (built on the weight's device: no host-to-device copy)
            taps = torch.arange(self.kernel_size, device=weight.device)
            weight = weight + (taps == self.kernel_size // 2).to(weight.dtype)
        weight = weight.to(x.dtype)[:, None, None, :]  # [C, 1, 1, K]
        out = F.conv2d(grid, weight, self.bias.to(x.dtype), padding=(0, self.kernel_size // 2), groups=channels)
        return out.squeeze(2).transpose(1, 2)


class CrossAttention(nn.Module):
    """VISOR's cross-attention block: text queries read the current visual states.

    ``out = o_proj(Attn(q_proj(norm_t(T)), k_proj(norm_v(V + conv(V))), v_proj(...)))`` added to the text
    residual stream; the visual states themselves are never written.
    """

    def __init__(self, text_config, kv_layout: str = "gqa", conv_kernel: int = 7) -> None:
        super().__init__()
        hidden = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or hidden // self.num_heads
        if kv_layout == "gqa":
            self.num_kv_heads = text_config.num_key_value_heads
        elif kv_layout == "full":
            self.num_kv_heads = self.num_heads
        else:
            raise ValueError(f"ca_kv_layout must be 'gqa' or 'full', got {kv_layout!r}")
        self.text_norm = RMSNorm(hidden, text_config.rms_norm_eps)
        self.visual_norm = RMSNorm(hidden, text_config.rms_norm_eps)
        self.conv = PerImageConv(hidden, conv_kernel)
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            proj._visor_cross_attention = True  # initialised by reset_parameters, not the generic Linear rule
        self.reset_parameters()

    def visual_keys_values(self, visual: torch.Tensor, image_ids: torch.Tensor | ImageSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the visual states once: [B, kv_heads, Nv, head_dim] keys and values."""
        b, n, _ = visual.shape
        read = self.visual_norm(self.conv(visual, image_ids, residual=True))  # V + conv(V)
        k = self.k_proj(read).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(read).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(
        self,
        text: torch.Tensor,
        mask: AttentionMask,
        visual: torch.Tensor | None = None,
        image_ids: torch.Tensor | ImageSlots | None = None,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text update from the visual states (prefill: ``visual``/``image_ids``; decode: cached ``keys``/``values``).

        Returns ``(update, keys, values)`` so the caller can cache the projected visual keys/values.
        Everything runs inside this ``forward`` so that module hooks (FSDP2 unsharding) see the call.
        """
        if keys is None:
            keys, values = self.visual_keys_values(visual, image_ids)
        b, t, _ = text.shape
        q = self.q_proj(self.text_norm(text)).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        out = attend(q, keys, values, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), keys, values

    def reset_parameters(self) -> None:
        """Fresh block: small random projections, identity-free conv, and a zero output projection."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=0.02)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.o_proj.weight)
        nn.init.normal_(self.conv.weight, std=0.02)
        nn.init.zeros_(self.conv.bias)
        nn.init.ones_(self.text_norm.weight)
        nn.init.ones_(self.visual_norm.weight)
