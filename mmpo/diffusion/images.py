"""Image outputs of a run: PNG grids (each cell readable: upscaled and captioned), written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from mmpo.captions import upscale, with_caption

#: a grid cell's shorter side is upscaled (nearest) to at least this many pixels
MIN_CELL_SIDE = 128


def save_image_grid(
    images: torch.Tensor,
    path: str | Path,
    *,
    captions: Sequence[Sequence[str]] | None = None,
    nrow: int = 0,
    padding: int = 2,
    min_side: int = MIN_CELL_SIDE,
) -> Path:
    """Write ``images [N, 3, H, W]`` (floats in [0, 1]) as one PNG grid, row-major, ``nrow`` per
    row (0 = about square), ``padding`` white pixels around and between the cells.

    Each image is enlarged by the integer factor ``k`` that brings its shorter side to at least
    ``min_side`` (nearest neighbour: a 16 px image becomes 128 px of 8x8 blocks); ``captions[i]``
    (lines of text, e.g. the prompt and the reward) go in a white band under cell ``i``, every band
    as tall as the longest caption. A cell is ``W*k`` x ``H*k + band``. Written to a temporary
    file and renamed, so a crash never leaves half a PNG."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = max((len(c) for c in captions), default=0) if captions is not None else 0
    cells = [
        with_caption(upscale(im, min_side), list(captions[i]) if captions is not None else [], num_lines=lines)
        for i, im in enumerate(to_pil(images))
    ]
    nrow = nrow or max(1, math.ceil(math.sqrt(len(cells))))
    rows = math.ceil(len(cells) / nrow)
    cw, ch = cells[0].size
    grid = Image.new("RGB", (nrow * cw + (nrow + 1) * padding, rows * ch + (rows + 1) * padding), (255, 255, 255))
    for i, cell in enumerate(cells):
        r, c = divmod(i, nrow)
        grid.paste(cell, (padding + c * (cw + padding), padding + r * (ch + padding)))
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def to_pil(images: torch.Tensor) -> list:
    """``images [N, 3, H, W]`` in [0, 1] as N PIL images (``W`` x ``H``)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


__all__ = ["MIN_CELL_SIDE", "save_image_grid", "to_pil"]
