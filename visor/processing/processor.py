"""Preprocessing without torchvision: tokenizer + ``LlavaOnevisionImageProcessorPil`` + our own
placeholder expansion.

``AutoProcessor`` for LLaVA-OV pulls in the video processor, which needs torchvision; we keep that out.
The number of ``<image>`` tokens per image comes from ``visor.model.vision.image_token_count``, the same
definition the model uses to lay out the features (pinned against Hugging Face's processor in tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from visor.model.vision import image_token_count

IMAGE_TAG = "<image>"

# LLaVA-OV's chat template (Qwen2 ChatML, image parts rendered as "<image>\n" in order)
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ImageLoadError(ValueError):
    """An image file that is missing, truncated or not an image."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (so truncation is caught here, not deep inside preprocessing), as RGB."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageLoadError(f"cannot read image {path}: corrupt or truncated ({err})") from err


@dataclass
class ImageGeometry:
    """What placeholder expansion needs to know about the model."""

    grid_pinpoints: list
    base_size: int
    patch_size: int
    vision_aspect_ratio: str = "anyres_max_9"
    drop_first_token: bool = False

    @classmethod
    def from_config(cls, config) -> "ImageGeometry":
        return cls(
            grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            base_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size,
            vision_aspect_ratio=config.vision_aspect_ratio,
            drop_first_token=config.vision_feature_select_strategy == "default",
        )

    def num_tokens(self, image_size: Sequence[int], tiled: bool = True) -> int:
        return image_token_count(
            image_size, grid_pinpoints=self.grid_pinpoints, base_size=self.base_size, patch_size=self.patch_size,
            vision_aspect_ratio=self.vision_aspect_ratio, tiled=tiled, drop_first_token=self.drop_first_token,
        )


class VisorProcessor:
    """Turns prompts with ``<image>`` tags and PIL images into model inputs.

    Args:
        tokenizer: a Hugging Face tokenizer whose vocabulary has the image token.
        image_processor: ``LlavaOnevisionImageProcessorPil`` (or compatible).
        geometry: the model's image geometry (``ImageGeometry.from_config(model.config)``).
        image_token_id: id of the image placeholder token (``config.image_token_id``).
    """

    def __init__(self, tokenizer, image_processor, geometry: ImageGeometry, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.geometry = geometry
        self.image_token_id = int(image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.image_token is None:
            raise ValueError(f"image token id {image_token_id} is not in the tokenizer's vocabulary")
        if getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "VisorProcessor":
        """Load tokenizer, PIL image processor and geometry from a checkpoint folder (ours or HF LLaVA-OV)."""
        from transformers import AutoConfig
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        from visor.data.tokenizer import load_tokenizer  # registers the "visor" config type too

        folder = Path(folder)
        config = AutoConfig.from_pretrained(str(folder))
        tokenizer = load_tokenizer(folder)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(str(folder))
        template_file = folder / "chat_template.json"
        if getattr(tokenizer, "chat_template", None) is None and template_file.exists():
            tokenizer.chat_template = json.loads(template_file.read_text())["chat_template"]
        return cls(tokenizer, image_processor, ImageGeometry.from_config(config), config.image_token_id)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(folder))
        self.image_processor.save_pretrained(str(folder))

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, question: str, num_images: int = 1, system: str | None = None) -> str:
        """A single-turn chat prompt with ``num_images`` image parts before the question."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        text: str | Sequence[str],
        images=None,
        padding_side: str = "left",
        resolution: str | Sequence[str] | None = None,
    ) -> dict:
        """Tokenise ``text`` (one prompt or a batch) with its images.

        ``images``: ``None``; one image per prompt (``[img, ...]``); or a list per prompt
        (``[[img, img], [], ...]``). Each prompt must hold one ``<image>`` tag per image. Returns
        ``input_ids``, ``attention_mask`` (left-padded), and, if any image, ``pixel_values``,
        ``image_sizes`` and ``batch_num_images``.
        ``resolution``: ``"full"`` (default) or ``"base"``, for the batch or per prompt
        (``visor.model.resolution``); when some image is not laid out as LLaVA-OV would, the result also
        holds ``image_tiled`` (one flag per image) for the model.
        """
        from visor.model.resolution import image_tiled

        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no prompt given")
        per_prompt = self._images_per_prompt(images, len(texts))
        flags = image_tiled(resolution, [len(imgs) for imgs in per_prompt])
        flag_iter = iter(flags)
        expanded, all_images, counts = [], [], []
        for b, (prompt, imgs) in enumerate(zip(texts, per_prompt)):
            if not prompt.strip() and not imgs:
                raise ValueError(f"prompt {b} is empty")
            tags = prompt.count(IMAGE_TAG)
            if tags != len(imgs):
                raise ValueError(f"prompt {b} has {tags} {IMAGE_TAG} tag(s) but {len(imgs)} image(s) were given")
            pieces = prompt.split(IMAGE_TAG)
            out = pieces[0]
            for img, piece in zip(imgs, pieces[1:]):
                # height, width of the image as the image processor sees it
                out += self.image_token * self.geometry.num_tokens((img.height, img.width), tiled=next(flag_iter)) + piece
            expanded.append(out)
            all_images.append(imgs)
            counts.append(len(imgs))
        encoded = self.tokenizer(expanded, add_special_tokens=False)
        rows = encoded["input_ids"]
        length = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            if padding_side == "left":
                input_ids[b, length - len(row):] = torch.tensor(row)
                attention_mask[b, length - len(row):] = 1
            else:
                input_ids[b, : len(row)] = torch.tensor(row)
                attention_mask[b, : len(row)] = 1
        result = {"input_ids": input_ids, "attention_mask": attention_mask}
        if any(counts):
            nested = [imgs for imgs in all_images if imgs]
            default = [len(g) == 1 for g in nested for _ in g]
            result.update(images_to_pixels(self.image_processor, nested, None if flags == default else flags))
            result["batch_num_images"] = counts
            if flags != default:
                result["image_tiled"] = flags
        return result

    @staticmethod
    def _images_per_prompt(images, batch: int) -> list[list[Image.Image]]:
        if images is None:
            return [[] for _ in range(batch)]
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if all(isinstance(i, Image.Image) for i in images):
            if len(images) != batch:
                if batch == 1:
                    return [images]
                raise ValueError(f"{len(images)} images for {batch} prompts: give a list of images per prompt")
            return [[i] for i in images]
        if len(images) != batch:
            raise ValueError(f"{len(images)} image lists for {batch} prompts")
        return [[] if group is None else list(group) for group in images]


def images_to_pixels(image_processor, groups: Sequence[Sequence[Image.Image]], tiled: Sequence[bool] | None = None) -> dict:
    """``pixel_values`` / ``image_sizes`` for the images of ``groups`` (one list per sample, empty ones
    skipped), each image tiled (anyres: base view + tiles) or not (base view only) as ``tiled`` says.

    ``tiled=None`` (or flags equal to LLaVA-OV's own choice: tiles for a sample's only image) is Hugging
    Face's call, unchanged. Otherwise the tiled images go through the processor's single-image (anyres)
    path and the others through its multi-image path (padded to a square, resized: one crop), and the two
    are merged back into image order, the crop axis zero-padded to the longest image (as HF pads)."""
    groups = [list(g) for g in groups if g]
    images = [im for g in groups for im in g]
    default = [len(g) == 1 for g in groups for _ in g]
    if tiled is None or [bool(t) for t in tiled] == default:
        processed = image_processor(groups, return_tensors="pt")
        return {"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]}
    tiled = [bool(t) for t in tiled]
    if len(tiled) != len(images):
        raise ValueError(f"{len(tiled)} tiling flags for {len(images)} images")
    bad = [i for i, (t, d) in enumerate(zip(tiled, default)) if t and not d]
    if bad:
        raise ValueError(f"image(s) {bad} belong to multi-image prompts, which LLaVA-OV never tiles")
    parts: dict[bool, tuple] = {}
    full = [im for im, t in zip(images, tiled) if t]
    if full:
        out = image_processor([[im] for im in full], return_tensors="pt")
        parts[True] = (out["pixel_values"], out["image_sizes"])
    base = [im for im, t in zip(images, tiled) if not t]
    if base:  # the multi-image path treats every image of a group of >= 2 as one base view
        out = image_processor([base if len(base) > 1 else base * 2], return_tensors="pt")
        parts[False] = (out["pixel_values"][: len(base)], out["image_sizes"][: len(base)])
    crops = max(p[0].shape[1] for p in parts.values())
    first = next(iter(parts.values()))[0]
    pixel_values = first.new_zeros((len(images), crops, *first.shape[2:]))
    image_sizes = torch.zeros((len(images), 2), dtype=next(iter(parts.values()))[1].dtype)
    taken = {True: 0, False: 0}
    for i, t in enumerate(tiled):
        values, sizes = parts[t]
        j = taken[t]
        pixel_values[i, : values.shape[1]] = values[j]
        image_sizes[i] = sizes[j]
        taken[t] += 1
    return {"pixel_values": pixel_values, "image_sizes": image_sizes}
