"""What the benchmark runs: random-weight models at real geometry, prompts, image rows, LLM configurations.

* Geometry: the shipped LLaVA-OneVision ``config.json`` files (``visor/configs``), so the models have the
  real shapes (Qwen2 decoder, SigLIP-so400m tower, projector, vocabulary). Weights are random: cost does
  not depend on their values.
* The baseline is the same weights under ``LayerPlan.all_self_attention`` (every layer SA, no CA): the
  original LLaVA-OV computation. VISOR configurations switch on the first K SA slots of the default plan.
* Image rows: the visual-token count of an input image size (LLaVA-OV's anyres layout) and the crops the
  vision tower encodes for it.
* Token-reduction rows (VISOR-TR and the compression peers) come from ``visor.compression`` when it is
  installed, through ``REDUCER_ROWS`` (a small registry: a name, the SA count, a reducer spec).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib.resources import files

import torch

from visor.model.cache import VisorCache
from visor.model.plan import LayerKind, LayerPlan

GEOMETRIES: dict[str, str] = {  # --geometry name -> shipped config folder
    "llava-ov-0.5b": "llava-onevision-qwen2-0.5b-ov-hf",
    "llava-ov-1.5b": "llava-onevision-qwen2-1.5b-ov-hf",
}
TEXT_BEFORE_IMAGE = 14  # system prompt + "<|im_start|>user\n" before the image; the rest follows it


def config_path(geometry: str) -> str:
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; known geometries: {', '.join(GEOMETRIES)}")
    return str(files("visor.configs") / GEOMETRIES[geometry] / "config.json")


# ------------------------------------------------------------------------------------------- image rows
@dataclass(frozen=True)
class ImageRow:
    """One input image: ``size`` (height, width) through anyres, or ``None`` = the base view alone."""

    name: str
    size: tuple[int, int] | None
    label: str


IMAGE_ROWS: dict[str, ImageRow] = {
    row.name: row
    for row in (
        ImageRow("base", None, "base view only (one 384x384 crop, no anyres tiles)"),
        ImageRow("384x384", (384, 384), "384x384 image"),
        ImageRow("640x480", (480, 640), "640x480 image (width x height)"),
        ImageRow("1152x1152", (1152, 1152), "1152x1152 image (3x3 tiles)"),
        ImageRow("1056x1280", (1280, 1056), "1056x1280 image: the most tokens anyres_max_9 gives (3x4 tiles)"),
    )
}


def image_tokens_and_crops(model, row: ImageRow) -> tuple[int, int]:
    """(visual tokens into the LLM, crops through the vision tower) for ``row`` under ``model``'s config."""
    from visor.model.vision import num_crops

    cfg = model.config
    if row.size is None:
        grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
        drop = 1 if cfg.vision_feature_select_strategy == "default" else 0
        return grid * grid - drop, 1
    return model.num_image_tokens(row.size), num_crops(row.size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)


# ------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class BenchConfig:
    """One LLM configuration: the baseline plan, or VISOR with ``sa_count`` slots on, optionally a reducer."""

    name: str
    label: str
    baseline: bool = False
    sa_count: int | None = None  # None with baseline=False: every slot (L/3)
    reducer: str | None = None  # "NAME[:AMOUNT]" of visor.compression

    def active(self, plan: LayerPlan):
        if self.baseline:
            return None
        return plan.first_slots(plan.num_slots if self.sa_count is None else self.sa_count)


@dataclass(frozen=True)
class ReducerRow:
    """A token-reduction configuration: VISOR with ``sa_count`` SA slots (None = baseline) plus a reducer."""

    name: str
    label: str
    spec: str
    sa_count: int | None = 2


# The kept fraction at which the baseline's analytic LLM prefill FLOPs equal VISOR(2 SA)'s at 7,290 visual +
# 64 text tokens (LLaVA-OV-0.5B, ``visor cost``; selection overhead not counted): the "matched budget" of
# the pre-LLM peers below. tests/test_bench.py recomputes it. The in-LLM peers (FastV, PyramidDrop) cannot
# reach that budget at their published layers (FastV keeps every token for K=2 of 24 layers: at most ~12x
# with almost nothing kept), so they run at their published defaults.
MATCHED_KEEP_2SA = 0.145

# VISOR-TR as DESIGN.md defines it: spatial pooling of the visual grid before the LLM, on VISOR(2 SA);
# then each token-compression peer on the baseline, and VISOR(2 SA) composed with VisionZip / VisPruner.
REDUCER_ROWS: list[ReducerRow] = [
    ReducerRow("visor-tr2x", "VISOR-TR 2x (2 SA + pooling 2x)", "pooling:2x"),
    ReducerRow("visor-tr4x", "VISOR-TR 4x (2 SA + pooling 4x)", "pooling:4x"),
    *(ReducerRow(f"{name}-matched", f"baseline + {title} {MATCHED_KEEP_2SA} (budget matched to VISOR 2 SA FLOPs)",
                 f"{name}:{MATCHED_KEEP_2SA}", None)
      for name, title in (("pooling", "pooling"), ("visionzip", "VisionZip"), ("vispruner", "VisPruner"), ("hired", "HiRED"))),
    ReducerRow("fastv", "baseline + FastV (published default: K=2, R=50%)", "fastv", None),
    ReducerRow("pdrop", "baseline + PyramidDrop (published default: L/4, L/2, 3L/4, lambda 0.5)", "pdrop", None),
    ReducerRow("visor-2sa+visionzip", "VISOR 2 SA + VisionZip (published default 128/576)", "visionzip"),
    ReducerRow("visor-2sa+vispruner", "VISOR 2 SA + VisPruner (published default 128/576)", "vispruner"),
]


def reducers_available() -> str | None:
    """None when ``visor.compression`` can run pre-LLM reducers here, else why not."""
    try:
        from visor.compression.apply import apply_pre_llm  # noqa: F401
        from visor.compression.registry import get_reducer_class  # noqa: F401
    except ImportError as err:
        return f"visor.compression has no reducer registry yet ({err})"
    return None


def llm_configs(num_slots: int, with_reducers: bool = True, extra_reducers: tuple[str, ...] = ()) -> list[BenchConfig]:
    """Baseline, VISOR with 0, 1, 2, 4 and L/3 active SA slots, then the reducer rows."""
    counts = sorted({c for c in (0, 1, 2, 4) if c <= num_slots} | {num_slots})
    configs = [BenchConfig("baseline", "baseline (every layer SA)", baseline=True)]
    for count in counts:
        name = "visor-ca" if count == 0 else f"visor-{count}sa"
        label = "VISOR, CA only (0 SA)" if count == 0 else f"VISOR, {count} SA" + (" (L/3)" if count == num_slots else "")
        configs.append(BenchConfig(name, label, sa_count=count))
    if with_reducers:
        for row in REDUCER_ROWS:
            configs.append(BenchConfig(row.name, row.label, baseline=row.sa_count is None, sa_count=row.sa_count, reducer=row.spec))
        for spec in extra_reducers:
            slug = spec.replace(":", "-")
            configs.append(BenchConfig(f"baseline+{slug}", f"baseline + {spec}", baseline=True, reducer=spec))
    return configs


# ----------------------------------------------------------------------------------------------- models
@dataclass
class BenchModels:
    visor: torch.nn.Module  # default VISOR plan
    baseline: torch.nn.Module  # the same modules, every layer SA
    dtype: torch.dtype
    device: torch.device
    geometry: str
    extra: dict = field(default_factory=dict)

    def for_config(self, config: BenchConfig):
        return self.baseline if config.baseline else self.visor


def build_models(geometry: str, dtype: torch.dtype, device: str | torch.device = "cpu", init: str = "normal") -> BenchModels:
    """Random-weight models at ``geometry``: the VISOR default plan and, sharing its modules, the baseline.

    ``init="normal"``: N(0, 0.02) matrices, unit norms, zero biases (what the timing runs use);
    ``init="fill"``: constants, much faster, for the memory subprocesses (values do not change memory).
    """
    from visor.convert.llava_onevision import convert_llava_onevision

    device = torch.device(device)
    model = convert_llava_onevision(config_path(geometry), device="meta", dtype=dtype)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives every parameter its own storage
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # to_empty leaves buffers uninitialised too
            if not name.endswith("position_ids"):
                raise RuntimeError(f"build_models does not know how to initialise buffer {name}")
            buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02) if init == "normal" else param.fill_(0.01)
            else:
                param.fill_(1.0 if "norm" in name else 0.0)
    model.eval()
    baseline = copy.copy(model)  # shares every module; only the plan differs
    baseline.config = copy.deepcopy(model.config)
    baseline.config.set_plan(LayerPlan.all_self_attention(model.config.text_config.num_hidden_layers))
    return BenchModels(model, baseline, dtype, device, geometry)


def prompt_ids(model, n_visual: int, n_text: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """[batch, n_text + n_visual] ids: TEXT_BEFORE_IMAGE text tokens, the image placeholders, the rest."""
    if n_text <= TEXT_BEFORE_IMAGE:
        raise ValueError(f"text tokens must be more than {TEXT_BEFORE_IMAGE} (the prompt before the image)")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(10_000, model.config.text_config.vocab_size), (batch, n_text + n_visual), generator=gen)
    ids[ids == model.config.image_token_id] = 0
    ids[:, TEXT_BEFORE_IMAGE:TEXT_BEFORE_IMAGE + n_visual] = model.config.image_token_id
    return ids


def visual_features(model, n_visual: int, batch: int = 1, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = model.config.text_config.hidden_size
    return [torch.randn(n_visual, hidden, generator=gen).to(model.dtype) for _ in range(batch)]


def synthetic_cache(model, kinds: list[LayerKind], batch: int, n_visual: int, n_text: int) -> VisorCache:
    """A ``VisorCache`` as a prefill of ``n_visual`` + ``n_text`` tokens would leave it, filled with noise.

    Same tensors per layer kind as a real prefill (SA: visual + text keys; CA: projected visual K/V plus the
    layer's text keys; text-only: text keys), so decode steps read exactly what they would after a prefill.
    """
    text_cfg = model.config.text_config
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    kv_heads = text_cfg.num_key_value_heads
    ca_heads = text_cfg.num_attention_heads if model.config.ca_kv_layout == "full" else kv_heads
    device, dtype = model.device, model.dtype
    cache = VisorCache(kinds=list(kinds))

    gen = torch.Generator(device="cpu").manual_seed(0)
    block = torch.randn(2, 1, max(kv_heads, ca_heads), 1024, head_dim, generator=gen).to(device=device, dtype=dtype)

    def noise(heads: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # a random block tiled along the sequence: a plain copy, where randn over gigabytes takes seconds
        reps = -(-length // block.shape[3])
        tiled = block[:, :, :heads].repeat(1, batch, 1, reps, 1)[:, :, :, :length]
        return tiled[0].contiguous(), tiled[1].contiguous()

    for index, kind in enumerate(kinds):
        slot = cache.self_kv[index]
        slot.set(*noise(kv_heads, n_visual + n_text if kind is LayerKind.SELF_ATTENTION else n_text))
        if kind is LayerKind.CROSS_ATTENTION:
            cache.cross_kv[index].set(*noise(ca_heads, n_visual))
    ones = lambda n: torch.ones(batch, n, dtype=torch.bool, device=device)  # noqa: E731
    cache.full_valid, cache.text_valid, cache.visual_valid = ones(n_visual + n_text), ones(n_text), ones(n_visual)
    cache.next_position = torch.full((batch,), n_visual + n_text, dtype=torch.long, device=device)
    return cache


__all__ = [
    "BenchConfig", "BenchModels", "GEOMETRIES", "IMAGE_ROWS", "ImageRow", "MATCHED_KEEP_2SA", "REDUCER_ROWS", "ReducerRow",
    "build_models", "config_path", "image_tokens_and_crops", "llm_configs", "prompt_ids", "reducers_available",
    "synthetic_cache", "visual_features",
]
