"""The analytic cost model (visor.cost) and the ``visor cost`` verb.

Figures for Qwen2-0.5B come from an independent count (issue 3); toy-geometry figures are written out
by hand below, not computed with the module's own helpers.
"""

from __future__ import annotations

import argparse
import json

import pytest

from visor.cli import main as cli_main
from visor.compression.spec import kept_tokens, parse_amount, parse_reduce_spec
from visor.cost.flops import (
    RouterGeometry,
    count_baseline_prefill,
    count_decode_step,
    count_prefill,
    kv_cache_bytes,
    visual_tokens_schedule,
)
from visor.cost.geometry import PRESETS, Geometry, TextGeometry, VisionGeometry, get_geometry
from visor.model.plan import LayerKind, LayerPlan

OV05 = get_geometry("llava-ov-0.5b")
PLAN24 = LayerPlan.default(24)


def reduction(n_visual: int, sa_count: int, n_text: int = 64, **kwargs) -> float:
    base = count_baseline_prefill(OV05, n_visual, n_text, causal_halving=kwargs.get("causal_halving", False))
    visor = count_prefill(OV05, PLAN24, PLAN24.first_slots(sa_count), n_visual, n_text, **kwargs)
    return base.llm_total / visor.llm_total


# ------------------------------------------------------------------------------ the reference figures
def test_baseline_qwen2_05b_is_9_9_tflops():
    base = count_baseline_prefill(OV05, 7290, 64)
    assert base.llm_total == pytest.approx(9.9e12, rel=0.03)
    assert base.kinds == (LayerKind.SELF_ATTENTION,) * 24


@pytest.mark.parametrize(("sa_count", "expected"), [(0, 112), (1, 19.8), (2, 10.9), (4, 5.7), (8, 2.9)])
def test_reductions_match_independent_figures(sa_count, expected):
    # ours: 111.5x, 19.8x, 10.9x, 5.72x, 2.94x (attention N x N, matmuls only, LM head on the last row)
    assert reduction(7290, sa_count) == pytest.approx(expected, rel=0.03)


def test_reductions_at_729_visual_tokens():
    assert reduction(729, 0) == pytest.approx(12, rel=0.03)  # ours 11.9x
    assert reduction(729, 2) == pytest.approx(6, rel=0.05)  # ours 6.21x ("~6" is rounded)


def test_full_width_ca_kv():
    # Exact count with K/V of width heads*head_dim (896) on the 7,290 visual tokens: 39.7x. The
    # reference quotes "~38x"; the 4.6% gap is not explained by any counting choice we make (causal
    # halving moves it to ~30x, 7,371 tokens to 40.0x), so we pin our exact figure and keep the
    # reference to 5%.
    full = reduction(7290, 0, ca_kv_layout="full")
    assert full == pytest.approx(39.75, rel=1e-3)
    assert full == pytest.approx(38, rel=0.05)
    assert full < reduction(7290, 0)


def test_reduction_grows_with_visual_tokens():
    counts = [729, 1485, 2929, 7371, 8765]
    for sa_count in (0, 2, 8):
        values = [reduction(n, sa_count) for n in counts]
        assert values == sorted(values) and len(set(values)) == len(values)


def test_causal_halving_lowers_attention_only():
    full = count_baseline_prefill(OV05, 7290, 64)
    half = count_baseline_prefill(OV05, 7290, 64, causal_halving=True)
    n = 7290 + 64
    # attention pairs per layer: n^2 -> n(n+1)/2; 4 FLOPs per pair per query-head channel
    saved = 24 * 4 * (n * n - n * (n + 1) // 2) * 14 * 64
    assert full.llm_total - half.llm_total == saved


# ------------------------------------------------------------------------------ exact toy geometry
# 3 layers, default plan: layer 0 text-only, layer 1 CA, layer 2 SA slot 0.
# hidden 8, 2 heads of 4 (q width 8), 1 KV head (kv width 4), MLP 12, vocab 10, conv kernel 7.
TOY = Geometry(
    name="toy",
    text=TextGeometry(num_layers=3, hidden=8, heads=2, kv_heads=1, mlp=12, vocab=10),
    vision=VisionGeometry(num_layers=2, hidden=8, heads=2, mlp=16, patch=4, image_size=8, channels=3),
)
TOY_PLAN = LayerPlan.default(3)
NT, NV = 3, 5
LIN = 2 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 12)  # q, k, v, o, gate+up+down per token = 960
TEXT_LAYER = NT * LIN + 4 * NT * NT * 2 * 4  # 2880 + 288 = 3168
SA_LAYER = (NT + NV) * LIN + 4 * (NT + NV) ** 2 * 2 * 4  # 7680 + 2048 = 9728
CA_QO = 2 * NT * 8 * 8 + 2 * NT * 8 * 8  # q and out projections on text = 768
CA_ATT = 4 * NT * NV * 2 * 4  # 480
CA_KV = 2 * 2 * NV * 8 * 4  # 640
CA_CONV = 2 * 7 * 8 * NV  # 560
LM_HEAD = 2 * 8 * 10  # 160


def test_toy_prefill_every_line_exact():
    cost = count_prefill(TOY, TOY_PLAN, [0], NV, NT)
    assert cost.kinds == (LayerKind.TEXT_ONLY, LayerKind.CROSS_ATTENTION, LayerKind.SELF_ATTENTION)
    assert cost.text_only_layers == TEXT_LAYER == 3168
    assert cost.ca_text_layers == TEXT_LAYER
    assert cost.ca_attention == CA_QO + CA_ATT == 1248
    assert cost.ca_kv_projection == CA_KV == 640
    assert cost.ca_conv == CA_CONV == 560
    assert cost.self_attention_layers == SA_LAYER == 9728
    assert cost.lm_head == LM_HEAD
    assert cost.router == cost.compression_overhead == 0
    assert cost.per_layer == (3168, 3168 + 1248 + 640 + 560, 9728)
    assert cost.llm_total == 18672
    assert cost.vision_encoder is None and cost.projector is None and cost.total == cost.llm_total


def test_toy_inactive_slot_is_text_only_and_full_layout():
    cost = count_prefill(TOY, TOY_PLAN, "none", NV, NT, ca_kv_layout="full")
    assert cost.self_attention_layers == 0
    assert cost.text_only_layers == 2 * TEXT_LAYER
    assert cost.ca_kv_projection == 2 * 2 * NV * 8 * 8  # full width: heads * head_dim = 8


def test_toy_causal_halving():
    cost = count_prefill(TOY, TOY_PLAN, [0], NV, NT, causal_halving=True)
    half_text = NT * LIN + 4 * (NT * (NT + 1) // 2) * 8
    half_sa = (NT + NV) * LIN + 4 * ((NT + NV) * (NT + NV + 1) // 2) * 8
    assert cost.text_only_layers == half_text
    assert cost.self_attention_layers == half_sa
    assert cost.ca_attention == CA_QO + CA_ATT  # cross-attention is never halved


def test_toy_vision_and_projector():
    cost = count_prefill(TOY, TOY_PLAN, [0], NV, NT, n_crops=3)
    tokens = (8 // 4) ** 2  # 4 patches per crop
    patch_embed = 2 * tokens * (3 * 4 * 4) * 8
    layer = 2 * tokens * 4 * 8 * 8 + 4 * tokens * tokens * 8 + 2 * tokens * 2 * 8 * 16
    assert cost.vision_encoder == 3 * (patch_embed + 2 * layer) == 36864
    assert cost.projector == 3 * 2 * tokens * (8 * 8 + 8 * 8) == 3072
    assert cost.total == cost.llm_total + 36864 + 3072


def test_toy_router():
    router = RouterGeometry(router_hidden=6, n_configs=2, num_tokens=1)  # reads after layer 1
    cost = count_prefill(TOY, TOY_PLAN, [0], NV, NT, router=router)
    lin_4 = 4 * LIN + 4 * 4 * 4 * 8  # one more text token through the layer: 4352
    extra_text = lin_4 - TEXT_LAYER  # 1184, in layer 0 and in layer 1's original layer
    extra_ca = 2 * 8 * 8 * 2 + 4 * 1 * NV * 8  # its q/out projections and its row of CA scores
    mlp = 2 * (8 * 6 + 6 * 2)
    assert cost.router == 2 * extra_text + extra_ca + mlp == 2904
    # the layer lines do not move: the routing tokens are on the router line only
    assert cost.llm_total - cost.router == 18672


def test_toy_decode_step():
    step = 2
    cost = count_decode_step(TOY, TOY_PLAN, [0], NV, NT, step=step)
    text = LIN + 4 * (NT + step) * 8
    sa = LIN + 4 * (NV + NT + step) * 8
    ca_block = 2 * 8 * 8 + 4 * NV * 8 + 2 * 8 * 8  # no K/V projection, no conv: cached at prefill
    assert cost.text_only_layers == text
    assert cost.self_attention_layers == sa
    assert cost.ca_text_layers == text
    assert cost.ca_attention == ca_block
    assert cost.ca_kv_projection == cost.ca_conv == 0
    assert cost.llm_total == text + (text + ca_block) + sa + LM_HEAD == 4096


def test_toy_kv_cache_bytes():
    kv = kv_cache_bytes(TOY, TOY_PLAN, [0], NV, NT, n_generated=1, dtype_bytes=2)
    per_position = 2 * 4 * 2  # K and V, kv width 4, bf16
    assert kv.text_only == (NT + 1) * per_position
    assert kv.ca_text == (NT + 1) * per_position
    assert kv.ca_visual == NV * per_position
    assert kv.self_attention == (NV + NT + 1) * per_position
    assert kv.total == sum(kv.per_layer) == (4 + 4 + 5 + 9) * 16
    full = kv_cache_bytes(TOY, TOY_PLAN, [0], NV, NT, ca_kv_layout="full", dtype_bytes=4)
    assert full.ca_visual == NV * 2 * 8 * 4


# ------------------------------------------------------------------------------ token compression
def test_per_layer_visual_tokens():
    # a reducer before the LLM == the same visual-token count in every layer
    same = count_prefill(OV05, PLAN24, None, 7290, 64, visual_tokens_per_layer=[3645] * 24)
    assert same.llm_total == count_prefill(OV05, PLAN24, None, 3645, 64).llm_total
    # FastV: prune to half after layer 2 of the baseline
    schedule = visual_tokens_schedule(24, 7290, [(2, 0.5)])
    assert schedule == [7290, 7290] + [3645] * 22
    plan = LayerPlan.all_self_attention(24)
    fastv = count_prefill(OV05, plan, None, 7290, 64, visual_tokens_per_layer=schedule, compression_overhead_flops=123)
    full = count_baseline_prefill(OV05, 7290, 64).per_layer[0]
    half = count_baseline_prefill(OV05, 3645, 64).per_layer[0]
    assert fastv.per_layer == (full,) * 2 + (half,) * 22
    assert fastv.compression_overhead == 123
    assert fastv.llm_total == 2 * full + 22 * half + fastv.lm_head + 123
    # PyramidDrop-style stages
    assert visual_tokens_schedule(6, 100, [(2, 0.5), (4, 0.25)]) == [100, 100, 50, 50, 25, 25]


def test_visor_tr_pooling_multiplies_the_reduction():
    # VISOR-TR: 2x pooling before the LLM (paper: 8.9x -> 17.8x). With SA layers the gain is a bit over
    # 2x (their attention is quadratic in tokens: 2.21x at 1 SA, 2.37x at 2 SA, 2.48x at 4 SA); CA only
    # gains just 1.3x, since its text layers do not shrink.
    base = count_baseline_prefill(OV05, 7290, 64).llm_total

    def gain(sa_count: int) -> float:
        active = PLAN24.first_slots(sa_count)
        plain = count_prefill(OV05, PLAN24, active, 7290, 64).llm_total
        pooled = count_prefill(OV05, PLAN24, active, kept_tokens(7290, 0.5), 64).llm_total
        return (base / pooled) / (base / plain)

    assert gain(0) == pytest.approx(1.30, abs=0.01)
    gains = [gain(k) for k in (1, 2, 4)]
    assert all(2.0 < g < 2.6 for g in gains) and gains == sorted(gains)


def test_parse_reduce_spec():
    assert parse_reduce_spec("pooling:2x") == ("pooling", 0.5)
    assert parse_reduce_spec("Pooling:0.25") == ("pooling", 0.25)
    assert parse_reduce_spec("visionzip:25%") == ("visionzip", 0.25)
    assert parse_reduce_spec("pooling:1x") == ("pooling", 1.0)
    assert parse_reduce_spec("pooling", default_keep=0.5) == ("pooling", 0.5)
    assert parse_amount("4x") == 0.25
    for bad in ("pooling", "pooling:0", "pooling:1.5", "pooling:0.5x", "pooling:abc", ":2x", "pooling:-2x"):
        with pytest.raises(ValueError):
            parse_reduce_spec(bad)
    assert kept_tokens(7290, 0.5) == 3645 and kept_tokens(3, 0.01) == 1


# ------------------------------------------------------------------------------ decode and cache
def test_kv_cache_visor_2sa_at_most_45_percent():
    base_plan = LayerPlan.all_self_attention(24)
    for generated in (0, 1, 64):
        base = kv_cache_bytes(OV05, base_plan, None, 7371, 64, n_generated=generated)
        visor = kv_cache_bytes(OV05, PLAN24, PLAN24.first_slots(2), 7371, 64, n_generated=generated)
        assert visor.total <= 0.45 * base.total
    # baseline: 24 layers x 7,435 positions x K,V x 2 heads x 64 x 2 bytes
    assert kv_cache_bytes(OV05, base_plan, None, 7371, 64).total == 24 * 7435 * 2 * 128 * 2


def test_decode_step_real_geometry():
    base_plan = LayerPlan.all_self_attention(24)
    base = count_decode_step(OV05, base_plan, None, 7371, 64, step=1)
    visor = count_decode_step(OV05, PLAN24, PLAN24.first_slots(2), 7371, 64, step=1)
    assert visor.llm_total < base.llm_total
    later = count_decode_step(OV05, base_plan, None, 7371, 64, step=11)
    assert later.llm_total - base.llm_total == 24 * 4 * 10 * 896  # 10 more keys in every layer


# ------------------------------------------------------------------------------ geometry
def test_presets():
    assert sorted(PRESETS) == ["llava-ov-0.5b", "llava-ov-1.5b"]
    t = OV05.text
    assert (t.num_layers, t.hidden, t.heads, t.kv_heads, t.head_dim, t.mlp, t.vocab) == (24, 896, 14, 2, 64, 4864, 152000)
    assert OV05.vision.tokens_per_crop == 729 and OV05.vision.num_layers == 26
    assert OV05.vision.projector_out == 896
    big = get_geometry("llava-ov-1.5b")
    plan = LayerPlan.default(28)
    assert count_prefill(big, plan, None, 7290, 64).llm_total < count_baseline_prefill(big, 7290, 64).llm_total


def test_geometry_from_transformers_config():
    transformers = pytest.importorskip("transformers")
    text = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                num_hidden_layers=24, num_key_value_heads=2, vocab_size=152000)
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                  num_hidden_layers=26, patch_size=14, image_size=384)
    config = transformers.LlavaOnevisionConfig(text_config=text, vision_config=vision, vision_feature_layer=-1)
    geometry = Geometry.from_config(config, name="from-config")
    assert geometry.text == OV05.text and geometry.vision == OV05.vision
    config.vision_feature_layer = -2  # stop one layer earlier
    assert Geometry.from_config(config).vision.num_layers == 25


def test_geometry_from_plain_config_object():
    from types import SimpleNamespace

    text = SimpleNamespace(num_hidden_layers=3, hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=12, vocab_size=10)
    geometry = Geometry.from_config(SimpleNamespace(text_config=text, ca_conv_kernel=5), name="ns")
    assert geometry.text == TOY.text and geometry.vision is None and geometry.ca_conv_kernel == 5
    assert Geometry.from_config(text).text == TOY.text  # a bare text config


# ------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    with pytest.raises(ValueError, match="llava-ov-0.5b, llava-ov-1.5b"):
        get_geometry("llava-ov-7x")
    for nv, nt in ((0, 64), (-5, 64), (7290, 0), (7290, -1)):
        with pytest.raises(ValueError, match="positive integer"):
            count_prefill(OV05, PLAN24, None, nv, nt)
    with pytest.raises(ValueError, match="28 layers"):
        count_prefill(OV05, LayerPlan.default(28), None, 7290, 64)
    with pytest.raises(ValueError, match="ca_kv_layout"):
        count_prefill(OV05, PLAN24, None, 7290, 64, ca_kv_layout="wide")
    with pytest.raises(ValueError, match="24 layers"):
        count_prefill(OV05, PLAN24, None, 7290, 64, visual_tokens_per_layer=[10] * 23)
    with pytest.raises(ValueError, match="0..n_visual"):
        count_prefill(OV05, PLAN24, None, 100, 64, visual_tokens_per_layer=[200] * 24)
    with pytest.raises(ValueError, match="slot"):
        count_prefill(OV05, PLAN24, [8], 7290, 64)
    with pytest.raises(ValueError, match="step"):
        count_decode_step(OV05, PLAN24, None, 7290, 64, step=0)
    with pytest.raises(ValueError, match="n_crops"):
        count_prefill(OV05, PLAN24, None, 7290, 64, n_crops=0)


# ------------------------------------------------------------------------------ CLI
def run_cli(monkeypatch, capsys, argv):
    # only our verb: the dispatcher's other verbs belong to other modules and may not exist yet
    monkeypatch.setattr(cli_main, "VERB_MODULES", ("cost",))
    code = cli_main.main(["cost", *argv])
    return code, capsys.readouterr()


def test_cost_is_registered():
    assert "cost" in cli_main.VERB_MODULES


def test_cli_last_line_is_json(monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, ["--geometry", "llava-ov-0.5b", "--visual-tokens", "7290",
                                              "--text-tokens", "64", "--sa-count", "2", "--crops", "10"])
    assert code == 0
    report = json.loads(out.out.strip().splitlines()[-1])
    assert {"baseline_flops", "flops", "reduction", "breakdown"} <= set(report)
    assert report["flops"] == count_prefill(OV05, PLAN24, (0, 1), 7290, 64).llm_total
    assert report["reduction"] == pytest.approx(10.9, rel=0.03)
    assert report["breakdown"]["vision_encoder"] > 0
    assert report["kv_cache_ratio"] < 0.45
    assert "LLM total" in out.out and "vision encoder (10 crops)" in out.out


def test_cli_active_sa_reduce_and_layout(monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, ["--active-sa", "none", "--reduce", "pooling:2x", "--ca-kv-layout", "full",
                                              "--causal-halving", "--dtype-bytes", "4"])
    assert code == 0
    report = json.loads(out.out.strip().splitlines()[-1])
    assert report["visual_tokens_llm"] == 3645 and report["active_sa"] == []
    expected = count_prefill(OV05, PLAN24, (), 3645, 64, ca_kv_layout="full", causal_halving=True).llm_total
    assert report["flops"] == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--geometry", "nope"], "known geometries"),
        (["--visual-tokens", "0"], "positive"),
        (["--text-tokens", "-3"], "positive"),
        (["--sa-count", "9"], "sa_count"),
        (["--reduce", "nosuch:2x"], "unknown reducer"),
        (["--reduce", "pooling:3"], "kept fraction"),
    ],
)
def test_cli_bad_input(monkeypatch, capsys, argv, message):
    code, out = run_cli(monkeypatch, capsys, argv)
    assert code == 2 and message in out.err and out.out == ""


def test_cli_every_flag_has_help():
    from visor.cli import cost

    parser = argparse.ArgumentParser()
    cost.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["cost"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 11
    assert all(a.help for a in flags)
