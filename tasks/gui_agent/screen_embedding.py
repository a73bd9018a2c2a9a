"""Screen embeddings for ScreenExplorer's exploration rewards, with nothing to download.

ScreenExplorer embeds a screen twice: Cosmos-CI16x16 image tokens of the screenshot and a text
embedding of its OCR text. Neither model is available offline, so we substitute:

- :class:`ImageEmbedder`: the screenshot area-averaged to a ``grid x grid`` RGB thumbnail, each
  channel centred, L2-normalised (cosine similarity of two embeddings is then the correlation of
  the two thumbnails). A uniform screen has no layout and maps to the zero vector.
- :class:`TextEmbedder` (the core's :class:`mmpo.rewards.hardness.HashedTextEncoder`): feature
  hashing (signed, ``zlib.crc32``, stable across processes) of the lowercased word unigrams and
  character trigrams, L2-normalised. The screen's text is read from
  the MiniWoB DOM (:func:`dom_text`) instead of OCR, and the "OCR text under the click box" is
  :func:`text_under_box`.

Empty inputs (an empty text, a uniform image) give the zero vector; see
:func:`mmpo_tasks.gui_agent.exploration.cosine_sim` for how the rewards treat it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mmpo.rewards.hardness import HashedTextEncoder as TextEmbedder

# in float64 a uniform image centres to ~1e-16; a one-pixel change of one grey level is ~1e-5
_ZERO_NORM = 1e-9


class ImageEmbedder:
    """Screenshot ``[H, W, 3]`` uint8 -> unit vector ``[3 * grid * grid]`` float32 (zero for a
    uniform image)."""

    def __init__(self, grid: int = 16) -> None:
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid = grid

    @property
    def dim(self) -> int:
        return 3 * self.grid * self.grid

    def embed_one(self, image: np.ndarray) -> torch.Tensor:
        """``[H, W, 3]`` (uint8, 0..255) -> ``[D]`` float32, unit norm or zero."""
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"expected a [H, W, 3] image, got shape {a.shape}")
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64) / 255.0).permute(2, 0, 1)
        g = F.adaptive_avg_pool2d(x[None], self.grid)[0]  # [3, grid, grid], area averages
        g = g - g.mean(dim=(1, 2), keepdim=True)
        v = g.flatten()
        n = float(v.norm())
        if n <= _ZERO_NORM:
            return torch.zeros(self.dim, dtype=torch.float32)
        return (v / n).float()

    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``B`` screenshots (sizes may differ) -> ``[B, D]`` float32."""
        if len(images) == 0:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        return torch.stack([self.embed_one(im) for im in images])


def _num(v: Any) -> float:
    """A DOM coordinate: MiniWoB gives float32 arrays of shape ``[1]``; plain numbers work too."""
    return float(np.asarray(v, dtype=np.float64).reshape(-1)[0])


def _texts(el: dict[str, Any]) -> list[str]:
    """An element's visible strings: its text and, for inputs, its value (what OCR would read)."""
    out = []
    for key in ("text", "value"):
        s = " ".join(str(el.get(key) or "").split())
        if s:
            out.append(s)
    return out


def _visible(el: dict[str, Any]) -> bool:
    return _num(el.get("width", 0)) > 0 and _num(el.get("height", 0)) > 0


def dom_text(dom: Sequence[dict[str, Any]]) -> str:
    """The screen's text: the texts (and input values) of the DOM elements with a non-empty box,
    in DOM order, joined by spaces."""
    return " ".join(s for el in dom if _visible(el) for s in _texts(el))


def text_under_box(
    dom: Sequence[dict[str, Any]], x: float, y: float, screen_size: tuple[int, int], *, half_box: float = 0.0
) -> str:
    """Texts (and input values) of the elements whose box meets the click box, in DOM order.

    ``x, y`` are normalised to the screenshot (as in ``Action``); ``screen_size`` ``(width,
    height)`` in pixels maps them to DOM pixel coordinates (MiniWoB's screenshot and DOM share
    them). The click box is the point grown by ``half_box`` pixels each way; with 0 an element
    counts when it contains the point (edges included). No element -> ``""``.
    """
    px, py = x * screen_size[0], y * screen_size[1]
    out = []
    for el in dom:
        if not _visible(el):
            continue
        left, top = _num(el.get("left", 0)), _num(el.get("top", 0))
        right, bottom = left + _num(el["width"]), top + _num(el["height"])
        if left <= px + half_box and px - half_box <= right and top <= py + half_box and py - half_box <= bottom:
            out += _texts(el)
    return " ".join(out)


__all__ = ["ImageEmbedder", "TextEmbedder", "dom_text", "text_under_box"]
