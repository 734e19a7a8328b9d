"""Parameter-name mapping between Hugging Face LLaVA-OneVision and VISOR, both ways.

| Hugging Face (transformers 5.x in memory)   | legacy on-disk checkpoints (hub)          | VISOR                              |
|---------------------------------------------|-------------------------------------------|------------------------------------|
| ``model.vision_tower.X``                    | ``vision_tower.vision_model.X``           | ``vision_tower.X``                 |
| ``model.multi_modal_projector.X``           | ``multi_modal_projector.X``               | ``multi_modal_projector.X``        |
| ``model.image_newline``                     | ``image_newline``                         | ``image_newline``                  |
| ``model.language_model.X``                  | ``language_model.model.X``                | ``language_model.X``               |
| ``lm_head.weight``                          | ``language_model.lm_head.weight``         | ``lm_head.weight``                 |

``X`` below ``language_model`` keeps Qwen2's names (``layers.N.self_attn.q_proj.weight``, ...).
VISOR's own blocks, ``language_model.layers.N.cross_attn.*``, have no Hugging Face counterpart.
"""

from __future__ import annotations

import re

# (pattern on a Hugging Face key, replacement giving the VISOR key); first match wins
_HF_TO_VISOR: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.(?:vision_model\.)?", "vision_tower."),
    (r"^vision_tower\.(?:vision_model\.)?", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^multi_modal_projector\.", "multi_modal_projector."),
    (r"^(?:model\.)?image_newline$", "image_newline"),
    (r"^model\.language_model\.(?:model\.)?", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "language_model."),
    (r"^lm_head\.", "lm_head."),
]

_VISOR_TO_HF: list[tuple[str, str]] = [
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
    (r"^language_model\.", "model.language_model."),
    (r"^lm_head\.", "lm_head."),
]


def hf_to_visor_key(key: str) -> str | None:
    """VISOR name of a Hugging Face LLaVA-OV parameter (either key style); ``None`` if it has none."""
    for pattern, repl in _HF_TO_VISOR:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def visor_to_hf_key(key: str) -> str | None:
    """Hugging Face (transformers 5.x) name of a VISOR parameter; ``None`` for VISOR-only blocks."""
    if is_visor_only(key):
        return None
    for pattern, repl in _VISOR_TO_HF:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def is_visor_only(key: str) -> bool:
    """Parameters VISOR adds (cross-attention blocks, router) that a LLaVA-OV checkpoint lacks."""
    return ".cross_attn." in key or key.startswith("router.")
