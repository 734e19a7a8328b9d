"""Place marking: a per-token head that asks the visual tokens to mark the place the question names (base recipes).

Why: in the keyed families (``visor.train.lookup``) the baseline answers the same value whatever the question asks on
about four images in five (``benchmarks/keyed_lookup_attention.py --questions``): the question never reaches the
choice. Supervising where the answer attends (``lookup_weight``) teaches one head to find the named place in about
half the items, but the answer does not follow. Finding the place is two hops at the answer token (the question's
word, then the glyphs or shape that carry it) and reading it a third. With the question before the image
(``data.question_first``) the visual tokens can attend to the question in every self-attention layer, so the match
can happen where the glyphs are: each visual token asks whether its row, bar or shape is the one named. This head
supervises that step. A linear read-out on the input of layer ``mark_layer`` (the layer's normed input, as its
attention reads it) gives every image token a logit for "in the named place"; the loss is a balanced binary
cross-entropy (the mean over the place's tokens and the mean over the others, averaged), so a place of a few tokens
among hundreds counts as much as the rest. The answer then needs one hop: attend to the marked tokens.

Only the first question turn is marked: the visual tokens see that question alone (a later turn comes after the
image).

*Tagging* (``tag_weight``) is the same step without the question: every visual token of a keyed scene is asked which
place it belongs to, by the name a question would use (a document row's key, a bar's label, a shape's kind;
:data:`TAGS`), so the answer's lookup becomes one hop (the question's word against the tokens' tags) in LLaVA-OV's
own prompt order, with the image first. A linear read-out on the same layer input, cross-entropy over ``len(TAGS) +
1`` classes (0: no place), balanced between the tokens of a place and the rest; a patch that two places overlap is
left out.

The heads live on the model as ``aux_mark_head`` / ``aux_tag_head`` while training and are never exported
(``visor.train.auxiliary.drop_auxiliary``): the checkpoint stays a plain LLaVA-OV model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTRIBUTE = "aux_mark_head"
TAG_ATTRIBUTE = "aux_tag_head"


def _tags() -> tuple[str, ...]:
    from visor.data.synth.config import BAR_LABELS, DOC_KEYS, SHAPES

    return tuple(DOC_KEYS) + tuple(BAR_LABELS) + tuple(SHAPES)


TAGS: tuple[str, ...] = _tags()  # class i + 1 of the tag head; 0 is "no place"


class TokenHead(nn.Module):
    """A linear per-token read-out (``outputs`` logits) on a decoder layer's normed input, captured while the model
    trains."""

    def __init__(self, hidden: int, layer: int, outputs: int = 1) -> None:
        super().__init__()
        self.layer = int(layer)
        self.proj = nn.Linear(hidden, outputs)
        self._logits: torch.Tensor | None = None

    def capture(self, attn: nn.Module, args: tuple) -> None:
        if self.training:  # evaluation and generation run the layer too; nothing to keep there
            self._logits = self.proj(args[0])  # [B, N, outputs]

    def take(self) -> torch.Tensor:
        """The logits of the layer's last forward in training mode, ``[B, N, outputs]``, once."""
        if self._logits is None:
            raise RuntimeError("the token head saw no forward of its layer in training mode since its last read")
        logits, self._logits = self._logits, None
        return logits


def attach_token_head(model: nn.Module, layer: int, attribute: str = ATTRIBUTE, outputs: int = 1) -> TokenHead:
    """Add a :class:`TokenHead` to a base model (as ``model.<attribute>``), fed by decoder layer ``layer``'s
    self-attention input. Layer 0 reads the embeddings, before any token has seen another, so it is refused."""
    decoder = model.language_model
    if not 1 <= layer < len(decoder.layers):
        raise ValueError(f"mark_layer and tag_layer must be in 1..{len(decoder.layers) - 1} (the input of that layer "
                         f"is read; layer 0's input has seen no other token), got {layer}")
    head = TokenHead(model.config.text_config.hidden_size, layer, outputs)
    setattr(model, attribute, head)
    decoder.layers[layer].self_attn.register_forward_pre_hook(head.capture)
    return head


def place_tags(scene: dict, region: str = "place") -> list[tuple[list, int]]:
    """Every place of a keyed scene with its tag, ``(boxes, class)`` (class ``TAGS.index(name) + 1``): the rows of
    a document by key, the columns of a chart by label, the shapes by kind (presence and kind_color). ``[]`` for
    other families."""
    from visor.data.synth.families import other_queries
    from visor.train.lookup import lookup_boxes

    if scene["family"] not in ("presence", "kind_color", "doc", "chart"):
        return []
    tagged = []
    for query in [scene["query"]] + other_queries(scene):
        boxes = lookup_boxes({**scene, "query": query}, region)
        if boxes:  # presence asks for kinds the image may not hold
            name = query.get("key") or query.get("label") or query["kind"]
            tagged.append((boxes, TAGS.index(name) + 1))
    return tagged


def image_token_tags(scene: dict, geometry: tuple, region: str = "place") -> torch.Tensor:
    """``[image tokens]`` int64 over one image's LLaVA-OV token sequence (``visor.train.lookup.image_token_targets``):
    the tag of the place each token's patch overlaps, 0 for none, -100 for a patch two places share."""
    from visor.train.lookup import image_token_targets

    masks = [(image_token_targets(boxes, scene["size"], *geometry), tag) for boxes, tag in place_tags(scene, region)]
    if not masks:
        return image_token_targets([], scene["size"], *geometry).long()  # all zero: no place
    labels = torch.zeros_like(masks[0][0], dtype=torch.long)
    count = torch.zeros_like(labels)
    for mask, tag in masks:
        labels[mask] = tag
        count += mask.long()
    labels[count > 1] = -100
    return labels


def mark_loss(model: nn.Module, rows: torch.Tensor, targets: torch.Tensor, image_mask: torch.Tensor,
              candidates: list[torch.Tensor | None] | None = None,
              choice_weight: float = 0.0) -> tuple[torch.Tensor, float, float]:
    """Balanced BCE of the captured logits on the image tokens of ``rows`` (``image_mask`` [B, N]: the batch's image
    positions), the balanced accuracy (the mean of the shares of the place's tokens and of the others classified
    right; 0.5 for a constant guess), and the choice (:func:`mark_choice`; NaN without ``candidates``).
    ``targets`` [R, N] mark the named place; ``candidates[r]`` [C, N] every place row ``r``'s question could have
    named, the named one first (``None``: fewer than two).

    ``choice_weight`` > 0 adds that weight times a cross-entropy over each row's candidates, their mean logits as
    scores and the named one as the class (:func:`choice_loss`): the BCE alone is met by marking every place, since
    the other places are few among the negatives; this term is met only by telling them apart."""
    logits = getattr(model, ATTRIBUTE).take()[..., 0]
    if rows.numel() == 0:
        # keeps the head in the graph (DDP sees its parameters used)
        return logits.sum() * 0.0, float("nan"), float("nan")
    logits = logits[rows.to(logits.device)].float()
    targets = targets.to(logits.device)
    image = image_mask.to(logits.device)[rows.to(logits.device)]
    if (targets & ~image).any():
        raise ValueError("mark targets must lie on image tokens")
    positive, negative = targets, image & ~targets
    if not positive.any() or not negative.any():
        raise ValueError("every marked row needs tokens inside and outside the named place")
    losses = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
    loss = 0.5 * (losses[positive].mean() + losses[negative].mean())
    balanced = balanced_accuracy(logits.detach(), positive, negative)
    choice = mark_choice(logits.detach(), candidates) if candidates is not None else float("nan")
    if choice_weight > 0 and candidates is not None and any(c is not None for c in candidates):
        loss = loss + choice_weight * choice_loss(logits, candidates)
    return loss, balanced, choice


def balanced_accuracy(logits: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The mean of the shares of ``positive`` tokens marked (logit > 0) and of ``negative`` tokens left unmarked
    (0.5 for a constant guess); ``logits`` and the two masks have one shape."""
    marked = logits > 0
    return float(0.5 * (marked[positive].float().mean() + (~marked[negative]).float().mean()))


def _candidate_means(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[C] mean logit over each candidate's tokens (``logits`` [N], ``masks`` [C, N])."""
    masks = masks.to(logits.device)
    return (logits.unsqueeze(0) * masks).sum(1) / masks.sum(1).clamp(min=1)


def choice_loss(logits: torch.Tensor, candidates: list[torch.Tensor | None]) -> torch.Tensor:
    """Mean over the rows with candidates of the cross-entropy of the named place (candidate 0) against the others,
    each scored by its mean logit (``logits`` [R, N], ``candidates[r]`` [C, N] or ``None``)."""
    losses = [F.cross_entropy(_candidate_means(logits[row], masks)[None], logits.new_zeros(1, dtype=torch.long))
              for row, masks in enumerate(candidates) if masks is not None]
    if not losses:
        raise ValueError("choice_loss needs a row with candidates")
    return torch.stack(losses).mean()


def mark_choice(logits: torch.Tensor, candidates: list[torch.Tensor | None]) -> float:
    """The share of rows whose named place gets a higher mean logit than every other place the question could have
    named (``candidates[r]`` [C, N], the named one first; rows with ``None`` are left out; NaN if all are).

    Why beside the balanced accuracy: a marker blind to the question that marks every row, bar or shape already
    scores well above 0.5 there (most negatives are background); only this tells whether the question reached the
    visual tokens. Chance is the mean of 1 / C."""
    right = []
    for row, masks in enumerate(candidates):
        if masks is None:
            continue
        means = _candidate_means(logits[row], masks)
        right.append(float(bool(means[0] > means[1:].max())))  # strictly: a tie (a blind marker) is no choice
    return sum(right) / len(right) if right else float("nan")


def tag_loss(model: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Balanced cross-entropy of the tag head's captured logits against ``labels`` [B, N] (-100: not an image token
    or a shared patch; 0: no place; else a tag): the mean over the tagged tokens and the mean over the untagged ones,
    averaged; and the accuracy on the tagged tokens (detached)."""
    logits = getattr(model, TAG_ATTRIBUTE).take().float()
    labels = labels.to(logits.device)
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"tag labels {tuple(labels.shape)} do not match the batch {tuple(logits.shape[:2])}")
    tagged, untagged = labels > 0, labels == 0
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view_as(labels)
    parts = [losses[where].mean() for where in (tagged, untagged) if where.any()]
    if not parts:
        return logits.sum() * 0.0, float("nan")
    accuracy = float((logits.detach().argmax(-1) == labels)[tagged].float().mean()) if tagged.any() else float("nan")
    return sum(parts) / len(parts), accuracy
