"""``VisorForConditionalGeneration``: LLaVA-OneVision with VISOR's three decoder-layer kinds.

Reading guide (top to bottom):

1. ``encode_images``: SigLIP tower -> projector -> anyres packing, one token sequence per image.
2. ``Streams``: the prompt split into a *text stream* (every non-image token, left-padded across the
   batch; right-padded for a right-padded batch without a cache) and a *visual stream* (every image token,
   right-padded), each with the position ids of the
   original interleaved sequence, so RoPE frames agree between layer kinds.
3. ``VisorDecoder.run_layers``: per layer, by kind:
     SA   -> text and visual merged back into original order, the original layer, split again;
     CA   -> text += CrossAttention(text, visual), then the original layer on text only;
     text -> the original layer on text only.
   Visual tokens are gathered only by SA layers; CA reads them through its own K/V projection; text-only
   layers never see them.
4. The LM head on the text stream (last position only when ``logits_to_keep=1``).

Samples in one batch may ask for different active configurations: they are grouped and each group runs
as its own batch (``forward(active_sa=[cfg_0, cfg_1, ...])``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers import AutoModel, AutoModelForImageTextToText, PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

from visor.model.cache import VisorCache
from visor.model.config import VisorConfig
from visor.model.layers import AttentionMask, DecoderLayer, ImageSlots, RMSNorm, RotaryEmbedding, causal_mask, padding_layout
from visor.model.plan import ActiveConfig, LayerKind, LayerPlan
from visor.model.vision import image_token_count, num_crops, pack_image


@dataclass
class VisorOutput(ModelOutput):
    """Output of ``VisorForConditionalGeneration.forward``.

    ``logits`` cover the *text stream* ([B, Nt, vocab], left-padded, or right-padded for a right-padded
    batch without a cache; the last ``logits_to_keep`` slots when that is set). ``text_index`` gives each
    slot's position in the input sequence (-1 = padding): read logits through it, not by slot.
    """

    loss: torch.Tensor | None = None
    num_loss_tokens: int | None = None
    logits: torch.Tensor | None = None
    text_index: torch.Tensor | None = None
    past_key_values: VisorCache | None = None
    visual_states: torch.Tensor | None = None
    selection: object | None = None  # the in-LLM reducer's TokenSelection (visor.compression.in_llm)


@dataclass
class Streams:
    """A batch split into text and visual streams (see module docstring)."""

    text: torch.Tensor  # [B, Nt, D]
    text_pos: torch.Tensor  # [B, Nt]
    text_valid: torch.Tensor  # [B, Nt]
    text_src: torch.Tensor  # [B, Nt] index into the input sequence (0 for padding slots)
    visual: torch.Tensor  # [B, Nv, D]
    visual_pos: torch.Tensor  # [B, Nv]
    visual_valid: torch.Tensor  # [B, Nv]
    visual_src: torch.Tensor  # [B, Nv]
    image_ids: torch.Tensor  # [B, Nv] which image of the sample a token belongs to (-1 = padding)
    seq_order: torch.Tensor  # [B, N] index into cat(text, visual) of each input position
    seq_pos: torch.Tensor  # [B, N]
    seq_valid: torch.Tensor  # [B, N]

    @property
    def has_visual(self) -> bool:
        return self.visual.shape[1] > 0

    def merged(self) -> torch.Tensor:
        """Text and visual states back in the input's interleaved order: [B, N, D]."""
        both = torch.cat([self.text, self.visual], dim=1)
        return both.gather(1, self.seq_order[..., None].expand(-1, -1, both.shape[-1]))

    def split(self, sequence: torch.Tensor) -> None:
        """Inverse of ``merged``: write [B, N, D] states back into the two streams."""
        dim = sequence.shape[-1]
        self.text = sequence.gather(1, self.text_src[..., None].expand(-1, -1, dim))
        visual = sequence.gather(1, self.visual_src[..., None].expand(-1, -1, dim))
        self.visual = visual if bool(self.visual_valid.all()) else visual * self.visual_valid[..., None].to(visual.dtype)


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether some row is padded and every row's real tokens come first."""
    every_valid, valid_first = padding_layout(attention_mask.bool())
    return valid_first and not every_valid


def _pad_stack(rows: list[torch.Tensor], length: int, left: bool, value=0) -> torch.Tensor:
    out = []
    for row in rows:
        pad = length - row.shape[0]
        spec = [0, 0] * (row.dim() - 1) + ([pad, 0] if left else [0, pad])
        out.append(F.pad(row, spec, value=value))
    return torch.stack(out)


class VisorDecoder(nn.Module):
    """The Qwen2 decoder with VISOR's layer kinds (parameter names follow Qwen2's)."""

    def __init__(self, config: VisorConfig) -> None:
        super().__init__()
        text = config.text_config
        ca_layers = set(config.cross_attention_layers)
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(text, with_cross_attention=i in ca_layers, ca_kv_layout=config.ca_kv_layout, ca_conv_kernel=config.ca_conv_kernel)
            for i in range(text.num_hidden_layers)
        )
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(text)
        self.gradient_checkpointing = False  # recompute each layer in backward instead of storing activations

    def _run(self, layer: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    # ------------------------------------------------------------------ prefill
    def run_layers(
        self, streams: Streams, kinds: Sequence[LayerKind], start: int, stop: int, cache: VisorCache | None
    ) -> None:
        """Run layers ``start..stop-1`` on ``streams`` in place (prefill)."""
        dtype = streams.text.dtype
        text_rope = self.rotary_emb(streams.text_pos, dtype)
        text_mask = causal_mask(streams.text_valid, streams.text_valid.shape[1])
        seq_rope = seq_mask = ca_mask = merged = slots = None
        for index in range(start, stop):
            layer, kind = self.layers[index], kinds[index]
            own_kv = cache.self_kv[index] if cache is not None else None
            if kind is LayerKind.SELF_ATTENTION:
                if seq_rope is None:
                    seq_rope = self.rotary_emb(streams.seq_pos, dtype)
                    seq_mask = causal_mask(streams.seq_valid, streams.seq_valid.shape[1])
                # consecutive SA layers pass the interleaved sequence on; split only before another kind
                merged = self._run(layer, streams.merged() if merged is None else merged, seq_rope, seq_mask, own_kv)
                if index + 1 == stop or kinds[index + 1] is not LayerKind.SELF_ATTENTION:
                    streams.split(merged)
                    merged = None
                continue
            if kind is LayerKind.CROSS_ATTENTION and streams.has_visual:
                if ca_mask is None:
                    ca_mask = self.cross_attention_mask(streams)
                    slots = ImageSlots.of(streams.image_ids)  # read once for every CA layer
                update, keys, values = layer.cross_attn(streams.text, ca_mask, streams.visual, slots)
                if cache is not None:
                    cache.cross_kv[index].set(keys, values)
                streams.text = streams.text + update
            streams.text = self._run(layer, streams.text, text_rope, text_mask, own_kv)

    @staticmethod
    def cross_attention_mask(streams: Streams) -> AttentionMask:
        """Text attends to the visual tokens that precede it in the input (causality kept)."""
        allowed = streams.visual_valid[:, None, :] & (streams.visual_pos[:, None, :] < streams.text_pos[:, :, None])
        rows = allowed.any(-1)
        if bool(streams.visual_valid.all()) and bool((allowed == rows[..., None]).all()):
            # every text token sees all visual tokens or none (one image per sample): no mask, zero the "none" rows
            return AttentionMask(rows_with_keys=None if bool(rows.all()) else rows)
        allowed = allowed | ~rows[..., None]  # keep softmax finite; those rows are zeroed after
        return AttentionMask(bool_mask=allowed[:, None], rows_with_keys=rows)

    # ------------------------------------------------------------------ decode
    def decode(self, hidden: torch.Tensor, cache: VisorCache, new_valid: torch.Tensor) -> torch.Tensor:
        """Run ``hidden`` ([B, t, D] new text tokens) through every layer, extending ``cache``."""
        t = hidden.shape[1]
        positions = cache.next_position[:, None] + torch.arange(t, device=hidden.device)[None]
        cache.extend_masks(new_valid)
        rope = self.rotary_emb(positions, hidden.dtype)
        full_mask = causal_mask(cache.full_valid, t)
        text_mask = causal_mask(cache.text_valid, t)
        ca_mask, visual_valid = None, cache.visual_valid
        segments = {segment.start: segment for segment in cache.segments}  # in-LLM token pruning
        for index, (layer, kind) in enumerate(zip(self.layers, cache.kinds)):
            if index in segments:
                segment = segments[index]
                full_mask, visual_valid, ca_mask = causal_mask(segment.full_valid, t), segment.visual_valid, None
                if segment.position_shift is not None:
                    rope = self.rotary_emb(positions - segment.position_shift[:, None], hidden.dtype)
            if kind is LayerKind.SELF_ATTENTION:
                hidden = layer(hidden, rope, full_mask, cache.self_kv[index])
                continue
            cross = cache.cross_kv[index]
            if kind is LayerKind.CROSS_ATTENTION and cross.key is not None:
                if ca_mask is None and bool(visual_valid.all()):  # every new token sees every visual key
                    ca_mask = AttentionMask()
                elif ca_mask is None:
                    rows = visual_valid.any(-1, keepdim=True).expand(-1, t)
                    allowed = (visual_valid | ~rows[:, :1])[:, None, None, :].expand(-1, 1, t, -1)
                    ca_mask = AttentionMask(bool_mask=allowed, rows_with_keys=rows)
                hidden = hidden + layer.cross_attn(hidden, ca_mask, keys=cross.key, values=cross.value)[0]
            hidden = layer(hidden, rope, text_mask, cache.self_kv[index])
        return hidden


class VisorPreTrainedModel(PreTrainedModel):
    config_class = VisorConfig
    config: VisorConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer", "SiglipEncoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        from visor.model.layers import CrossAttention, PerImageConv

        if isinstance(module, CrossAttention):
            module.reset_parameters()
        elif isinstance(module, PerImageConv):
            return  # reset by its CrossAttention
        elif isinstance(module, VisorDecoder):
            nn.init.normal_(module.embed_tokens.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.Linear) and not _inside_vision(self, module) and not getattr(module, "_visor_cross_attention", False):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, VisorForConditionalGeneration):
            nn.init.normal_(module.image_newline, std=1 / self.config.text_config.hidden_size**0.5)
        elif hasattr(module, "_init_weights") and isinstance(module, PreTrainedModel) and module is not self:
            module.init_weights()


def _inside_vision(model: nn.Module, module: nn.Module) -> bool:
    tower = getattr(model, "vision_tower", None)
    return tower is not None and any(module is m for m in tower.modules())


class VisorForConditionalGeneration(VisorPreTrainedModel):
    """LLaVA-OneVision with VISOR's text-only / cross-attention / self-attention decoder layers.

    Build one from a LLaVA-OV checkpoint with ``from_llava_onevision``; save/load with
    ``save_pretrained``/``from_pretrained`` (safetensors, the plan in ``config.json``).
    """

    def __init__(self, config: VisorConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.language_model = VisorDecoder(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        from visor.routing.router import build_router

        self.router = build_router(config)  # present once `visor route train` attached one
        self.post_init()

    # transformers' tied-weights machinery (5.x: target -> source); applied only if config.tie_word_embeddings
    _tied_weights_keys = {"lm_head.weight": "language_model.embed_tokens.weight"}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # ------------------------------------------------------------------ construction helpers
    @property
    def plan(self) -> LayerPlan:
        return self.config.layer_plan

    @classmethod
    def from_llava_onevision(cls, source, plan: LayerPlan | None = None, **kwargs) -> "VisorForConditionalGeneration":
        """Convert a LLaVA-OneVision checkpoint (folder, hub id, config, or HF model) into VISOR."""
        from visor.convert.llava_onevision import convert_llava_onevision

        return convert_llava_onevision(source, plan=plan, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved VISOR checkpoint; missing or mismatched tensors are an error, never random init."""
        from visor.convert.checkpoint import load_visor_checkpoint

        return load_visor_checkpoint(cls, pretrained_model_name_or_path, *args, **kwargs)

    def resolve_configs(self, active_sa, batch_size: int) -> list[ActiveConfig]:
        """Per-sample active configurations from ``active_sa`` (None, one config, or one per sample)."""
        plan = self.plan
        per_sample = (
            isinstance(active_sa, (list, tuple))
            and len(active_sa) > 0
            and all(c is None or isinstance(c, (list, tuple, str)) for c in active_sa)
        )
        if not per_sample:
            return [plan.resolve_active(active_sa)] * batch_size
        if len(active_sa) != batch_size:
            raise ValueError(f"active_sa gives {len(active_sa)} per-sample configurations for a batch of {batch_size}")
        return [plan.resolve_active(c) for c in active_sa]

    # ------------------------------------------------------------------ vision
    def encode_images(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, batch_num_images: Sequence[int] | None = None,
        image_tiled: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        """Per image, its LLaVA-OV token sequence after the projector ([n_i, D]).

        An image is tiled (base view + anyres tiles) when its sample has one image, else base view + one
        newline; ``image_tiled`` (one flag per image) can switch a sample's only image to the base-only layout
        (``visor.model.resolution``): only its first crop is then encoded."""
        cfg = self.config
        base = cfg.vision_config.image_size
        if batch_num_images is None:
            tiled = [True] * len(image_sizes)
        else:
            tiled = [n == 1 for n in batch_num_images for _ in range(int(n))]
        if len(tiled) != len(image_sizes):
            raise ValueError(f"batch_num_images counts {len(tiled)} images but image_sizes has {len(image_sizes)}")
        if image_tiled is not None:
            if len(image_tiled) != len(tiled):
                raise ValueError(f"image_tiled has {len(image_tiled)} flags for {len(tiled)} images")
            if any(bool(t) and not d for t, d in zip(image_tiled, tiled)):
                raise ValueError("image_tiled asks for tiles on an image of a multi-image prompt (LLaVA-OV never tiles those)")
            tiled = [bool(t) for t in image_tiled]
        crops_per_image = [num_crops(size.tolist(), cfg.image_grid_pinpoints, base, t) for size, t in zip(image_sizes, tiled)]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(crops_per_image):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(crops_per_image)}")
            short = [i for i, n in enumerate(crops_per_image) if n > pixel_values.shape[1]]
            if short:
                raise ValueError(f"image(s) {short} need more crops than pixel_values holds ({pixel_values.shape[1]})")
            crops = torch.cat([pv[:n] for pv, n in zip(pixel_values, crops_per_image)], dim=0)
        elif pixel_values.dim() == 4:
            crops = pixel_values
            if crops.shape[0] != sum(crops_per_image):
                raise ValueError(f"pixel_values holds {crops.shape[0]} crops, the images need {sum(crops_per_image)}")
        else:
            raise ValueError(f"pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")
        features = self.multi_modal_projector(self.vision_features(crops.to(self.dtype)))
        images = []
        for size, per_image in zip(image_sizes, features.split(crops_per_image)):
            images.append(
                pack_image(
                    per_image, size.tolist(), self.image_newline,
                    grid_pinpoints=cfg.image_grid_pinpoints, base_size=base, vision_aspect_ratio=cfg.vision_aspect_ratio,
                )
            )
        return images

    def vision_features(self, crops: torch.Tensor) -> torch.Tensor:
        """SigLIP hidden states of the configured feature layer ([crops, tokens, vision_hidden])."""
        layer = self.config.vision_feature_layer
        tower = self.vision_tower
        if layer == -1:  # the last encoder layer, before post_layernorm: skip collecting every layer
            hidden = tower.encoder(inputs_embeds=tower.embeddings(crops)).last_hidden_state
        else:
            states = tower(crops, output_hidden_states=True).hidden_states
            hidden = torch.cat([states[i] for i in layer], dim=-1) if isinstance(layer, list) else states[layer]
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return hidden

    def num_image_tokens(self, image_size: Sequence[int], tiled: bool = True) -> int:
        """Placeholder tokens for one image of ``(height, width)`` (``tiled=False``: multi-image layout)."""
        cfg = self.config
        return image_token_count(
            image_size, grid_pinpoints=cfg.image_grid_pinpoints, base_size=cfg.vision_config.image_size,
            patch_size=cfg.vision_config.patch_size, vision_aspect_ratio=cfg.vision_aspect_ratio, tiled=tiled,
            drop_first_token=cfg.vision_feature_select_strategy == "default",
        )

    # ------------------------------------------------------------------ streams
    def build_streams(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        images_per_sample: list[list[torch.Tensor]],
        text_left: bool = True,
    ) -> Streams:
        """Split the batch into text and visual streams, checking image tokens per sample.

        ``text_left=False`` pads the text stream on the right: with right-padded inputs its valid tokens
        then come first in every row, so causal attention over it needs no mask (``causal_mask``). A cache
        needs the left layout (decoded tokens are appended after the prompt's last text token)."""
        embeds = self.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        batch, length = input_ids.shape
        text_src, visual_src, visual, image_ids = [], [], [], []
        for b in range(batch):
            positions = torch.arange(length, device=input_ids.device)
            img_pos, txt_pos = positions[is_image[b]], positions[~is_image[b]]
            feats = images_per_sample[b]
            n_features = sum(f.shape[0] for f in feats)
            if img_pos.numel() != n_features:
                raise ValueError(
                    f"sample {b}: the prompt has {img_pos.numel()} image tokens but its {len(feats)} image(s) "
                    f"give {n_features} visual features; expand each image placeholder with the processor "
                    f"(VisorProcessor) so the counts match"
                )
            text_src.append(txt_pos)
            visual_src.append(img_pos)
            visual.append(torch.cat(feats, 0) if feats else embeds.new_zeros(0, embeds.shape[-1]))
            image_ids.append(torch.cat([torch.full((f.shape[0],), i, device=input_ids.device) for i, f in enumerate(feats)]) if feats else positions.new_zeros(0))
        n_text = max(t.numel() for t in text_src)
        n_visual = max(v.numel() for v in visual_src)
        text_slot = _pad_stack([torch.ones_like(t, dtype=torch.bool) for t in text_src], n_text, left=text_left, value=False)
        visual_slot = _pad_stack([torch.ones_like(v, dtype=torch.bool) for v in visual_src], n_visual, left=False, value=False)
        text_src_t = _pad_stack(text_src, n_text, left=text_left)
        visual_src_t = _pad_stack(visual_src, n_visual, left=False)
        seq_order = torch.empty_like(input_ids)
        for b in range(batch):
            first = n_text - text_src[b].numel() if text_left else 0
            seq_order[b, text_src[b]] = torch.arange(first, first + text_src[b].numel(), device=input_ids.device)
            seq_order[b, visual_src[b]] = n_text + torch.arange(visual_src[b].numel(), device=input_ids.device)
        mask = attention_mask.bool()
        return Streams(
            text=embeds.gather(1, text_src_t[..., None].expand(-1, -1, embeds.shape[-1])),
            text_pos=position_ids.gather(1, text_src_t),
            text_valid=text_slot & mask.gather(1, text_src_t),
            text_src=text_src_t,
            visual=_pad_stack(visual, n_visual, left=False).to(embeds.dtype),
            visual_pos=position_ids.gather(1, visual_src_t),
            visual_valid=visual_slot,
            visual_src=visual_src_t,
            image_ids=_pad_stack(image_ids, n_visual, left=False, value=-1),
            seq_order=seq_order,
            seq_pos=position_ids,
            seq_valid=mask,
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: Sequence[int] | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        active_sa=None,
        past_key_values: VisorCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_features: list[torch.Tensor] | None = None,
        return_visual_states: bool = False,
        loss_reduction: str = "mean",
        reducer=None,
        selection=None,
        image_tiled: Sequence[bool] | None = None,
        **unused,
    ) -> VisorOutput:
        """Run the model.

        Args:
            input_ids: [B, N] token ids with each image's placeholder already expanded (the processor
                does it); left padding for generation; right padding (training, scoring) lets every
                causal attention run without a mask.
            attention_mask: [B, N], 1 for real tokens.
            pixel_values / image_sizes / batch_num_images: as produced by ``VisorProcessor`` (HF's
                LLaVA-OV layout: [num_images, crops, 3, H, W], [num_images, 2], images per sample).
            position_ids: defaults to ``cumsum(attention_mask) - 1`` (as generation does).
            labels: [B, N] next-token targets in the input layout, -100 = ignored (HF convention).
            active_sa: SA slot numbers switched on: ``None`` = all, one sequence for the batch, or a list
                of per-sample sequences (samples are grouped by configuration internally).
            past_key_values: a ``VisorCache`` from a previous call: ``input_ids`` are then new text tokens.
            use_cache: return a ``VisorCache`` for decoding (prefill).
            logits_to_keep: compute logits for the last k text positions only (0 = all).
            image_features: precomputed per-image features (skip the vision tower).
            loss_reduction: ``"mean"`` over the target tokens, or ``"sum"`` (``num_loss_tokens`` is
                returned either way, so distributed training can normalise by a global token count).
            reducer: a visual-token reducer (``Reducer`` or ``"NAME[:AMOUNT]"``, see ``visor.compression``):
                pre-LLM ones shorten the prompt's image placeholders, in-LLM ones prune inside the prefill.
            selection: a ``TokenSelection`` from an earlier call on the same prompt, replayed by the
                in-LLM reducer instead of ranking again (uncached generation uses it).
            image_tiled: per image, anyres tiles (True) or the base view only (False); default: tiles for a
                sample's only image, as LLaVA-OV (``visor.model.resolution``; the processor/Batcher give it).
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if unused:
            raise TypeError(f"forward() got unexpected argument(s): {sorted(unused)}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if past_key_values is not None:
            return self._decode_step(input_ids, attention_mask, past_key_values, logits_to_keep)

        batch = input_ids.shape[0]
        reduction = None
        if reducer is not None:  # visor.compression.apply: pre-LLM reducers shorten the prompt here
            from visor.compression.apply import apply_pre_llm, prepare_reducer

            reducer = prepare_reducer(reducer)
            if reducer.stage == "pre_llm":
                reduction = apply_pre_llm(self, reducer, input_ids, attention_mask, position_ids, labels, pixel_values,
                                          image_sizes, batch_num_images, image_features, image_tiled=image_tiled)
                if reduction is not None:
                    input_ids, attention_mask, position_ids = reduction.input_ids, reduction.attention_mask, reduction.position_ids
                    labels, image_features = reduction.labels, reduction.image_features
                reducer = None
        if image_features is None and pixel_values is not None:
            if image_sizes is None:
                raise ValueError("pixel_values given without image_sizes")
            image_features = self.encode_images(pixel_values, image_sizes, batch_num_images, image_tiled)
        images_per_sample = self._assign_images(image_features or [], batch, batch_num_images)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        configs = self.resolve_configs(active_sa, batch)
        groups: dict[ActiveConfig, list[int]] = {}
        for index, config in enumerate(configs):
            groups.setdefault(config, []).append(index)
        if len(groups) > 1 and use_cache:
            raise ValueError("a cache serves one active configuration: generate per configuration group")

        results = []
        for config, members in groups.items():
            idx = torch.tensor(members, device=input_ids.device)
            results.append(
                (members, self._prefill(
                    input_ids[idx], attention_mask[idx], position_ids[idx],
                    [images_per_sample[i] for i in members],
                    None if labels is None else labels[idx],
                    config, use_cache, logits_to_keep, return_visual_states,
                    in_llm=reducer, selection=None if selection is None else selection.subset(members),
                ))
            )
        merged = results[0][1] if len(results) == 1 else self._merge_groups(results, batch)
        if reducer is not None or reduction is not None:
            from visor.compression.apply import finish_output

            merged = finish_output(merged, results, batch, reduction)
        if merged.loss is not None and loss_reduction == "mean":
            merged.loss = merged.loss / max(merged.num_loss_tokens, 1)
        return merged

    def _assign_images(self, features: list[torch.Tensor], batch: int, batch_num_images) -> list[list[torch.Tensor]]:
        if batch_num_images is None:
            if features and len(features) != batch:
                raise ValueError(
                    f"{len(features)} images for a batch of {batch}: pass batch_num_images (images per sample)"
                )
            batch_num_images = [1] * batch if features else [0] * batch
        counts = [int(n) for n in batch_num_images]
        if len(counts) != batch or sum(counts) != len(features):
            raise ValueError(f"batch_num_images {counts} does not match {len(features)} images in a batch of {batch}")
        out, start = [], 0
        for n in counts:
            out.append(list(features[start:start + n]))
            start += n
        return out

    def _prefill(self, input_ids, attention_mask, position_ids, images, labels, config, use_cache, logits_to_keep, return_visual_states,
                 in_llm=None, selection=None) -> VisorOutput:
        # a right-padded batch without a cache (training, teacher-forced scoring) keeps the text stream's
        # valid tokens first too, so every causal attention runs without a mask
        right_padded = not use_cache and in_llm is None and logits_to_keep <= 0 and _right_padded(attention_mask)
        streams = self.build_streams(input_ids, attention_mask, position_ids, images, text_left=not right_padded)
        kinds = self.plan.layer_kinds(config)
        cache = None
        if use_cache:
            cache = VisorCache(kinds=kinds)
            cache.full_valid = streams.seq_valid.clone()
            cache.text_valid = streams.text_valid.clone()
            cache.visual_valid = streams.visual_valid.clone()
            cache.next_position = position_ids.max(dim=1).values + 1
        if in_llm is None:
            self.language_model.run_layers(streams, kinds, 0, len(kinds), cache)
        else:  # in-LLM token pruning (FastV, PyramidDrop): see visor.compression.in_llm
            from visor.compression.in_llm import run_layers_with_drops

            selection = run_layers_with_drops(self.language_model, streams, kinds, cache, in_llm, selection)
        hidden = streams.text if logits_to_keep <= 0 else streams.text[:, -logits_to_keep:]
        logits = self.lm_head(self.language_model.norm(hidden))
        text_index = torch.where(streams.text_valid, streams.text_src, torch.full_like(streams.text_src, -1))
        loss = count = None
        if labels is not None:
            if logits_to_keep > 0:
                raise ValueError("labels need logits for every position: leave logits_to_keep at 0")
            loss, count = self._loss(logits, labels, streams)
        return VisorOutput(
            loss=loss,
            num_loss_tokens=count,
            logits=logits,
            text_index=text_index if logits_to_keep <= 0 else text_index[:, -logits_to_keep:],
            past_key_values=cache,
            visual_states=streams.visual if return_visual_states else None,
            selection=selection if in_llm is not None else None,
        )

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor, streams: Streams) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over the text stream, and the number of target tokens."""
        # the target of input position p is labels[p + 1]; visual positions carry no logits
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
        targets = shifted.gather(1, streams.text_src)
        targets = torch.where(streams.text_valid, targets, torch.full_like(targets, -100))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return loss, int((targets != -100).sum())

    def _merge_groups(self, results, batch: int) -> VisorOutput:
        width = max(r.logits.shape[1] for _, r in results)
        vocab = results[0][1].logits.shape[-1]
        logits = results[0][1].logits.new_zeros(batch, width, vocab)
        text_index = torch.full((batch, width), -1, dtype=torch.long, device=logits.device)
        loss_sum, loss_count, has_loss = 0.0, 0, False
        for members, out in results:
            idx = torch.tensor(members, device=logits.device)
            n = out.logits.shape[1]
            logits[idx, width - n:] = out.logits
            text_index[idx, width - n:] = out.text_index
            if out.loss is not None:
                has_loss = True
                loss_sum, loss_count = loss_sum + out.loss, loss_count + out.num_loss_tokens
        return VisorOutput(loss=loss_sum if has_loss else None, num_loss_tokens=loss_count if has_loss else None,
                           logits=logits, text_index=text_index)

    def _decode_step(self, input_ids, attention_mask, cache: VisorCache, logits_to_keep: int) -> VisorOutput:
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"cache holds {cache.batch_size} samples, got {input_ids.shape[0]} new rows")
        if (input_ids == self.config.image_token_id).any():
            raise ValueError("image tokens cannot be appended to a cache: images are given at prefill")
        new_valid = attention_mask[:, -input_ids.shape[1]:].bool()
        hidden = self.language_model.decode(self.language_model.embed_tokens(input_ids), cache, new_valid)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(self.language_model.norm(hidden))
        return VisorOutput(logits=logits, past_key_values=cache)

    # ------------------------------------------------------------------ routing
    def route(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
              image_features=None, budget: float = 0.0, image_tiled=None, position_ids=None):
        """The active configuration the router picks per sample; see ``visor.routing.router`` (a router that
        also picks the resolution returns ``Configuration``s and reads base-only inputs)."""
        from visor.routing.router import route

        return route(self, input_ids, attention_mask, pixel_values, image_sizes, batch_num_images, image_features, budget,
                     image_tiled=image_tiled, position_ids=position_ids)

    # ------------------------------------------------------------------ generation
    def generate(self, *args, **kwargs):
        """Greedy or sampled generation with VISOR's cache; see ``visor.model.generation.generate``."""
        from visor.model.generation import generate

        return generate(self, *args, **kwargs)


AutoModel.register(VisorConfig, VisorForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(VisorConfig, VisorForConditionalGeneration, exist_ok=True)
