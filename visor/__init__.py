"""visor: VISion On Request for LLaVA-OneVision.

Public API::

    from visor import VisorForConditionalGeneration, VisorConfig, LayerPlan
"""

from __future__ import annotations

from visor.model.plan import LayerKind, LayerPlan, format_slots

__version__ = "0.1.0"

__all__ = ["LayerKind", "LayerPlan", "VisorConfig", "VisorForConditionalGeneration", "format_slots"]


def __getattr__(name: str):
    # The model pulls in transformers; keep ``import visor`` light for the CLI and the data tools.
    if name in ("VisorForConditionalGeneration", "VisorConfig"):
        from visor.model import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'visor' has no attribute {name!r}")
