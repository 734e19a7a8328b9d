"""The anyres layout of one image's LLaVA-OV token sequence, as token compressors need to see it.

``visor.model.vision.pack_image`` lays one image out as:

* tiled (single-image prompt): the base view's ``g x g`` grid, then the high-resolution tiles stitched
  into one ``rows*g x cols*g`` grid, unpadded to the image's aspect ratio, bilinearly shrunk when it
  exceeds ``anyres_max_K`` base views, and an ``image_newline`` token closing every row;
* untiled (multi-image prompt): the base grid, then one newline token.

``ImageLayout`` describes that sequence token by token: whether a token is a base-view cell, a
tile-grid cell or a newline, and, for a tile-grid cell, which anyres crop (tile) it came from. A packed
cell is assigned to the tile holding its centre before the bilinear shrink, so every cell belongs to
exactly one tile even where LLaVA-OV resampled the grid. The compressors budget per *unit*: unit 0 is
the base view, unit ``1 + t`` the cells of tile ``t``; newline tokens belong to no unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution

from visor.model.vision import _max_views, _unpadded_grid

BASE, TILE, NEWLINE = 0, 1, 2  # token kinds


@dataclass(frozen=True)
class ImageLayout:
    """Token-by-token layout of one image (see module docstring).

    Attributes:
        grid: side ``g`` of the base view (and of every tile) in tokens.
        tiled: single-image anyres layout (True) or multi-image base view + newline (False).
        tile_grid: ``(rows, cols)`` of anyres crops; ``(0, 0)`` when untiled.
        packed: ``(h, w)`` of the packed high-resolution grid (newline column excluded); ``(0, 0)``
            when untiled.
        cell_tile: ``h*w`` ints (row-major), the crop index (``r * cols + c``) each packed cell came from.
    """

    grid: int
    tiled: bool
    tile_grid: tuple[int, int]
    packed: tuple[int, int]
    cell_tile: tuple[int, ...]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_image(cls, image_size: Sequence[int], *, grid_pinpoints: list, base_size: int, patch_size: int,
                   vision_aspect_ratio: str = "anyres_max_9", tiled: bool = True) -> "ImageLayout":
        grid = base_size // patch_size
        if not tiled:
            return cls(grid, False, (0, 0), (0, 0), ())
        orig_h, orig_w = int(image_size[0]), int(image_size[1])
        best_h, best_w = select_best_resolution([orig_h, orig_w], grid_pinpoints)
        rows, cols = best_h // base_size, best_w // base_size
        top, bottom, left, right = _unpadded_grid(orig_h, orig_w, rows * grid, cols * grid)
        src_h, src_w = bottom - top, right - left
        ratio = math.sqrt(src_h * src_w / (_max_views(vision_aspect_ratio) * grid * grid))
        out_h, out_w = (int(src_h // ratio), int(src_w // ratio)) if ratio > 1.1 else (src_h, src_w)
        # the centre of packed cell i sits at source coordinate (i + 0.5) * src / out (bilinear, no corners)
        ys = [top + min(src_h - 1, int((i + 0.5) * src_h / out_h)) for i in range(out_h)]
        xs = [left + min(src_w - 1, int((j + 0.5) * src_w / out_w)) for j in range(out_w)]
        cell_tile = tuple((y // grid) * cols + (x // grid) for y in ys for x in xs)
        return cls(grid, True, (rows, cols), (out_h, out_w), cell_tile)

    @classmethod
    def from_config(cls, config, image_size: Sequence[int], tiled: bool = True) -> "ImageLayout":
        """The layout ``VisorForConditionalGeneration.encode_images`` produces for one image."""
        return cls.from_image(
            image_size, grid_pinpoints=config.image_grid_pinpoints, base_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size, vision_aspect_ratio=config.vision_aspect_ratio, tiled=tiled,
        )

    # ------------------------------------------------------------------ queries
    @property
    def num_tiles(self) -> int:
        return self.tile_grid[0] * self.tile_grid[1]

    @property
    def num_units(self) -> int:
        """Budget units: the base view, then one per tile."""
        return 1 + self.num_tiles

    @property
    def num_tokens(self) -> int:
        h, w = self.packed
        return self.grid * self.grid + (h * (w + 1) if self.tiled else 1)

    @property
    def num_newlines(self) -> int:
        return self.packed[0] if self.tiled else 1

    def token_kinds(self, device=None) -> torch.Tensor:
        """[num_tokens] BASE / TILE / NEWLINE per token, in sequence order."""
        base = torch.full((self.grid * self.grid,), BASE, dtype=torch.long, device=device)
        if not self.tiled:
            return torch.cat([base, torch.tensor([NEWLINE], device=device)])
        h, w = self.packed
        rows = torch.full((h, w + 1), TILE, dtype=torch.long, device=device)
        rows[:, -1] = NEWLINE
        return torch.cat([base, rows.flatten()])

    def token_units(self, device=None) -> torch.Tensor:
        """[num_tokens] budget unit per token: 0 base view, 1 + tile index for tile cells, -1 newline."""
        base = torch.zeros(self.grid * self.grid, dtype=torch.long, device=device)
        if not self.tiled:
            return torch.cat([base, torch.tensor([-1], device=device)])
        h, w = self.packed
        cells = torch.tensor(self.cell_tile, dtype=torch.long, device=device).view(h, w) + 1
        return torch.cat([base, torch.cat([cells, cells.new_full((h, 1), -1)], dim=1).flatten()])

    def unit_sizes(self) -> list[int]:
        """Tokens in each unit (base view first; a tile the bilinear shrink left no cell to has 0)."""
        sizes = [self.grid * self.grid] + [0] * self.num_tiles
        for t in self.cell_tile:
            sizes[1 + t] += 1
        return sizes

    def base_region_of_tile(self, device=None) -> torch.Tensor:
        """[g*g] the tile whose area each base-view cell covers (the base view shows the whole image)."""
        rows, cols = self.tile_grid
        g = self.grid
        r = torch.arange(g, device=device) * rows // g
        c = torch.arange(g, device=device) * cols // g
        return (r[:, None] * cols + c[None, :]).flatten()
