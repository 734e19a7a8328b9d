"""The analytic cost model (``visor.cost``) against FLOPs counted on real forward passes.

``FlopCounterMode`` counts what the model actually runs; ``count_prefill`` / ``count_decode_step`` count
what the cost model says it should run. Matmul FLOPs (``mm``/``addmm``/``bmm``) must agree within 1% for
every layer kind, prefill and decode, on a tiny and a medium random model. Attention is checked on its own
(on CPU the SDPA kernel counts zero in torch 2.13): with torch's SDPA formula registered for the CPU
kernel, and independently by forcing the eager (math) SDPA path, where attention becomes plain ``bmm``.

The CA blocks' depthwise conv runs as a real ``conv2d`` and is compared on its own line (``ca_conv``,
``2 * kernel`` FLOPs per output element); the matmul comparison leaves it out.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny import IMAGE_TOKEN_ID, tiny_llava_config
from visor.convert.llava_onevision import convert_llava_onevision
from visor.cost import Geometry, count_decode_step, count_prefill
from visor.cost.counter import count_flops
from visor.cost.flops import projector_flops, vision_encoder_flops
from visor.model.plan import LayerKind, LayerPlan

TEXT_BEFORE = 5  # text tokens before the image (a system prompt): CA blocks must not let them see it
SIZES = {
    "tiny": dict(num_layers=9, heads=4, kv_heads=2, hidden=32),
    "medium": dict(num_layers=12, heads=8, kv_heads=2, hidden=256),
}
_MODELS: dict[tuple[str, bool], object] = {}


def build(size: str, baseline: bool):
    """A random VISOR model of ``size``: default plan, or every layer SA (the original LLaVA-OV)."""
    key = (size, baseline)
    if key not in _MODELS:
        torch.manual_seed(0)
        config = tiny_llava_config(**SIZES[size])
        plan = LayerPlan.all_self_attention(config.text_config.num_hidden_layers) if baseline else None
        _MODELS[key] = convert_llava_onevision(config, plan=plan)
    return _MODELS[key]


def prompt(n_visual: int, n_text: int, batch: int = 1, image_token_id: int = IMAGE_TOKEN_ID) -> torch.Tensor:
    """Token ids: TEXT_BEFORE text tokens, the image's placeholders, then the rest of the text."""
    ids = torch.randint(10, 60, (batch, n_text + n_visual))
    ids[:, TEXT_BEFORE:TEXT_BEFORE + n_visual] = image_token_id
    return ids


def features(model, n_visual: int, batch: int) -> list[torch.Tensor]:
    return [torch.randn(n_visual, model.config.text_config.hidden_size) for _ in range(batch)]


def expected_attention(geometry: Geometry, kinds, n_visual: int, n_text: int, decode: bool = False) -> int:
    """``QK^T`` + ``AV`` per query head (no causal halving), written out independently of visor.cost."""
    t = geometry.text
    per_pair = 4 * t.heads * t.head_dim
    total = 0
    for kind in kinds:
        if decode:  # one query; keys: cache + itself
            total += per_pair * ((n_visual if kind is LayerKind.SELF_ATTENTION else 0) + n_text + 1)
            total += per_pair * n_visual if kind is LayerKind.CROSS_ATTENTION else 0
        elif kind is LayerKind.SELF_ATTENTION:
            total += per_pair * (n_text + n_visual) ** 2
        else:
            total += per_pair * n_text**2 + (per_pair * n_text * n_visual if kind is LayerKind.CROSS_ATTENTION else 0)
    return total


CONFIGS = {  # name -> (baseline model?, active SA slots)
    "baseline": (True, None),
    "ca_only": (False, []),
    "some_sa": (False, [0, 2]),
    "all_slots": (False, None),
}


def within(measured: int, expected: int, tol: float = 0.01) -> bool:
    return abs(measured - expected) <= tol * expected


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_matmul_flops_match_analytic(size, name):
    baseline, active = CONFIGS[name]
    model = build(size, baseline)
    geometry = Geometry.from_config(model.config)
    plan = model.plan
    batch, n_visual, n_text = 2, 48 if size == "tiny" else 300, 24
    ids = prompt(n_visual, n_text, batch)
    feats = features(model, n_visual, batch)

    # prefill, as generation runs it: LM head on the last position only
    with torch.no_grad():
        out, counted = count_flops(model, ids, image_features=feats, active_sa=active, use_cache=True, logits_to_keep=1)
    analytic = count_prefill(geometry, plan, active, n_visual, n_text)
    attention = expected_attention(geometry, analytic.kinds, n_visual, n_text)
    assert counted.attention == batch * attention  # torch's SDPA formula, registered for the CPU kernel
    assert within(counted.matmul, batch * (analytic.llm_total - attention - analytic.ca_conv)), (counted, analytic)
    assert counted.module(".lm_head") == batch * analytic.lm_head == batch * 2 * geometry.text.hidden * geometry.text.vocab
    assert counted.conv == batch * analytic.ca_conv and counted.other == 0

    # one decode step on the cache it left
    new = torch.randint(10, 60, (batch, 1))
    mask = torch.ones(batch, ids.shape[1] + 1, dtype=torch.long)
    with torch.no_grad():
        _, step = count_flops(model, new, attention_mask=mask, past_key_values=out.past_key_values, logits_to_keep=1)
    analytic_step = count_decode_step(geometry, plan, active, n_visual, n_text, step=1)
    step_attention = expected_attention(geometry, analytic_step.kinds, n_visual, n_text, decode=True)
    assert step.attention == batch * step_attention
    assert within(step.matmul, batch * (analytic_step.llm_total - step_attention)), (step, analytic_step)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_attention_path_matches_analytic_total(name):
    """Forcing the math SDPA backend turns attention into bmm: matmuls alone then equal the whole model."""
    baseline, active = CONFIGS[name]
    model = build("medium", baseline)
    geometry = Geometry.from_config(model.config)
    n_visual, n_text = 200, 20
    ids = prompt(n_visual, n_text)
    with torch.no_grad():
        _, counted = count_flops(model, ids, image_features=features(model, n_visual, 1), active_sa=active,
                                 logits_to_keep=1, sdpa_backend="math")
    analytic = count_prefill(geometry, model.plan, active, n_visual, n_text)
    assert counted.attention == 0 and counted.conv == analytic.ca_conv  # nothing left in a fused kernel
    assert within(counted.matmul, analytic.llm_total - analytic.ca_conv), (counted, analytic)


def test_attention_flops_are_counted_and_grow_with_tokens():
    model = build("tiny", baseline=True)
    visor = build("tiny", baseline=False)
    n_text = 16
    for m, active in ((model, None), (visor, []), (visor, [1])):
        seen = []
        for n_visual in (16, 32, 64):
            ids = prompt(n_visual, n_text)
            with torch.no_grad():
                _, counted = count_flops(m, ids, image_features=features(m, n_visual, 1), active_sa=active, logits_to_keep=1)
            seen.append(counted.attention)
        assert 0 < seen[0] < seen[1] < seen[2], seen
    # the torch 2.13 trap this module works around: without our formula CPU SDPA counts as nothing
    ids = prompt(32, n_text)
    with torch.no_grad():
        _, default = count_flops(model, ids, image_features=features(model, 32, 1), logits_to_keep=1, register_cpu_sdpa=False)
        _, ours = count_flops(model, ids, image_features=features(model, 32, 1), logits_to_keep=1)
    assert default.attention in (0, ours.attention)
    assert default.matmul == ours.matmul


def test_generation_computes_the_lm_head_on_the_last_position_only():
    model = build("tiny", baseline=False)
    geometry = Geometry.from_config(model.config)
    head = 2 * geometry.text.hidden * geometry.text.vocab
    batch, n_visual, n_text = 2, 32, 20
    ids = prompt(n_visual, n_text, batch)
    feats = features(model, n_visual, batch)
    for new_tokens in (1, 3):  # one prefill row per sample, then one row per decode step
        _, counted = count_flops(model.generate, ids, image_features=feats, max_new_tokens=new_tokens, eos_token_id=[])
        assert counted.module(".lm_head") == batch * new_tokens * head
    with torch.no_grad():  # without logits_to_keep every text position gets logits: the check above has teeth
        _, full = count_flops(model, ids, image_features=feats)
    assert full.module(".lm_head") == batch * n_text * head


def test_vision_tower_and_projector_match_analytic():
    model = build("tiny", baseline=False)
    geometry = Geometry.from_config(model.config)
    v = model.config.vision_config
    n_crops = 5
    crops = torch.randn(n_crops, 3, v.image_size, v.image_size)
    with torch.no_grad():
        _, tower = count_flops(model.vision_features, crops)
        hidden = model.vision_features(crops)
        _, proj = count_flops(model.multi_modal_projector, hidden)
    assert tower.attention > 0 or tower.matmul > 0
    assert within(tower.matmul + tower.attention + tower.conv, vision_encoder_flops(geometry.vision, n_crops))
    assert within(proj.matmul, projector_flops(geometry.vision, n_crops))


@pytest.mark.slow
def test_real_05b_geometry_matmul_flops():
    """The shipped LLaVA-OV-0.5B geometry (random weights), a short prompt: exact GQA / MLP / vocab shapes."""
    from importlib.resources import files

    path = files("visor.configs") / "llava-onevision-qwen2-0.5b-ov-hf" / "config.json"
    model = convert_llava_onevision(str(path))
    geometry = Geometry.from_config(model.config)
    n_visual, n_text = 120, 16
    ids = prompt(n_visual, n_text, image_token_id=model.config.image_token_id)
    for active in ([], [0, 1]):
        with torch.no_grad():
            _, counted = count_flops(model, ids, image_features=features(model, n_visual, 1), active_sa=active, logits_to_keep=1)
        analytic = count_prefill(geometry, model.plan, active, n_visual, n_text)
        attention = expected_attention(geometry, analytic.kinds, n_visual, n_text)
        assert counted.attention == attention
        assert within(counted.matmul, analytic.llm_total - attention - analytic.ca_conv)
