"""The performance paths of ``visor.model.layers`` against plain reference implementations.

Each fast path (channels-last depthwise conv, GQA without K/V copies, the pre-allocated KV cache, the
mask-free decode step) must compute what the straightforward version computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visor.model.layers import AttentionMask, KVSlot, PerImageConv, attend, causal_mask, repeat_kv


def reference_conv(conv: PerImageConv, visual: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """The definition: out[i] = b + sum_tap w[tap] * x[i + tap - half], over neighbours of the same image."""
    half = conv.kernel_size // 2
    batch, n, _ = visual.shape
    out = torch.zeros_like(visual)
    for b in range(batch):
        for i in range(n):
            if image_ids[b, i] < 0:
                continue
            acc = conv.bias.clone()
            for tap in range(conv.kernel_size):
                j = i + tap - half
                if 0 <= j < n and image_ids[b, j] == image_ids[b, i]:
                    acc = acc + conv.weight[:, tap] * visual[b, j]
            out[b, i] = acc
    return out


@pytest.mark.parametrize("layout", ["one image", "one image padded", "three images padded"])
def test_per_image_conv_matches_definition(layout):
    torch.manual_seed(0)
    conv = PerImageConv(6, kernel_size=7)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    if layout == "one image":
        ids = torch.zeros(2, 11, dtype=torch.long)
    elif layout == "one image padded":
        ids = torch.tensor([[0] * 11, [0] * 6 + [-1] * 5])
    else:
        ids = torch.tensor([[0] * 4 + [1] * 2 + [2] * 5, [0] * 2 + [1] * 5 + [-1] * 4])
    visual = torch.randn(2, 11, 6)
    with torch.no_grad():
        assert torch.allclose(conv(visual, ids), reference_conv(conv, visual, ids), atol=1e-5)
    bf16 = conv.to(torch.bfloat16)
    with torch.no_grad():
        got = bf16(visual.bfloat16(), ids).float()
    assert torch.allclose(got, reference_conv(conv.float(), visual.bfloat16().float(), ids), atol=0.05, rtol=0.02)


def reference_attend(q, k, v, mask: AttentionMask) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        if mask.is_causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool_mask)
    if mask.rows_with_keys is not None:
        out = out * mask.rows_with_keys[:, None, :, None].to(out.dtype)
    return out


@pytest.mark.parametrize("fold_max_rows", [4096, 0])  # 0: never fold, SDPA's enable_gqa with a mask instead
@pytest.mark.parametrize("case", ["causal prefill", "padded prefill", "decode", "cross attention", "no gqa"])
def test_attend_gqa_paths_match_expanded_reference(case, fold_max_rows, monkeypatch):
    monkeypatch.setattr("visor.model.layers._FOLD_MAX_ROWS", fold_max_rows)
    torch.manual_seed(1)
    batch, heads, kv_heads, dim = 2, 6, 2, 8
    tq, tk = {"causal prefill": (9, 9), "padded prefill": (9, 9), "decode": (1, 13), "cross attention": (5, 17),
              "no gqa": (4, 4)}[case]
    if case == "no gqa":
        kv_heads = heads
    q = torch.randn(batch, heads, tq, dim)
    k, v = torch.randn(batch, kv_heads, tk, dim), torch.randn(batch, kv_heads, tk, dim)
    if case == "causal prefill":
        mask = causal_mask(torch.ones(batch, tk, dtype=torch.bool), tq)
        assert mask.is_causal
    elif case == "padded prefill":
        valid = torch.ones(batch, tk, dtype=torch.bool)
        valid[1, :3] = False
        mask = causal_mask(valid, tq)
    elif case == "decode":
        valid = torch.ones(batch, tk, dtype=torch.bool)
        valid[0, :4] = False
        mask = causal_mask(valid, tq)
    elif case == "cross attention":
        allowed = torch.rand(batch, 1, tq, tk) > 0.3
        rows = allowed.any(-1)[:, 0]
        rows[0, 0] = False
        allowed[0, :, 0] = True
        mask = AttentionMask(bool_mask=allowed, rows_with_keys=rows)
    else:
        mask = causal_mask(torch.ones(batch, tk, dtype=torch.bool), tq)
    assert torch.allclose(attend(q, k, v, mask), reference_attend(q, k, v, mask), atol=1e-5)


def test_single_query_over_valid_keys_needs_no_mask():
    mask = causal_mask(torch.ones(3, 10, dtype=torch.bool), 1)
    assert mask.bool_mask is None and not mask.is_causal
    assert causal_mask(torch.ones(3, 10, dtype=torch.bool), 10).is_causal
    assert causal_mask(torch.ones(3, 10, dtype=torch.bool), 2).bool_mask is not None


def test_kv_slot_grows_like_concatenation():
    torch.manual_seed(2)
    slot, keys, values = KVSlot(), [], []
    for step, n in enumerate([70, 1, 1, 3] + [1] * 80):
        k, v = torch.randn(2, 2, n, 4), torch.randn(2, 2, n, 4)
        keys.append(k)
        values.append(v)
        got_k, got_v = slot.append(k, v)
        assert torch.equal(got_k, torch.cat(keys, 2)) and torch.equal(got_v, torch.cat(values, 2))
    assert slot.num_bytes == 2 * torch.cat(keys, 2).numel() * 4  # the filled part, not the spare room
    slot.set(got_k[:1], got_v[:1])  # e.g. VisorCache.select: the buffer is dropped, appends still work
    k1 = torch.randn(1, 2, 1, 4)
    assert torch.equal(slot.append(k1, k1)[0], torch.cat([got_k[:1], k1], 2))


def test_per_image_conv_takes_slots_read_once():
    """``ImageSlots`` (what the decoder reads once per forward for every CA layer) gives the same conv as the ids."""
    from visor.model.layers import ImageSlots

    torch.manual_seed(0)
    conv = PerImageConv(6, kernel_size=7)
    torch.nn.init.normal_(conv.weight)
    ids = torch.tensor([[0] * 4 + [1] * 2 + [2] * 5, [0] * 2 + [1] * 5 + [-1] * 4])
    slots = ImageSlots.of(ids)
    assert (slots.all_valid, slots.num_images) == (False, 3)
    one = ImageSlots.of(torch.zeros(2, 5, dtype=torch.long))
    assert (one.all_valid, one.num_images) == (True, 1)
    visual = torch.randn(2, 11, 6)
    with torch.no_grad():
        for residual in (False, True):
            assert torch.equal(conv(visual, slots, residual=residual), conv(visual, ids, residual=residual))
        assert torch.allclose(conv(visual, slots, residual=True), visual * (ids >= 0)[..., None] + conv(visual, ids), atol=1e-6)
