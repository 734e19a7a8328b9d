"""CKA similarity of the visual states between layers, per task family.

The visual states are read from the model's own prefill (``walk_layers``): the projector's output entering
the LLM (``input``) and the visual stream after every layer that ran as self-attention (the only layers
that change it: every layer of the original LLaVA-OV model; the active SA slots of a VISOR model). For each
item, linear CKA (Kornblith et al., 2019) is computed between every pair of these states over the item's
visual tokens (rows = tokens, columns = hidden features), and averaged over the items of a family.

    CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F),   X_c = X - column means

Identical states give 1; it is invariant to rotations and isotropic scaling; independent random states
give a value near 0 (a small positive bias of order features / tokens).

Output: ``cka.csv`` (family, difficulty, state_a, state_b, cka, n) and ``cka.png`` (the layer x layer
matrix averaged over easy families and over hard families, and per family the similarity of each state
to the LLM's input).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visor.analysis.common import autocast, save_csv, walk_layers


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two [n, d] representations of the same n examples (module docstring)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples in both: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if float(norm) == 0.0:
        return float("nan")
    return float(cross / norm)


def cka_matrix(states: list[torch.Tensor]) -> torch.Tensor:
    """[S, S] linear CKA between every pair of [n, d] states (symmetric, 1 on the diagonal)."""
    s = len(states)
    out = torch.ones(s, s, dtype=torch.float64)
    for i in range(s):
        for j in range(i + 1, s):
            out[i, j] = out[j, i] = linear_cka(states[i], states[j])
    return out


@torch.no_grad()
def visual_states(model, batch: dict, active_sa=None) -> tuple[list[str], list[torch.Tensor]]:
    """Names and [Nv, D] visual states of one prompt: the input, then after each layer that ran as SA."""
    from visor.model.plan import LayerKind

    names, states = [], []

    def grab(name, streams):
        valid = streams.visual_valid[0]
        names.append(name)
        states.append(streams.visual[0][valid].float().clone())

    def before(index, kind, streams):
        if index == 0:
            grab("input", streams)

    def after(index, kind, streams):
        if kind is LayerKind.SELF_ATTENTION:
            grab(f"L{index}", streams)

    walk_layers(model, batch, active_sa, before=before, after=after)
    return names, states


def run_cka(model, tokenizer, image_processor, items, out_dir: str | Path, *, active_sa=None, precision: str = "fp32",
            progress: bool = True) -> dict:
    """Write ``cka.csv`` / ``cka.png`` (module docstring); returns mean matrices per family."""
    from visor.data.batch import Batcher, Sample

    out = Path(out_dir)
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    difficulty: dict[str, str] = {}
    names: list[str] | None = None
    for item in tqdm(items, desc="cka", disable=not progress, leave=False):
        if not item.images:
            continue
        batch = batcher.prompt_batch([Sample(item.images, item.turns)])
        with autocast(precision):
            item_names, states = visual_states(model, batch, active_sa)
        if len(states) < 2:
            continue
        names = names or item_names
        matrix = cka_matrix(states)
        sums[item.family] = sums.get(item.family, torch.zeros_like(matrix)) + matrix
        counts[item.family] += 1
        difficulty[item.family] = item.difficulty
    means = {family: sums[family] / counts[family] for family in sums}
    rows = []
    for family, matrix in sorted(means.items()):
        for i, a in enumerate(names or []):
            for j, b in enumerate(names or []):
                rows.append({"family": family, "difficulty": difficulty[family], "state_a": a, "state_b": b,
                             "cka": float(matrix[i, j]), "n": counts[family]})
    save_csv(rows, out / "cka.csv")
    if means:
        plot_cka(means, difficulty, names, out / "cka.png")
    return {"names": names, "families": {f: m.tolist() for f, m in means.items()}, "difficulty": difficulty}


def _group_mean(means: dict, difficulty: dict, which: str) -> torch.Tensor | None:
    chosen = [m for f, m in means.items() if difficulty[f] == which]
    return sum(chosen) / len(chosen) if chosen else None


def plot_cka(means: dict, difficulty: dict, names: list[str], path: Path) -> None:
    from visor.analysis.common import plt as get_plt

    plt = get_plt()
    groups = [(d, _group_mean(means, difficulty, d)) for d in ("easy", "hard")]
    groups = [(d, m) for d, m in groups if m is not None] or [("all", sum(means.values()) / len(means))]
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(4.2 * (len(groups) + 1), 3.8))
    for ax, (name, matrix) in zip(axes, groups):
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_title(f"{name} families: CKA of visual states")
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax = axes[-1]
    for family, matrix in sorted(means.items()):
        style = "-" if difficulty[family] == "easy" else "--"
        ax.plot(range(len(names)), matrix[0].numpy(), style, marker="o", markersize=3, label=f"{family} ({difficulty[family]})")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("CKA with the LLM's input visual states")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("per family (solid easy, dashed hard)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
