"""Visual-token compression peers on the same footing as VISOR, usable alone or under VISOR.

    from visor.compression import build_reducer

    model.generate(**inputs, reducer="visionzip:0.25")        # or reducer=VisionZip(0.25)
    model(**inputs, reducer=build_reducer("fastv:2x", layer=3))

Pre-LLM (``visor.compression.pre_llm``): Pooling (VISOR-TR), VisionZip, VisPruner, HiRED act on each
image's packed token sequence and shorten the prompt. In-LLM (``visor.compression.in_llm``): FastV and
PyramidDrop prune the visual tokens the sequence carries at given layers; under VISOR the visual stream
itself shrinks for every later SA and CA layer. Names, AMOUNT meanings and defaults:
``visor.compression.registry``; integration with forward/generate: ``visor.compression.apply``; selection
overhead timing for benchmarks: ``visor.compression.timing``.
"""

from visor.compression.base import (
    ImageTokens,
    InLLMReducer,
    LayerDrop,
    PreLLMReducer,
    ReducedImage,
    Reducer,
    VisionCues,
    check_keep,
)
from visor.compression.in_llm import FastV, PyramidDrop, TokenSelection
from visor.compression.layout import ImageLayout
from visor.compression.pre_llm import HiRED, Pooling, VisionZip, VisPruner
from visor.compression.registry import REDUCERS, build_reducer, get_reducer_class, reducer_names

__all__ = [
    "REDUCERS",
    "FastV",
    "HiRED",
    "ImageLayout",
    "ImageTokens",
    "InLLMReducer",
    "LayerDrop",
    "Pooling",
    "PreLLMReducer",
    "PyramidDrop",
    "ReducedImage",
    "Reducer",
    "TokenSelection",
    "VisPruner",
    "VisionCues",
    "VisionZip",
    "build_reducer",
    "check_keep",
    "get_reducer_class",
    "reducer_names",
]
