"""LLaVA-OneVision's visual side: crops per image, anyres packing, and the placeholder-token count.

The vision tower (SigLIP) and the projector are Hugging Face modules; the layout logic below follows
LLaVA-OV as ``transformers`` defines it (``LlavaOnevisionModel.pack_image_features`` and
``LlavaOnevisionProcessor._get_number_of_features``), written out here so that the model and the
processor share one definition and the tests pin it against Hugging Face.

Layout of one single-image prompt: the base view's ``g x g`` grid (g = image_size // patch_size), then
the high-resolution tiles stitched into one grid, unpadded to the image's aspect ratio, bilinearly
shrunk if it exceeds ``anyres_max_K`` base views, with an ``image_newline`` token closing every row.
An image of a multi-image prompt is encoded as its base view only, plus one newline token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from transformers.image_processing_utils import select_best_resolution


def _max_views(vision_aspect_ratio: str) -> int:
    if not vision_aspect_ratio.startswith("anyres_max_"):
        raise ValueError(f"unsupported vision_aspect_ratio {vision_aspect_ratio!r} (expected 'anyres_max_K')")
    return int(vision_aspect_ratio[len("anyres_max_"):])


def num_crops(image_size: Sequence[int], grid_pinpoints: list, base_size: int, tiled: bool = True) -> int:
    """Crops the vision tower encodes for one image: the base view plus the anyres tiles."""
    if not tiled:
        return 1
    height, width = select_best_resolution(list(image_size), grid_pinpoints)
    return math.ceil(height / base_size) * math.ceil(width / base_size) + 1


def _unpadded_grid(orig_h: int, orig_w: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) crop of a ``grid_h x grid_w`` feature grid back to the image's aspect."""
    original_aspect = orig_w / orig_h
    current_aspect = grid_w / grid_h
    if original_aspect > current_aspect:
        new_h = int(round(orig_h * (grid_w / orig_w), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(orig_w * (grid_h / orig_h), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


def image_token_count(
    image_size: Sequence[int],
    *,
    grid_pinpoints: list,
    base_size: int,
    patch_size: int,
    vision_aspect_ratio: str = "anyres_max_9",
    tiled: bool = True,
    drop_first_token: bool = False,
) -> int:
    """Number of ``<image>`` placeholder tokens LLaVA-OV uses for one image of ``(height, width)``.

    ``tiled=False`` is the multi-image layout (base view + one newline). ``drop_first_token`` is the
    ``vision_feature_select_strategy == "default"`` case (a CLS-like first token removed).
    """
    grid = base_size // patch_size
    if not tiled:
        count = grid * grid + 1
    else:
        orig_h, orig_w = int(image_size[0]), int(image_size[1])
        best_h, best_w = select_best_resolution([orig_h, orig_w], grid_pinpoints)
        cur_h, cur_w = grid * (best_h // base_size), grid * (best_w // base_size)
        top, bottom, left, right = _unpadded_grid(orig_h, orig_w, cur_h, cur_w)
        cur_h, cur_w = bottom - top, right - left
        ratio = math.sqrt(cur_h * cur_w / (_max_views(vision_aspect_ratio) * grid * grid))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
        count = cur_h * cur_w + cur_h + grid * grid
    return count - 1 if drop_first_token else count


def pack_image(
    crop_features: torch.Tensor,
    image_size: Sequence[int],
    newline: torch.Tensor,
    *,
    grid_pinpoints: list,
    base_size: int,
    vision_aspect_ratio: str = "anyres_max_9",
) -> torch.Tensor:
    """Lay out one image's projected crop features ([crops, g*g, D]) as LLaVA-OV's token sequence."""
    base = crop_features[0]
    grid = int(math.isqrt(base.shape[0]))
    if grid * grid != base.shape[0]:
        raise ValueError(f"crop feature count {base.shape[0]} is not a square grid")
    if crop_features.shape[0] == 1:
        return torch.cat([base, newline[None].to(base)], dim=0)
    best_h, best_w = select_best_resolution([int(image_size[0]), int(image_size[1])], grid_pinpoints)
    rows, cols = best_h // base_size, best_w // base_size
    tiles = crop_features[1:]
    if tiles.shape[0] != rows * cols:
        raise ValueError(
            f"image of size {tuple(int(s) for s in image_size)} needs {rows * cols} tiles, got {tiles.shape[0]}"
        )
    dim = tiles.shape[-1]
    # [rows, cols, g, g, D] -> [D, rows*g, cols*g]
    stitched = tiles.view(rows, cols, grid, grid, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * grid, cols * grid)
    top, bottom, left, right = _unpadded_grid(int(image_size[0]), int(image_size[1]), rows * grid, cols * grid)
    stitched = stitched[:, top:bottom, left:right]
    cur_h, cur_w = stitched.shape[1:]
    ratio = math.sqrt(cur_h * cur_w / (_max_views(vision_aspect_ratio) * grid * grid))
    if ratio > 1.1:
        stitched = F.interpolate(stitched[None], [int(cur_h // ratio), int(cur_w // ratio)], mode="bilinear")[0]
    stitched = torch.cat([stitched, newline[:, None, None].expand(dim, stitched.shape[1], 1).to(stitched)], dim=-1)
    return torch.cat([base, stitched.flatten(1, 2).transpose(0, 1)], dim=0)
