"""Pictures people read: small images upscaled without blur and text drawn under them (Pillow).

Used by the diffusion evaluation grids (:mod:`mmpo.diffusion.images`) and the episode GIFs of
logged rollouts (:mod:`mmpo.rollout.episode_samples`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

#: the height of one line of caption text, in pixels
LINE_HEIGHT = 15
#: the text's margin inside a caption band, in pixels
MARGIN = 3


@lru_cache(maxsize=1)
def caption_font() -> Any:
    """Pillow's bundled font at 12 px (FreeType when Pillow has it, else its bitmap font): no file is read."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except (TypeError, OSError):  # a Pillow without FreeType
        return ImageFont.load_default()


def upscale_factor(width: int, height: int, min_side: int) -> int:
    """The integer factor that brings the shorter side to at least ``min_side`` (1 when it already is)."""
    return max(1, math.ceil(min_side / max(1, min(width, height))))


def upscale(image: Any, min_side: int) -> Any:
    """``image`` (PIL) enlarged by an integer factor with nearest-neighbour sampling (pixels stay sharp)."""
    from PIL import Image

    k = upscale_factor(image.width, image.height, min_side)
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.NEAREST)


def fit_text(text: str, width: int) -> str:
    """``text`` on one line cut to ``width`` pixels of the caption font (an ellipsis marks a cut)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = caption_font()
    text = " ".join(str(text).split())
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "…", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def wrap_text(text: str, width: int, max_lines: int) -> list[str]:
    """``text`` broken at spaces into at most ``max_lines`` lines of ``width`` pixels of the
    caption font; the last line is cut (:func:`fit_text`) when the text does not fit."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = caption_font()
    words = str(text).split()
    lines: list[str] = []
    while words and len(lines) < max_lines - 1:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        if draw.textlength(line, font=font) > width:  # one word wider than the line: cut it here
            line = fit_text(line, width)
        lines.append(line)
    if words:
        lines.append(fit_text(" ".join(words), width))
    return lines


def with_caption(image: Any, lines: Sequence[str], *, num_lines: int | None = None) -> Any:
    """A new RGB image: ``image`` above a white band holding ``lines`` (black text, each cut to the
    width). The band has room for ``num_lines`` lines (default ``len(lines)``), so frames of a GIF
    given the same ``num_lines`` keep one size."""
    from PIL import Image, ImageDraw

    n = len(lines) if num_lines is None else num_lines
    band = n * LINE_HEIGHT + 2 * MARGIN if n else 0
    out = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines[:n]):
        text = fit_text(line, image.width - 2 * MARGIN)
        draw.text((MARGIN, image.height + MARGIN + i * LINE_HEIGHT), text, fill=(0, 0, 0), font=caption_font())
    return out


def mark_point(image: Any, x: float, y: float, *, radius: int = 6) -> Any:
    """``image`` (PIL, changed in place and returned) with a red ring and dot at normalised ``(x, y)`` in [0, 1]^2."""
    from PIL import ImageDraw

    px, py = x * image.width, y * image.height
    draw = ImageDraw.Draw(image)
    draw.ellipse((px - radius, py - radius, px + radius, py + radius), outline=(255, 0, 0), width=2)
    draw.ellipse((px - 1.5, py - 1.5, px + 1.5, py + 1.5), fill=(255, 0, 0))
    return image


__all__ = [
    "LINE_HEIGHT",
    "MARGIN",
    "caption_font",
    "fit_text",
    "mark_point",
    "upscale",
    "upscale_factor",
    "with_caption",
    "wrap_text",
]
