"""From samples (images + LLaVA conversation turns) to model inputs, for training and for evaluation.

One place decides how a sample is tokenised, so training and evaluation prompts are identical:
the tokenizer's chat template (``visor.data.llava_format.encode_conversation`` / ``encode_prompt``),
each ``<image>`` expanded to the count the model's layout gives (``ImageGeometry``; a prompt with one
image uses anyres tiles, a multi-image prompt base views only, as LLaVA-OV does), pixels from
``LlavaOnevisionImageProcessorPil``. ``resolution="base"`` (for the batch, or one per sample) lays a
sample's image out as its base view only (``visor.model.resolution``): fewer placeholders, one crop, and the
batch carries ``image_tiled`` for the model.
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

    def _counts(self, images: Sequence, resolution: str | None = None) -> list[int]:
        tiled = len(images) == 1 and resolution in (None, "full")
        return [self.geometry.num_tokens((img.height, img.width), tiled=tiled) for img in images]

    @staticmethod
    def _resolutions(samples: Sequence[Sample], resolution) -> list[str | None]:
        if resolution is None or isinstance(resolution, str):
            resolution = [resolution] * len(samples)
        if len(resolution) != len(samples):
            raise ValueError(f"{len(resolution)} resolutions for {len(samples)} samples")
        bad = [r for r in resolution if r not in (None, "full", "base")]
        if bad:
            raise ValueError(f"resolution must be 'full' or 'base', got {bad[0]!r}")
        return list(resolution)

    def _pixels(self, samples: Sequence[Sample], resolution=None) -> dict:
        from visor.model.resolution import image_tiled
        from visor.processing.processor import images_to_pixels

        counts = [len(s.images) for s in samples]
        if not any(counts):
            return {}
        groups = [s.images for s in samples if s.images]
        default = [len(g) == 1 for g in groups for _ in g]
        flags = image_tiled([r or "full" for r in self._resolutions(samples, resolution)], counts)
        out = images_to_pixels(self.image_processor, groups, None if flags == default else flags)
        out["batch_num_images"] = counts
        if flags != default:
            out["image_tiled"] = flags
        return out

    def train_batch(self, samples: Sequence[Sample], resolution=None) -> dict:
        """Inputs with ``labels`` (assistant tokens only), right-padded: the model's causal attention then
        needs no mask (``VisorForConditionalGeneration.forward``): faster steps, the same loss and gradients
        (``benchmarks/train_throughput.py --compare padding``)."""
        resolutions = self._resolutions(samples, resolution)
        pairs = [encode_conversation(s.turns, self.tokenizer, self._counts(s.images, r), self.image_token)
                 for s, r in zip(samples, resolutions)]
        batch = collate_tokens(pairs, self.pad_token_id, padding_side="right")
        batch.update(self._pixels(samples, resolution))
        return batch

    def prompt_ids(self, sample: Sample, resolution: str | None = None) -> list[int]:
        """Token ids of one generation prompt, image placeholders expanded (no image processing)."""
        resolution = self._resolutions([sample], resolution)[0]
        return encode_prompt(sample.turns, self.tokenizer, self._counts(sample.images, resolution), self.image_token)

    def prompt_batch(self, samples: Sequence[Sample], resolution=None, pixels: bool = True) -> dict:
        """Generation prompts (the turns before the answer + the assistant prefix), left-padded.

        ``pixels=False``: token ids only (for a caller that brings its own image features); ``batch_num_images``
        and ``image_tiled`` are still given."""
        resolutions = self._resolutions(samples, resolution)
        rows = [self.prompt_ids(s, r) for s, r in zip(samples, resolutions)]
        batch = collate_tokens([(r, [-100] * len(r)) for r in rows], self.pad_token_id, padding_side="left")
        batch.pop("labels")
        if pixels:
            batch.update(self._pixels(samples, resolution))
        elif any(s.images for s in samples):
            from visor.model.resolution import image_tiled

            counts = [len(s.images) for s in samples]
            flags = image_tiled([r or "full" for r in resolutions], counts)
            batch["batch_num_images"] = counts
            if flags != [n == 1 for n in counts for _ in range(n)]:
                batch["image_tiled"] = flags
        return batch


def count_tokens(batch: dict, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (visual tokens, text tokens) of a prompt batch."""
    mask = batch["attention_mask"].bool()
    visual = ((batch["input_ids"] == image_token_id) & mask).sum(1)
    return visual, mask.sum(1) - visual
