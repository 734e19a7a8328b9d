"""What each recipe kind trains: building the model, choosing trainable parameters, exporting results.

* ``vision``: a SigLIP tower with dense per-patch heads (glyph in the left/right half of each patch,
  colour, dot count); exported as a plain ``SiglipVisionModel`` folder (heads dropped).
* ``base``: a LLaVA-OV model (our implementation with ``LayerPlan.all_self_attention``, equal to
  ``transformers``' by the parity tests) trained from scratch; exported in Hugging Face LLaVA-OV format.
* ``visor-stage1``: LLaVA-OV converted with the maximal plan; only ``cross_attn`` parameters train.
* ``visor-stage2``: every parameter trains (the vision tower optionally frozen).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from visor.train.recipe import Recipe, TinyModelSpec


def grid_pinpoints(spec: TinyModelSpec) -> list[list[int]]:
    size = spec.image_size
    n = spec.max_tiles_per_side
    return [[size * r, size * c] for r in range(1, n + 1) for c in range(1, n + 1)]


def tiny_llava_config(spec: TinyModelSpec, tokenizer):
    """A genuine ``LlavaOnevisionConfig`` for a tiny model whose vocabulary is ``tokenizer``'s."""
    from transformers import LlavaOnevisionConfig

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <image> token")
    text = dict(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.mlp,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision_config(spec), image_token_index=image_token_id,
        video_token_index=image_token_id, image_grid_pinpoints=grid_pinpoints(spec), vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{spec.max_views}",
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def vision_config(spec: TinyModelSpec) -> dict:
    return dict(
        model_type="siglip_vision_model", hidden_size=spec.vision_hidden, intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, vision_use_head=False,
    )


class DenseVisionModel(nn.Module):
    """SigLIP tower + per-patch heads for dense pre-training (``PROBES.md``)."""

    def __init__(self, spec: TinyModelSpec, n_glyphs: int, n_colors: int, max_dots: int = 8, n_shapes: int = 0) -> None:
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        config = SiglipVisionConfig(**{k: v for k, v in vision_config(spec).items() if k != "model_type"})
        self.tower = SiglipVisionModel(config)
        hidden = spec.vision_hidden
        self.left = nn.Linear(hidden, n_glyphs)
        self.right = nn.Linear(hidden, n_glyphs)
        self.color = nn.Linear(hidden, n_colors)
        self.dots = nn.Linear(hidden, max_dots + 1)
        self.max_dots = max_dots
        # opt-in (recipe vision_shape_weight > 0), so checkpoints made without it keep their keys
        self.shape = nn.Linear(hidden, n_shapes) if n_shapes else None

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # the representation LLaVA-OV reads (vision_feature_layer=-1): last layer before post_layernorm
        return self.tower.encoder(inputs_embeds=self.tower.embeddings(pixel_values)).last_hidden_state

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(pixel_values)
        out = {"left": self.left(h), "right": self.right(h), "color": self.color(h), "dots": self.dots(h)}
        if self.shape is not None:
            out["shape"] = self.shape(h)
        return out


def build_llava_base(recipe: Recipe, tokenizer):
    """A VISOR model with every layer SA and no CA: LLaVA-OV as trained from scratch (or continued)."""
    from visor.convert.llava_onevision import convert_llava_onevision
    from visor.model.modeling import VisorForConditionalGeneration
    from visor.model.plan import LayerPlan

    if recipe.init:
        if _model_type(recipe.init) == "visor":  # a base run's own step checkpoint (every layer SA)
            model = VisorForConditionalGeneration.from_pretrained(recipe.init)
            plan = model.plan
            if plan.cross_attention_layers or len(plan.self_attention_layers) != plan.num_layers:
                raise ValueError(f"base init {recipe.init} is a VISOR model with cross-attention layers; a base run "
                                 "continues a LLaVA-OV checkpoint or a base run's own step checkpoint (every layer SA)")
            return model.train()
        from transformers import LlavaOnevisionConfig

        layers = LlavaOnevisionConfig.from_pretrained(recipe.init).text_config.num_hidden_layers
        return convert_llava_onevision(recipe.init, plan=LayerPlan.all_self_attention(layers)).train()
    config = tiny_llava_config(recipe.model, tokenizer)
    torch.manual_seed(recipe.seed)
    from visor.convert.llava_onevision import visor_config_from_llava

    visor_config = visor_config_from_llava(config, LayerPlan.all_self_attention(config.text_config.num_hidden_layers))
    model = VisorForConditionalGeneration(visor_config)
    init_from_scratch(model)
    if recipe.vision_init:
        model.vision_tower.load_state_dict(pretrained_tower_state(recipe.vision_init), strict=True)
    return model.train()


def pretrained_tower_state(folder: str) -> dict[str, torch.Tensor]:
    """The vision tower's weights from a SigLIP checkpoint (a ``vision`` run's export) or from the tower of a
    LLaVA-OV checkpoint (a trained baseline whose tower a new language model should start from)."""
    if _model_type(folder) == "llava_onevision":
        from visor.convert.llava_onevision import convert_llava_onevision

        return convert_llava_onevision(folder).vision_tower.state_dict()
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(folder).state_dict()


@torch.no_grad()
def _model_type(folder: str) -> str | None:
    config = Path(folder) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.exists() else None


def init_from_scratch(model) -> None:
    """Small-normal init of the LLM and projector (GPT-2 style), so training from scratch is stable."""
    for name, module in model.named_modules():
        if name.startswith("vision_tower"):
            continue
        if isinstance(module, nn.Linear) and not getattr(module, "_visor_cross_attention", False):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    nn.init.normal_(model.image_newline, std=0.02)


def fresh_language_model(model) -> None:
    """Random language model and projector in place, the tower kept (an optimiser keeps its parameters): the
    small-normal weights a from-scratch base run starts with (:func:`init_from_scratch`), every RMSNorm weight at 1."""
    init_from_scratch(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("vision_tower") and name.endswith("norm.weight"):
                parameter.fill_(1.0)


def build_visor(recipe: Recipe):
    """Stage 1: convert ``init`` (LLaVA-OV) with the maximal default plan. Stage 2: load the stage-1 VISOR."""
    from visor.model.modeling import VisorForConditionalGeneration

    if recipe.kind == "visor-stage1":
        return VisorForConditionalGeneration.from_llava_onevision(recipe.init).train()
    return VisorForConditionalGeneration.from_pretrained(recipe.init).train()


def set_trainable(model: nn.Module, recipe: Recipe) -> list[nn.Parameter]:
    """Freeze per recipe kind; returns the trainable parameters.

    SigLIP's ``post_layernorm`` (and pooling head) never contribute: LLaVA-OV reads the encoder's hidden
    states before it. They stay frozen, or DDP would wait forever for their gradients. The same holds for a
    router that the init checkpoint carries (trained by ``visor route train`` on a frozen backbone, it is not on
    the answer loss's path) and, with ``reducers`` (VISOR-TR), for the projector and the image-newline embedding: a
    reduced step's features are computed without gradient (``visor.compression.apply``), so they keep their weights;
    with worded data (``data.source=words``) no image is seen at all, so only the language model trains.
    """
    for name, param in model.named_parameters():
        if ".post_layernorm." in name or name.startswith(("vision_tower.head.", "tower.head.", "router.")):
            param.requires_grad = False
        elif (recipe.reducers or recipe.data.source == "words") and name.startswith(("multi_modal_projector.",
                                                                                    "image_newline")):
            param.requires_grad = False
        elif recipe.kind == "visor-stage1":
            param.requires_grad = ".cross_attn." in name
        elif recipe.kind in ("base", "visor-stage2"):
            param.requires_grad = not (recipe.freeze_vision and name.startswith("vision_tower."))
        else:
            param.requires_grad = True
    return [p for p in model.parameters() if p.requires_grad]


def export_llava_onevision(model, folder: Path, tokenizer, image_processor) -> None:
    """Save an all-SA VISOR model as a Hugging Face LLaVA-OneVision checkpoint."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from visor.convert.keys import visor_to_hf_key
    from visor.train.auxiliary import drop_auxiliary

    plan = model.plan
    if plan.cross_attention_layers or len(plan.self_attention_layers) != plan.num_layers:
        raise ValueError("only a model with every layer self-attention and no cross-attention is a LLaVA-OV model")
    data = model.config.to_dict()
    for key in ("cross_attention_layers", "self_attention_layers", "slot_order", "ca_kv_layout", "ca_conv_kernel",
                "viable_configs", "router", "model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    config = LlavaOnevisionConfig(**data)
    hf = LlavaOnevisionForConditionalGeneration(config)
    state = {visor_to_hf_key(k): v for k, v in drop_auxiliary(model.state_dict()).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    image_processor.save_pretrained(str(folder))


# SigLIP's pixel normalisation, as LLaVA-OneVision's preprocessor_config.json gives it; the dense
# pre-training of our tower normalises with the same numbers, so the tower sees in the LVLM what it
# learned on (transformers' default for this processor class is CLIP's mean/std: 35% per-patch glyph
# accuracy instead of 92% for our frozen tower, measured)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def image_processor_for(config):
    """The PIL LLaVA-OV image processor for a model we build: its crop size, anyres grid and SigLIP's
    normalisation."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    size = config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
    )
