"""Model geometry for the cost model: the shapes that decide FLOPs and cache bytes, nothing else.

Named presets carry the real LLaVA-OneVision shapes (random weights are fine for cost), and
``Geometry.from_config`` reads any ``LlavaOnevisionConfig`` (or ``VisorConfig``, which subclasses it)
through the attribute names of ``Qwen2Config`` and ``SiglipVisionConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class TextGeometry:
    """The decoder (Qwen2): grouped-query attention and a gated (SwiGLU) MLP."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    mlp: int  # intermediate width of the gated MLP (gate and up: hidden -> mlp; down: mlp -> hidden)
    vocab: int
    head_dim: int = 0  # 0 = hidden // heads, as in Qwen2

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.heads > 0 and self.hidden % self.heads:
                raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden // max(self.heads, 1))
        _check_positive(self, ("num_layers", "hidden", "heads", "kv_heads", "mlp", "vocab", "head_dim"))
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class VisionGeometry:
    """The vision tower (SigLIP, plain MHA and a GELU MLP) and the 2-layer MLP projector."""

    num_layers: int  # layers actually run (up to ``vision_feature_layer``)
    hidden: int
    heads: int
    mlp: int
    patch: int
    image_size: int
    channels: int = 3
    projector_in: int = 0  # 0 = hidden (one feature layer); more when several layers are concatenated
    projector_out: int = 0  # the LLM hidden size; 0 = filled in by Geometry

    def __post_init__(self) -> None:
        if self.projector_in == 0:
            object.__setattr__(self, "projector_in", self.hidden)
        _check_positive(self, ("num_layers", "hidden", "heads", "mlp", "patch", "image_size", "channels", "projector_in"))
        if self.image_size < self.patch:
            raise ValueError(f"image_size {self.image_size} is smaller than patch {self.patch}")

    @property
    def tokens_per_crop(self) -> int:
        # a stride-`patch` conv without padding drops the remainder (384 // 14 = 27)
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class Geometry:
    """Text + vision geometry, plus the shape of VISOR's cross-attention convolution."""

    name: str
    text: TextGeometry
    vision: VisionGeometry | None = None
    ca_conv_kernel: int = 7  # depthwise 1-D conv over the visual tokens (conditional positional encoding)
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.vision is not None and self.vision.projector_out == 0:
            object.__setattr__(self, "vision", replace(self.vision, projector_out=self.text.hidden))
        if self.ca_conv_kernel <= 0:
            raise ValueError(f"ca_conv_kernel must be positive, got {self.ca_conv_kernel}")

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> Geometry:
        """Read a ``LlavaOnevisionConfig``-like object (``text_config`` + ``vision_config``).

        A bare ``Qwen2Config``-like object (no ``text_config``) gives a text-only geometry. A
        ``VisorConfig``'s ``ca_conv_kernel`` is read too (default 7).
        """
        text_cfg = getattr(config, "text_config", None) or config
        heads = int(text_cfg.num_attention_heads)
        hidden = int(text_cfg.hidden_size)
        text = TextGeometry(
            num_layers=int(text_cfg.num_hidden_layers),
            hidden=hidden,
            heads=heads,
            kv_heads=int(getattr(text_cfg, "num_key_value_heads", None) or heads),
            mlp=int(text_cfg.intermediate_size),
            vocab=int(text_cfg.vocab_size),
            head_dim=int(getattr(text_cfg, "head_dim", None) or hidden // heads),
        )
        vision = None
        vision_cfg = getattr(config, "vision_config", None)
        if vision_cfg is not None:
            total = int(vision_cfg.num_hidden_layers)
            feature_layer = getattr(config, "vision_feature_layer", -1)
            layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
            # hidden_states has total+1 entries (embeddings first): index i runs i layers, -k runs total+1-k
            used = max(int(i) if int(i) >= 0 else total + 1 + int(i) for i in layers)
            vision = VisionGeometry(
                num_layers=used,
                hidden=int(vision_cfg.hidden_size),
                heads=int(vision_cfg.num_attention_heads),
                mlp=int(vision_cfg.intermediate_size),
                patch=int(vision_cfg.patch_size),
                image_size=int(vision_cfg.image_size),
                channels=int(getattr(vision_cfg, "num_channels", 3)),
                projector_in=int(vision_cfg.hidden_size) * len(layers),
            )
        return cls(
            name=name or str(getattr(text_cfg, "_name_or_path", "") or getattr(config, "model_type", "config")),
            text=text,
            vision=vision,
            ca_conv_kernel=int(getattr(config, "ca_conv_kernel", None) or 7),  # VisorConfig's field
        )


def _check_positive(obj: object, names: tuple[str, ...]) -> None:
    for n in names:
        value = getattr(obj, n)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive integer, got {value!r}")


# SigLIP-so400m as LLaVA-OneVision runs it: the 27-layer tower with its last layer removed (26 layers,
# vision_feature_layer -1), no pooling head; 384 px / patch 14 -> 27 x 27 = 729 tokens per crop.
SIGLIP_SO400M_384 = VisionGeometry(num_layers=26, hidden=1152, heads=16, mlp=4304, patch=14, image_size=384)

PRESETS: dict[str, Geometry] = {
    "llava-ov-0.5b": Geometry(
        name="llava-ov-0.5b",
        # Qwen2-0.5B; the LLaVA-OV HF checkpoint pads the vocabulary to 152,000 (Qwen2's own: 151,936)
        text=TextGeometry(num_layers=24, hidden=896, heads=14, kv_heads=2, mlp=4864, vocab=152_000),
        vision=SIGLIP_SO400M_384,
        notes="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    ),
    "llava-ov-1.5b": Geometry(
        name="llava-ov-1.5b",
        # Qwen2-1.5B; vocabulary padded as in the 0.5B LLaVA-OV checkpoint (Qwen2's own: 151,936)
        text=TextGeometry(num_layers=28, hidden=1536, heads=12, kv_heads=2, mlp=8960, vocab=152_000),
        vision=SIGLIP_SO400M_384,
        notes="Qwen2-1.5B decoder + SigLIP-so400m (no official HF checkpoint; geometry for cost only)",
    ),
}


def get_geometry(name: str) -> Geometry:
    """A named preset; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown geometry {name!r}; known geometries: {', '.join(sorted(PRESETS))}") from None
