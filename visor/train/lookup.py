"""Supervised lookup: a loss on where the answer position attends, for the keyed procedural families (base recipes).

Why: in presence ("Is there a KIND?"), kind_color ("What colour is the KIND?"), document ("value of KEY") and chart
("value of bar LABEL") the question names a place in the image. Every baseline trained on the answer loss alone reads
the image's candidates and picks one at random (``benchmarks/keyed_selection.py``), six continuations of 9,600 to
28,800 items left it there, and a fresh attention read-out keyed by the question finds the place well above chance
(``benchmarks/keyed_attention_probe.py``; ``docs/training-log.md``). So the lookup is supervised directly, as the
shape head supervised the tower: the scene says where the answer is drawn, and a loss asks the token that predicts
the answer's first token to attend there.

For every assistant turn whose question names a place (:func:`lookup_boxes`), the *query position* is the token
before the turn's first answer token (its prediction is the answer's first token) and the *targets* are the image
tokens whose patches overlap the place (:func:`image_token_targets`, in LLaVA-OV's token order). In each supervised
layer a forward pre-hook on the layer's self-attention recomputes the attention of the query positions from the
layer's own (normed) input, q/k projections and RoPE, causal and padding masks, softmax in fp32 (as
``visor.analysis.attention`` does, here with gradients), and keeps the attention mass each supervised head puts on
the targets. The loss is ``-log(mass)``, averaged over query positions, heads and layers. Only the chosen heads of a
layer are supervised (the first ``heads``, or a list of indices), so the others keep whatever the answer loss gives
them.

The model's forward is untouched (its SDPA kernel stays): the hooks recompute what they need, inside the forward, so
DDP sees one forward. Nothing is added to the model; the checkpoint stays a plain LLaVA-OV model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

KEYED_FAMILIES = ("presence", "kind_color", "doc", "chart")
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in scene pixels, half-open


REGIONS = ("place", "answer")


def lookup_boxes(scene: dict, region: str = "place") -> list[Box]:
    """Where the answer to ``scene["query"]`` is drawn (scene pixels); ``[]`` when the question names no place
    (a family of one answer, or a presence question whose kind is absent).

    ``region="place"``: all that belongs to the named place, what names it and what answers (a document's whole
    ``key: value`` row, a chart's column from the printed value down to the label). ``"answer"``: only the glyphs
    read as the answer (the row's value, the bar's printed value). A shape is both."""
    from visor.data.synth.render import text_height, text_width

    if region not in REGIONS:
        raise ValueError(f"lookup region must be one of {REGIONS}, got {region!r}")

    family, query = scene["family"], scene.get("query", {})
    if family in ("presence", "kind_color"):
        large = scene.get("large_min", 0)
        return [(s["cx"] - s["size"], s["cy"] - s["size"], s["cx"] + s["size"] + 1, s["cy"] + s["size"] + 1)
                for s in scene["shapes"] if s["kind"] == query["kind"] and s["size"] >= large]

    def text_box(t: dict) -> Box:
        w, h = text_width(t["text"], int(t["size"]), int(t.get("gap", 1))), text_height(int(t["size"]))
        return (t["x"], t["y"], t["x"] + w, t["y"] + h)

    if family == "doc":
        rows = [t for t in scene["texts"] if t["role"] == "doc_row" and t["text"].partition(": ")[0] == query["key"]]
        if len(rows) != 1:
            raise ValueError(f"key {query['key']!r} names {len(rows)} rows of the document")
        row = rows[0]
        if region == "place":
            return [text_box(row)]
        size, gap = int(row["size"]), int(row.get("gap", 1))
        x0 = row["x"] + text_width(row["text"].partition(": ")[0] + ": ", size, gap) + gap
        return [(x0, row["y"], row["x"] + text_width(row["text"], size, gap), row["y"] + text_height(size))]
    if family == "chart":
        labels = [t for t in scene["texts"] if t["role"] == "bar_label" and t["text"] == query["label"]]
        if len(labels) != 1:
            raise ValueError(f"label {query['label']!r} names {len(labels)} bars of the chart")
        lx0, _, lx1, ly1 = text_box(labels[0])
        centre = (lx0 + lx1) / 2
        (bar,) = [b for b in scene["bars"] if b["box"][0] <= centre <= b["box"][2]]
        (value,) = [t for t, (x0, _, x1, _) in ((t, text_box(t)) for t in scene["texts"] if t["role"] == "bar_value")
                    if bar["box"][0] <= (x0 + x1) / 2 <= bar["box"][2]]
        if region == "answer":
            return [text_box(value)]
        # the column from the printed value down to the label: what the answer is read from, and what names it
        return [(min(bar["box"][0], text_box(value)[0]), value["y"], max(bar["box"][2] + 1, text_box(value)[2]), ly1)]
    return []


def lookup_candidates(scene: dict, region: str = "place") -> list[tuple[list[Box], str]]:
    """Every place the question of a keyed scene could have named, the named one first, as ``(boxes, answer)``: each
    row of a document, each bar of a chart, each shape of a kind_color scene, with what a question naming it would
    be answered. ``[]`` for a family whose answer is not read from the place (presence answers yes or no) or whose
    scene holds one answer. Used to see which candidate a model's answer was read from."""
    from visor.data.synth.families import derive_answer, other_queries

    if scene["family"] not in ("kind_color", "doc", "chart"):
        return []
    candidates = []
    for query in [scene["query"]] + other_queries(scene):
        named = {**scene, "query": query}
        candidates.append((lookup_boxes(named, region), derive_answer(named)))
    return candidates


def _overlap_grid(boxes: Sequence[Box], rows: int, cols: int, cell_w: float, cell_h: float) -> torch.Tensor:
    """[rows, cols] bool: cells (of ``cell_w`` x ``cell_h`` scene pixels) that overlap a box with positive area."""
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        c0, c1 = max(0, math.floor(x0 / cell_w)), min(cols, math.ceil(x1 / cell_w))
        r0, r1 = max(0, math.floor(y0 / cell_h)), min(rows, math.ceil(y1 / cell_h))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def crop_geometry(config) -> tuple[int, int, list]:
    """``(base view size, patch size, anyres grid)`` of a LLaVA-OV config: how scene pixels map to crops and image
    tokens, the trailing arguments of :func:`image_token_targets` (and of ``marking.image_token_tags``)."""
    vision = config.vision_config
    return vision.image_size, vision.patch_size, config.image_grid_pinpoints


def image_token_targets(boxes: Sequence[Box], image_size: Sequence[int], base_size: int, patch_size: int,
                        grid_pinpoints: list) -> torch.Tensor:
    """[tokens] bool over one tiled image's LLaVA-OV token sequence (``visor.model.vision.pack_image``): the base
    view's ``g x g`` patches, then the tiles stitched into one grid with a newline token closing each row. True where
    the patch overlaps a box. ``image_size`` is ``(width, height)`` and must be a resolution of the anyres grid (every
    procedural canvas is), so the tiles are the image's own pixels, neither resized nor padded."""
    from transformers.image_processing_utils import select_best_resolution

    width, height = int(image_size[0]), int(image_size[1])
    if tuple(select_best_resolution([height, width], grid_pinpoints)) != (height, width):
        raise ValueError(f"lookup targets need an image of a grid resolution; {width}x{height} is resized")
    grid = base_size // patch_size
    base = _overlap_grid(boxes, grid, grid, width / grid, height / grid)
    full = _overlap_grid(boxes, height // patch_size, width // patch_size, patch_size, patch_size)
    full = torch.cat([full, torch.zeros(full.shape[0], 1, dtype=torch.bool)], dim=1)  # the newline column
    return torch.cat([base.flatten(), full.flatten()])


def answer_query_positions(labels: torch.Tensor) -> list[int]:
    """Per assistant turn of one sample ([N] labels, -100 where no loss), the position whose prediction is the
    turn's first target token."""
    target = (labels != -100).tolist()
    return [i - 1 for i in range(1, len(target)) if target[i] and not target[i - 1]]


def on_image_tokens(input_ids: torch.Tensor, image_token_id: int, values: torch.Tensor, fill: bool | int = False,
                    what: str = "lookup mask") -> torch.Tensor:
    """``[N]`` over one row's sequence (``input_ids`` ``[N]``): ``values`` (one per image token, in order) at the row's
    ``image_token_id`` positions, ``fill`` elsewhere. The counts must agree (``what`` names ``values`` in the error)."""
    image = input_ids == image_token_id
    if int(image.sum()) != values.numel():
        raise ValueError(f"the row holds {int(image.sum())} image tokens, its {what} {values.numel()}")
    out = torch.full(input_ids.shape, fill, dtype=values.dtype)
    out[image] = values
    return out


def batch_lookup_targets(input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int,
                         turn_targets: Sequence[Sequence[torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries [K, 2] (row, position), targets [K, N] bool)`` for a padded batch.

    ``turn_targets[b][t]``: the image-token targets of row ``b``'s turn ``t`` (:func:`image_token_targets`), or
    ``None`` for a turn that names no place. A row's image tokens are its ``image_token_id`` positions, in order."""
    queries, targets = [], []
    for row, per_turn in enumerate(turn_targets):
        positions = answer_query_positions(labels[row])
        if len(positions) != len(per_turn):
            raise ValueError(f"row {row} has {len(positions)} answer turns, {len(per_turn)} lookup targets were given")
        for position, mask in zip(positions, per_turn):
            if mask is None or not bool(mask.any()):
                continue
            queries.append((row, position))
            targets.append(on_image_tokens(input_ids[row], image_token_id, mask))
    if not queries:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, input_ids.shape[1], dtype=torch.bool)
    return torch.tensor(queries, dtype=torch.long), torch.stack(targets)


class LookupSupervision:
    """Forward pre-hooks on chosen decoder layers' self-attention that measure, while armed, the attention mass the
    query positions' supervised heads put on their targets (module docstring). ``heads``: a count (the first
    ``heads`` heads of each layer) or a list of head indices (those heads of each layer)."""

    def __init__(self, decoder: nn.Module, layers: Sequence[int], heads: int | Sequence[int] = 1,
                 keep_context: bool = False) -> None:
        n_layers = len(decoder.layers)
        bad = [i for i in layers if not 0 <= int(i) < n_layers]
        if bad or not layers:
            raise ValueError(f"lookup layers must be a non-empty list of layer indices below {n_layers}, got {list(layers)}")
        n_heads = decoder.layers[0].self_attn.num_heads
        if isinstance(heads, int):  # the first ``heads`` heads
            if not 1 <= heads <= n_heads:
                raise ValueError(f"lookup heads must be in 1..{n_heads}, got {heads}")
            heads = range(heads)
        elif not heads or len(set(heads)) != len(heads) or any(not 0 <= int(h) < n_heads for h in heads):
            raise ValueError(f"lookup heads must be a count or distinct head indices below {n_heads}, got {list(heads)}")
        self.heads = torch.tensor([int(h) for h in heads])  # supervised head indices, the same in every layer
        self.layers = [int(i) for i in layers]
        self.keep_context = keep_context  # also keep what the supervised heads read (their attention output)
        self._contexts: dict[int, torch.Tensor] = {}  # keyed by layer: the forward runs them in depth order
        self._armed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._masses: dict[int, torch.Tensor] = {}
        self._handles = [decoder.layers[i].self_attn.register_forward_pre_hook(
            lambda attn, args, layer=i: self._capture(attn, args, layer)) for i in self.layers]

    def arm(self, queries: torch.Tensor, targets: torch.Tensor, key_valid: torch.Tensor) -> None:
        """Measure the next forward: ``queries`` [K, 2] (row, position), ``targets`` [K, N] bool, ``key_valid``
        [B, N] bool (the batch's attention mask)."""
        self._masses, self._contexts = {}, {}
        self._armed = (queries, targets, key_valid.bool())

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(loss, masses)`` of the armed forward, then disarm: the loss (a scalar with gradients) and the detached
        attention masses on the targets, ``[layers, K, heads]``; ``None`` if the forward had no query position."""
        armed, masses = self._armed, self._masses
        self._armed, self._masses = None, {}
        if armed is None:
            raise RuntimeError("lookup supervision was not armed before the forward")
        if armed[0].shape[0] == 0:
            return None
        if len(masses) != len(self.layers):
            raise RuntimeError(f"the forward ran {len(masses)} of the {len(self.layers)} supervised layers' attention "
                               "(a plan whose supervised layers are not self-attention?)")
        mass = torch.stack([masses[i] for i in self.layers])  # [layers, K, heads], in the order given
        return -torch.log(mass.clamp_min(1e-6)).mean(), mass.detach()

    def contexts(self) -> torch.Tensor:
        """With ``keep_context``: what the supervised heads of the last armed forward read, their attention output
        before ``o_proj`` at each query position, ``[layers, K, heads, head_dim]`` (detached, fp32)."""
        if not self._contexts:
            raise RuntimeError("no context kept: build with keep_context=True and arm before the forward")
        return torch.stack([self._contexts[i] for i in self.layers])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _capture(self, attn: nn.Module, args: tuple, layer: int) -> None:
        if self._armed is None:
            return  # evaluation, generation, or a checkpointed layer's recomputation in backward (after take())
        queries, targets, key_valid = self._armed
        x, (cos, sin) = args[0], args[1]
        if x.shape[1] != targets.shape[1]:
            raise RuntimeError(f"a supervised layer saw {x.shape[1]} tokens, the batch has {targets.shape[1]}: lookup "
                               "supervision needs every layer self-attention over the whole sequence (a base model)")
        from visor.model.layers import apply_rope

        device = x.device
        rows, positions = queries[:, 0].to(device), queries[:, 1].to(device)
        k_heads, head_dim, heads = attn.num_kv_heads, attn.head_dim, self.heads.to(device)
        n = x.shape[1]
        q = attn.q_proj(x[rows, positions]).view(-1, attn.num_heads, head_dim)[:, heads]  # [K, h, d]
        q = apply_rope(q[:, :, None], cos[rows, positions][:, None], sin[rows, positions][:, None])[:, :, 0]
        groups = attn.num_heads // k_heads
        kv_index = heads // groups  # the kv head each supervised head reads
        k = attn.k_proj(x).view(x.shape[0], n, k_heads, head_dim).transpose(1, 2)  # [B, kv, N, d]
        k = apply_rope(k, cos, sin)[rows][:, kv_index]  # [K, h, N, d]
        keys = torch.arange(n, device=device)
        allowed = (keys[None] <= positions[:, None]) & key_valid.to(device)[rows]  # [K, N]
        with torch.autocast(device.type, enabled=False):  # fp32 logits and softmax under a bf16 autocast too
            logits = torch.einsum("khd,khnd->khn", q.float(), k.float()) / math.sqrt(head_dim)
            probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
            self._masses[layer] = (probs * targets.to(device)[:, None].float()).sum(-1)  # [K, h]
        if self.keep_context:
            v = attn.v_proj(x).view(x.shape[0], n, k_heads, head_dim).transpose(1, 2)[rows][:, kv_index]  # [K, h, N, d]
            with torch.autocast(device.type, enabled=False):
                self._contexts[layer] = torch.einsum("khn,khnd->khd", probs.detach(), v.detach().float())
