"""Image outputs of a run: PNG grids written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def save_image_grid(images: torch.Tensor, path: str | Path, *, nrow: int = 0, padding: int = 2) -> Path:
    """Write ``images [N, 3, H, W]`` (floats in [0, 1]) as one PNG grid (``nrow`` per row; 0 = about
    square). Written to a temporary file and renamed, so a crash never leaves half a PNG."""
    from PIL import Image
    from torchvision.utils import make_grid

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def to_pil(images: torch.Tensor) -> list:
    """``images [N, 3, H, W]`` in [0, 1] as N PIL images."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


__all__ = ["save_image_grid", "to_pil"]
