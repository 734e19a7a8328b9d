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
image). The head lives on the model as ``aux_mark_head`` while training and is never exported
(``visor.train.auxiliary.drop_auxiliary``): the checkpoint stays a plain LLaVA-OV model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTRIBUTE = "aux_mark_head"


class PlaceMarkHead(nn.Module):
    """A linear per-token logit on a decoder layer's normed input, captured while the model trains."""

    def __init__(self, hidden: int, layer: int) -> None:
        super().__init__()
        self.layer = int(layer)
        self.proj = nn.Linear(hidden, 1)
        self._logits: torch.Tensor | None = None

    def capture(self, attn: nn.Module, args: tuple) -> None:
        if self.training:  # evaluation and generation run the layer too; nothing to keep there
            self._logits = self.proj(args[0]).squeeze(-1)  # [B, N]

    def take(self) -> torch.Tensor:
        """The logits of the layer's last forward in training mode, ``[B, N]``, once."""
        if self._logits is None:
            raise RuntimeError("the mark head saw no forward of its layer in training mode since its last read")
        logits, self._logits = self._logits, None
        return logits


def attach_mark_head(model: nn.Module, layer: int) -> PlaceMarkHead:
    """Add a :class:`PlaceMarkHead` to a base model (``model.aux_mark_head``), fed by decoder layer ``layer``'s
    self-attention input. Layer 0 reads the embeddings, before any token has seen the question, so it is refused."""
    decoder = model.language_model
    if not 1 <= layer < len(decoder.layers):
        raise ValueError(f"mark_layer must be in 1..{len(decoder.layers) - 1} (the input of that layer is marked; "
                         f"layer 0's input has not seen the question), got {layer}")
    head = PlaceMarkHead(model.config.text_config.hidden_size, layer)
    setattr(model, ATTRIBUTE, head)
    decoder.layers[layer].self_attn.register_forward_pre_hook(head.capture)
    return head


def mark_loss(model: nn.Module, rows: torch.Tensor, targets: torch.Tensor,
              image_mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Balanced BCE of the captured logits on the image tokens of ``rows`` (``image_mask`` [B, N]: the batch's image
    positions), and the balanced accuracy (the mean of the shares of the place's tokens and of the others classified
    right; 0.5 for a constant guess). ``targets`` [R, N] mark the named place."""
    logits = getattr(model, ATTRIBUTE).take()
    if rows.numel() == 0:
        return logits.sum() * 0.0, float("nan")  # keeps the head in the graph (DDP sees its parameters used)
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
    marked = logits.detach() > 0
    balanced = 0.5 * (marked[positive].float().mean() + (~marked[negative]).float().mean())
    return loss, float(balanced)
