"""Per-layer share of attention from question and answer tokens to image tokens (the paper's "sawtooth").

For every item the prompt *and its reference answer* are run through the model (teacher forcing) one
layer at a time (``visor.analysis.common.walk_layers``). Before layer ``l`` runs, its own attention is
recomputed for the query tokens of interest only: ``input_layernorm`` on the layer's input states, the
layer's ``q_proj``/``k_proj``, RoPE at the original positions, causal mask, softmax in fp32, mean over
heads. The share of a query token is the attention mass it puts on image tokens. Nothing else about the
model changes: the forward itself keeps its SDPA kernels.

* question tokens: the user's text after the (last) image, up to the end of the user turn;
* answer tokens: the reference answer's tokens (the assistant turn, its end-of-turn token excluded).

In an SA layer this is the attention the layer really pays. A VISOR CA or text-only layer never lets text
attend to the image through its self-attention; there the number is the share the layer's own q/k *would*
give the current visual states (the FastV-style probe), and ``kind`` in the CSV says which layers are which.
``uniform_share`` is what attention spread evenly over the visible keys would give (the image's fraction
of them), for scale.

Output: ``attention.csv`` (layer, kind, family, difficulty, query, share, uniform_share, n) and
``attention.png`` (share per layer, easy vs hard, question vs answer).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visor.analysis.common import autocast, save_csv, walk_layers
from visor.model.layers import apply_rope, repeat_kv


@torch.no_grad()
def image_attention_share(layer, rotary_emb, streams, queries: torch.Tensor, is_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one sample (batch 1): ``(share, uniform)`` per query position in ``queries`` ([Q] input indices).

    ``is_image``: [N] bool over the input sequence. Computed from ``layer``'s input states as described in
    the module docstring."""
    x = streams.merged()  # [1, N, D], input order
    h = layer.input_layernorm(x)
    attn = layer.self_attn
    _, n, _ = h.shape
    q = attn.q_proj(h[:, queries]).view(1, queries.numel(), attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(1, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = rotary_emb(streams.seq_pos, h.dtype)
    q = apply_rope(q, cos[:, queries], sin[:, queries])
    k = repeat_kv(apply_rope(k, cos, sin), attn.num_heads // attn.num_kv_heads)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)  # [1, H, Q, N]
    keys = torch.arange(n, device=h.device)
    allowed = (keys[None, :] <= queries[:, None]) & streams.seq_valid[0][None, :]  # [Q, N]
    logits = logits.masked_fill(~allowed[None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).mean(dim=1)[0]  # [Q, N]
    share = (probs * is_image[None, :].float()).sum(-1)
    uniform = (allowed & is_image[None, :]).sum(-1).float() / allowed.sum(-1).clamp(min=1).float()
    return share, uniform


def query_positions(input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int, end_token_id: int | None):
    """(question positions, answer positions) of one sample ([N] ids and labels, no padding)."""
    positions = torch.arange(input_ids.numel())
    image = (input_ids == image_token_id).nonzero()[:, 0]
    answer = (labels != -100)
    if end_token_id is not None:
        answer &= input_ids != end_token_id
    answer_pos = positions[answer]
    if image.numel() == 0 or answer_pos.numel() == 0:
        return positions[:0], answer_pos
    start = int(image.max()) + 1
    stop = int(answer_pos.min())
    question = positions[start:stop]
    if end_token_id is not None:  # the user turn ends at its first end-of-turn token
        ends = (input_ids[start:stop] == end_token_id).nonzero()[:, 0]
        if ends.numel():
            question = positions[start:start + int(ends[0])]
    return question, answer_pos


def run_attention(model, tokenizer, image_processor, items, out_dir: str | Path, *, active_sa=None,
                  precision: str = "fp32", progress: bool = True) -> dict:
    """Write ``attention.csv`` / ``attention.png`` (module docstring); returns the per-difficulty curves."""
    from visor.data.batch import Batcher, Sample

    out = Path(out_dir)
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end = end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id
    image_id = model.config.image_token_id
    decoder = model.language_model
    kinds = model.plan.layer_kinds(active_sa)
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # (layer, family, difficulty, query) -> share, uniform, n
    skipped = 0
    for item in tqdm(items, desc="attention", disable=not progress, leave=False):
        if not item.images:
            skipped += 1
            continue
        sample = Sample(item.images, list(item.turns) + [{"from": "gpt", "value": item.answers[0]}])
        batch = batcher.train_batch([sample])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        question, answer = query_positions(ids, labels, image_id, end)
        if question.numel() == 0 and answer.numel() == 0:
            skipped += 1
            continue
        is_image = ids == image_id

        def before(index, kind, streams, question=question, answer=answer, is_image=is_image, item=item):
            for name, queries in (("question", question), ("answer", answer)):
                if queries.numel() == 0:
                    continue
                share, uniform = image_attention_share(decoder.layers[index], decoder.rotary_emb, streams, queries, is_image)
                cell = sums[(index, item.family, item.difficulty, name)]
                cell[0] += float(share.mean())
                cell[1] += float(uniform.mean())
                cell[2] += 1

        with autocast(precision):
            walk_layers(model, batch, active_sa, before=before)
    rows = [{"layer": layer, "kind": kinds[layer].value, "family": family, "difficulty": diff, "query": query,
             "share": s / n, "uniform_share": u / n, "n": n}
            for (layer, family, diff, query), (s, u, n) in sorted(sums.items())]
    save_csv(rows, out / "attention.csv")
    curves = _curves(rows)
    plot_attention(curves, kinds, out / "attention.png", model.plan.describe(active_sa))
    return {"curves": curves, "skipped": skipped, "rows": len(rows)}


def _curves(rows: list[dict]) -> dict:
    """(difficulty, query) -> per-layer mean over families (macro, as the accuracy means)."""
    acc: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[(r["difficulty"], r["query"])][r["layer"]].append(r["share"])
    return {f"{d}/{q}": {layer: sum(v) / len(v) for layer, v in sorted(layers.items())} for (d, q), layers in sorted(acc.items())}


def plot_attention(curves: dict, kinds, path: Path, plan: str) -> None:
    from visor.analysis.common import plt as get_plt

    plt = get_plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = {"easy": "tab:green", "hard": "tab:purple"}
    for name, values in curves.items():
        diff, query = name.split("/")
        ax.plot(list(values), [100 * v for v in values.values()], marker="o", markersize=3,
                color=styles.get(diff, "gray"), linestyle="-" if query == "question" else "--", label=f"{diff}, {query} tokens")
    for layer, kind in enumerate(kinds):
        if kind.value != "sa":
            ax.axvspan(layer - 0.5, layer + 0.5, color="lightgray" if kind.value == "text" else "mistyrose", alpha=0.5, lw=0)
    ax.set_xlabel(f"decoder layer (plan {plan}; shaded: not self-attention, probe only)")
    ax.set_ylabel("attention to image tokens (%)")
    ax.set_title("Share of text-to-image attention per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
