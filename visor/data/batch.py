"""From samples (images + LLaVA conversation turns) to model inputs, for training and for evaluation.

One place decides how a sample is tokenised, so training and evaluation prompts are identical:
the tokenizer's chat template (``visor.data.llava_format.encode_conversation`` / ``encode_prompt``),
each ``<image>`` expanded to the count the model's layout gives (``ImageGeometry``; a prompt with one
image uses anyres tiles, a multi-image prompt base views only, as LLaVA-OV does), pixels from
``LlavaOnevisionImageProcessorPil``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from visor.data.llava_format import IMAGE_TAG, collate_tokens, encode_conversation, encode_prompt
from visor.processing.processor import ImageGeometry


@dataclass
class Sample:
    """Images and conversation turns (LLaVA ``{"from", "value"}`` dicts) of one example."""

    images: list
    turns: list[dict]


class Batcher:
    """Builds padded batches for ``VisorForConditionalGeneration.forward`` / ``generate``."""

    def __init__(self, tokenizer, image_processor, geometry: ImageGeometry, image_token: str = IMAGE_TAG) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.geometry = geometry
        self.image_token = image_token
        pad = tokenizer.pad_token_id
        self.pad_token_id = 0 if pad is None else int(pad)

    @classmethod
    def for_model(cls, model, tokenizer, image_processor) -> "Batcher":
        return cls(tokenizer, image_processor, ImageGeometry.from_config(model.config))

    def _counts(self, images: Sequence) -> list[int]:
        tiled = len(images) == 1
        return [self.geometry.num_tokens((img.height, img.width), tiled=tiled) for img in images]

    def _pixels(self, samples: Sequence[Sample]) -> dict:
        counts = [len(s.images) for s in samples]
        if not any(counts):
            return {}
        processed = self.image_processor([s.images for s in samples if s.images], return_tensors="pt")
        return {"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"], "batch_num_images": counts}

    def train_batch(self, samples: Sequence[Sample]) -> dict:
        """Inputs with ``labels`` (assistant tokens only), left-padded."""
        pairs = [encode_conversation(s.turns, self.tokenizer, self._counts(s.images), self.image_token) for s in samples]
        batch = collate_tokens(pairs, self.pad_token_id, padding_side="left")
        batch.update(self._pixels(samples))
        return batch

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Token ids of one generation prompt, image placeholders expanded (no image processing)."""
        return encode_prompt(sample.turns, self.tokenizer, self._counts(sample.images), self.image_token)

    def prompt_batch(self, samples: Sequence[Sample]) -> dict:
        """Generation prompts (the turns before the answer + the assistant prefix), left-padded."""
        rows = [self.prompt_ids(s) for s in samples]
        batch = collate_tokens([(r, [-100] * len(r)) for r in rows], self.pad_token_id, padding_side="left")
        batch.pop("labels")
        batch.update(self._pixels(samples))
        return batch


def count_tokens(batch: dict, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (visual tokens, text tokens) of a prompt batch."""
    mask = batch["attention_mask"].bool()
    visual = ((batch["input_ids"] == image_token_id) & mask).sum(1)
    return visual, mask.sum(1) - visual
