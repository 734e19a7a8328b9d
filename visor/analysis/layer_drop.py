"""Layer dropping: accuracy when the image is removed from groups of layers.

"Removed from layer l" means layer l runs as a text-only layer: the text stream goes through the original
layer alone and never sees a visual token there, and the visual states are not refined there (they keep
the value of the last layer that did run with them). For the original LLaVA-OV model (every layer a
self-attention slot) that is switching the group's slots off; for a VISOR model the group's active SA
slots are switched off and its cross-attention layers run without their cross-attention block.

The layers are split into contiguous groups of ``group_size`` (default ``ceil(L / 4)``); every group is
dropped in turn and the whole test set is evaluated (greedy, graded, ``visor.eval.harness``) next to the
reference run with nothing dropped. Output: ``layer_drop.csv`` (group, layers, family, difficulty,
accuracy, reference, drop in points) and ``layer_drop.png`` (easy and hard means per dropped group).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from visor.analysis.common import autocast, save_csv


def layer_groups(num_layers: int, group_size: int | None = None) -> list[tuple[int, ...]]:
    size = group_size or math.ceil(num_layers / 4)
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    return [tuple(range(start, min(start + size, num_layers))) for start in range(0, num_layers, size)]


@contextmanager
def image_removed(model, layers, active_sa=None):
    """Inside the block the model runs ``layers`` text-only; yields the active configuration to pass."""
    plan = model.plan
    dropped = set(int(l) for l in layers)
    slots = tuple(s for s in plan.resolve_active(active_sa) if plan.self_attention_layers[s] not in dropped)
    saved = list(model.config.cross_attention_layers)
    model.config.cross_attention_layers = [l for l in saved if l not in dropped]
    try:
        yield slots
    finally:
        model.config.cross_attention_layers = saved


def run_layer_drop(model, tokenizer, image_processor, items, out_dir: str | Path, *, active_sa=None,
                   group_size: int | None = None, batch_size: int = 16, max_new_tokens: int = 16,
                   precision: str = "fp32", progress: bool = True) -> dict:
    """Write ``layer_drop.csv`` / ``layer_drop.png`` (module docstring); returns the summaries per group."""
    from visor.eval.harness import evaluate

    out = Path(out_dir)
    groups = layer_groups(model.plan.num_layers, group_size)

    def run(layers) -> dict:
        with image_removed(model, layers, active_sa) as slots, autocast(precision):
            return evaluate(model, tokenizer, image_processor, items, active_sa=slots, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, progress=progress).summary

    reference = run(())
    summaries = {"none": reference}
    rows = []
    for layers in groups:
        name = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        summary = summaries[name] = run(layers)
        for family, score in summary["per_family"].items():
            ref = reference["per_family"].get(family)
            rows.append({"group": name, "layers": "+".join(map(str, layers)), "family": family,
                         "difficulty": _difficulty(items, family), "accuracy": score, "reference": ref,
                         "drop_points": None if ref is None else 100 * (ref - score)})
        for key in ("easy_mean", "hard_mean"):
            if summary.get(key) is not None:
                rows.append({"group": name, "layers": "+".join(map(str, layers)), "family": key,
                             "difficulty": key.split("_")[0], "accuracy": summary[key], "reference": reference.get(key),
                             "drop_points": 100 * ((reference.get(key) or 0) - summary[key])})
    save_csv(rows, out / "layer_drop.csv")
    plot_layer_drop(summaries, out / "layer_drop.png")
    return {"groups": [list(g) for g in groups],
            "summaries": {k: {m: v.get(m) for m in ("easy_mean", "hard_mean", "per_family")} for k, v in summaries.items()}}


def _difficulty(items, family: str) -> str:
    return next((it.difficulty for it in items if it.family == family), "")


def plot_layer_drop(summaries: dict, path: Path) -> None:
    from visor.analysis.common import plt as get_plt

    plt = get_plt()
    names = list(summaries)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 3.8))
    width = 0.38
    for offset, key, color in ((-width / 2, "easy_mean", "tab:green"), (width / 2, "hard_mean", "tab:purple")):
        values = [100 * (summaries[n].get(key) or 0) for n in names]
        ax.bar([i + offset for i in range(len(names))], values, width, color=color, label=key.replace("_", " "))
    ax.set_xticks(range(len(names)), ["nothing"] + [f"layers {n}" for n in names[1:]], fontsize=8)
    ax.set_xlabel("image removed from")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Layer dropping: accuracy without the image in a group of layers")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
