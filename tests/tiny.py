"""Tiny random LLaVA-OneVision configurations for tests (real architecture, seconds on a CPU)."""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

IMAGE_TOKEN_ID = 3
VOCAB = 64


def tiny_llava_config(num_layers: int = 6, heads: int = 4, kv_heads: int = 2, hidden: int = 32, tie: bool = False,
                      image_size: int = 32, patch: int = 8, max_views: int = 9) -> LlavaOnevisionConfig:
    text = dict(
        model_type="qwen2", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 8,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    vision = dict(
        model_type="siglip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=patch, vision_use_head=False,
    )
    s = image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s], [s, 3 * s], [3 * s, s], [3 * s, 3 * s]]
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{max_views}",
        tie_word_embeddings=tie,
    )


def tiny_llava(seed: int = 0, **kwargs) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_llava_config(**kwargs)
    config._attn_implementation = "eager"
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # random non-trivial values everywhere (HF zero-inits biases and norms)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \n?.,:;!'-_/()|<>")


def tiny_tokenizer():
    """A character-level Hugging Face tokenizer whose ids fit the tiny configs' vocabulary."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    assert len(vocab) <= VOCAB and vocab["<image>"] == IMAGE_TOKEN_ID
    backend = Tokenizer(WordLevel(vocab, unk_token="?"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    from visor.processing.processor import DEFAULT_CHAT_TEMPLATE

    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def tiny_image_processor(config):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    size = config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints,
        crop_size={"height": size, "width": size},
    )


def random_image(height: int, width: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def save_tiny_llava(folder, seed: int = 0, **kwargs):
    """Build and save a tiny LLaVA-OV checkpoint folder (weights, tokenizer, image processor)."""
    model = tiny_llava(seed=seed, **kwargs)
    model.save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    tiny_image_processor(model.config).save_pretrained(str(folder))
    return model


def randomise_cross_attention(model, seed: int = 1) -> None:
    """Give CA blocks non-zero output projections so they change the result."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cross_attn." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def tiny_benchmark_llava(num_layers: int, seed: int = 0, hidden: int = 32, image_size: int = 32):
    """``(model, tokenizer, config)``: a tiny random LLaVA-OV over the benchmark tokenizer's vocabulary
    (so procedural items tokenise), with non-trivial norms and biases."""
    from visor.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = tiny_llava_config(num_layers=num_layers, hidden=hidden, image_size=image_size)
    config.text_config.vocab_size = len(tok)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model, tok, config


def load_benchmark(name: str):
    """The module of ``benchmarks/NAME.py`` (a script folder, not a package), for testing its functions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
