"""A plain one-process AdamW loop for diagnostics (``benchmarks/``): no checkpoints, no distribution, no recipe.

The diagnostics that continue or re-train a model for a few hundred steps to ask one question (does a key help, does
copying form) share this instead of each writing the optimiser step, the warm-up/cosine schedule and the loss
window; a training *run* is ``visor train`` (``visor.train.loop``), with checkpoints and resume.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class PlainTraining:
    """AdamW (no weight decay) with linear warm-up then cosine decay to 0 over ``steps``, gradient norm clipped."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], lr: float, steps: int, warmup: int,
                 betas: tuple[float, float] = (0.9, 0.999), clip: float = 1.0) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.optimiser = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.0, betas=betas)
        warmup = max(1, warmup)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / steps))))
        self.clip = clip
        self.losses: list[float] = []

    def step(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and take one optimiser and schedule step."""
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.clip)
        self.optimiser.step()
        self.schedule.step()
        self.losses.append(float(loss.detach()))

    def mean_loss(self, last: int) -> float:
        """Mean training loss over the last ``last`` steps."""
        window = self.losses[-last:]
        return sum(window) / len(window)
