"""A per-patch shape-kind head on the vision tower of an LVLM, trained beside the answer loss (base recipes).

Why: the tower pre-trained on glyphs and colours carries little shape information (a linear probe reads shape kinds
at 58.8%, chance 44%), and three baseline stages trained on the answer loss alone left the shape and presence
families at chance; a tower pre-trained with a shape head lets a base stage learn shape within 500 steps
(``docs/training-log.md``). A base recipe with ``vision_shape_weight > 0`` continues a baseline with the same
dense shape objective on the tower it trains, so the tower learns to see shapes while the LLM learns to read them.

The head reads the hidden states LLaVA-OV reads (the last encoder layer, before ``post_layernorm``) through a
forward hook on the tower's encoder, so the model's own forward stays untouched and the head runs inside it (DDP
and FSDP see one forward). It lives on the model as ``aux_shape_head`` while training and is never exported: the
final checkpoint is a plain LLaVA-OV model (:func:`drop_auxiliary`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ATTRIBUTE = "aux_shape_head"
PREFIX = "aux_"  # state-dict keys of training-only heads


class ShapeHead(nn.Module):
    """A linear per-patch classifier over ``SHAPE_CLASSES`` that captures its logits when the tower runs."""

    def __init__(self, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, n_classes)
        self._logits: torch.Tensor | None = None

    def capture(self, hidden: torch.Tensor) -> None:
        if self.training:  # generation during evaluation runs the tower too; nothing to keep there
            self._logits = self.proj(hidden)

    def take(self) -> torch.Tensor:
        """The logits of the tower's last forward in training mode ([crops, patches, classes]), once."""
        if self._logits is None:
            raise RuntimeError("the shape head saw no tower forward in training mode since its last read")
        logits, self._logits = self._logits, None
        return logits


def attach_shape_head(model: nn.Module) -> ShapeHead:
    """Add a :class:`ShapeHead` to an LVLM (``model.aux_shape_head``), fed by its tower's encoder."""
    from visor.data.synth.dense import SHAPE_CLASSES

    tower = getattr(model, "vision_tower", None)
    if tower is None or not hasattr(tower, "encoder"):
        raise ValueError("the shape head needs a model with a SigLIP vision tower (vision_tower.encoder)")
    if getattr(model.config, "vision_feature_layer", -1) != -1:
        raise ValueError("the shape head reads the last encoder layer; this model reads vision_feature_layer="
                         f"{model.config.vision_feature_layer}")
    head = ShapeHead(model.config.vision_config.hidden_size, len(SHAPE_CLASSES))
    setattr(model, ATTRIBUTE, head)
    tower.encoder.register_forward_hook(lambda module, args, output: head.capture(output.last_hidden_state))
    return head


def drop_auxiliary(state: dict) -> dict:
    """A state dict without the training-only heads' tensors."""
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}


def crop_shape_targets(item, crop_size: int, patch_size: int, grid_pinpoints: list) -> torch.Tensor:
    """Per-patch shape-kind labels of one procedural item, crop by crop as the LLaVA-OV processor lays the image
    out (base view, then the anyres tiles row by row): ``[crops, patches]`` (int64, 0 = no shape).

    Needs an image whose size is one of the anyres grid's resolutions (every procedural canvas is): the tiles are
    then the image's own pixels, with no resize or padding between them and the scene the labels come from.
    """
    from transformers.image_processing_utils import select_best_resolution

    from visor.data.synth.dense import dense_targets

    size, patch = int(crop_size), int(patch_size)
    width, height = item.image.size
    best_h, best_w = select_best_resolution([height, width], grid_pinpoints)
    if (best_h, best_w) != (height, width):
        raise ValueError(f"the shape head's labels need an image of a grid resolution; {width}x{height} is resized "
                         f"to {best_w}x{best_h}")
    base = dense_targets(item, patch, image_size=(size, size)).shape
    full = dense_targets(item, patch).shape
    grid = size // patch
    crops = [base] + [full[r:r + grid, c:c + grid] for r in range(0, full.shape[0], grid)
                      for c in range(0, full.shape[1], grid)]
    return torch.from_numpy(np.stack([np.ascontiguousarray(c).reshape(-1) for c in crops]))


def shape_head_loss(model: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head's captured logits against ``targets`` ([crops, patches])."""
    logits = getattr(model, ATTRIBUTE).take()
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"the tower encoded {tuple(logits.shape[:2])} crops x patches, the labels are "
                         f"{tuple(targets.shape)}")
    return F.cross_entropy(logits.float().flatten(0, 1), targets.to(logits.device).flatten())
