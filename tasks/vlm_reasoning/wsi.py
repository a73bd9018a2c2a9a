"""Whole-slide image tiling: cut a slide level into tiles, keep the ones that show tissue.

A slide is read with OpenSlide when the ``openslide`` module is importable (every format it
knows: SVS, NDPI, MRXS, ...), otherwise with ``tifffile`` (pyramidal TIFF and Aperio SVS). With
tifffile, a tiled level is read tile by tile (only the TIFF tiles a region touches are decoded);
a level stored in strips is decoded whole, refused beyond ``MAX_DECODE_PIXELS``.

Tissue detection is the classic per-pixel test "saturated, not near-white, not black" (see
:func:`tissue_mask`): brightfield background is bright grey with almost no saturation, while
stained tissue (H&E, IHC) is coloured. Fixed thresholds are used rather than a per-tile Otsu
threshold, because Otsu on a tile that is all background (or all tissue) still splits it in two.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
from PIL import Image

from mmpo.errors import DataError

# A pixel is tissue when its HSV saturation (max-min)/max is at least this ...
MIN_SATURATION = 0.08
# ... its mean of R, G, B is below this (not near-white) ...
MAX_BRIGHTNESS = 235.0
# ... and its brightest channel is at least this (not black: dust, pen, out-of-scan areas).
MIN_VALUE = 25.0
# Largest level (width * height) decoded whole when it cannot be read tile by tile (~300 MB RGB).
MAX_DECODE_PIXELS = 100_000_000


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel tissue mask of an RGB image.

    Args:
        rgb: (H, W, 3) uint8 image (or floats in [0, 255]); a 4th (alpha) channel is ignored.
    Returns:
        (H, W) bool: saturation >= MIN_SATURATION and mean(R, G, B) < MAX_BRIGHTNESS and
        max(R, G, B) >= MIN_VALUE.
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    # per-channel planes: reductions over a last axis of length 3 are slow in numpy
    r, g, b = (arr[..., c].astype(np.float32) for c in range(3))
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    saturated = (mx - mn) >= MIN_SATURATION * mx  # (max - min) / max >= MIN_SATURATION
    not_white = (r + g + b) < 3.0 * MAX_BRIGHTNESS
    return saturated & not_white & (mx >= MIN_VALUE)


def tissue_fraction(rgb: np.ndarray) -> float:
    """Fraction in [0, 1] of the pixels of an (H, W, 3) RGB image that :func:`tissue_mask` calls tissue."""
    mask = tissue_mask(rgb)
    return float(mask.mean()) if mask.size else 0.0


class SlideLevel(Protocol):
    """One level of a slide: ``width`` x ``height`` pixels, read by region."""

    width: int
    height: int

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the region whose top-left corner is (x, y) in level pixels."""
        ...

    def close(self) -> None: ...


def _to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> (H, W, 3) uint8."""
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: pixels are {arr.dtype}; only 8-bit brightfield slides are supported")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return arr[..., :3]
    raise DataError(f"{path}: expected grey, RGB or RGBA pixels, got an array of shape {arr.shape}")


class _TiffLevel:
    """A level of a (pyramidal) TIFF read with tifffile; tiled pages are decoded tile by tile."""

    def __init__(self, path: Path, level: int, cache_tiles: int = 256) -> None:
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            levels = self._tif.series[0].levels
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
            raise DataError(f"{path}: cannot read as a TIFF/SVS slide: {e}") from e
        if not 0 <= level < len(levels):
            self._tif.close()
            raise DataError(f"{path}: level {level} does not exist (the slide has {len(levels)} level(s))")
        page = levels[level].keyframe
        self._page = page
        shape = page.shape
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self._tiled = (
            page.is_tiled
            and page.planarconfig == 1  # contiguous samples: one segment holds all channels
            and getattr(page, "imagedepth", 1) == 1
            and len(page.dataoffsets) == -(-self.width // page.tilewidth) * -(-self.height // page.tilelength)
        )
        # raw tile bytes come through our own handle: tifffile may move its own file position
        # when it loads tags lazily
        self._decode = page.decode
        self._raw = open(path, "rb")
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_tiles = cache_tiles
        self._full: np.ndarray | None = None
        if not self._tiled and self.width * self.height > MAX_DECODE_PIXELS:
            self.close()
            raise DataError(
                f"{path}: level {level} ({self.width}x{self.height}, shape {shape}) is not tiled, and decoding "
                f"it whole needs more than {MAX_DECODE_PIXELS:,} pixels; install openslide-python, or pick a "
                "smaller level"
            )

    def _tile(self, index: int) -> np.ndarray:
        """(tile_h, tile_w, C) pixels of TIFF tile ``index`` (row-major), edge tiles padded."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        page = self._page
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0:  # sparse tile: not written, reads as zeros
            tile = np.zeros((page.tilelength, page.tilewidth, page.samplesperpixel), page.dtype)
        else:
            self._raw.seek(offset)
            data = self._raw.read(count)
            try:
                seg, _, _ = self._decode(data, index, jpegtables=page.jpegtables)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{self.path}: cannot decode tile {index}: {e}") from e
            tile = np.asarray(seg).reshape(page.tilelength, page.tilewidth, -1)
        self._cache[index] = tile
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return tile

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise ValueError(f"region ({x}, {y}, {w}, {h}) outside the level ({self.width}x{self.height})")
        if not self._tiled:
            if self._full is None:
                try:
                    self._full = _to_rgb(self._page.asarray(), self.path)
                except DataError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise DataError(f"{self.path}: cannot decode the level: {e}") from e
            return self._full[y : y + h, x : x + w]
        page = self._page
        tw, th = page.tilewidth, page.tilelength
        across = -(-self.width // tw)
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = _to_rgb(self._tile(ty * across + tx), self.path)
                # overlap of the region and this tile, in level coordinates
                x0, x1 = max(x, tx * tw), min(x + w, (tx + 1) * tw)
                y0, y1 = max(y, ty * th), min(y + h, (ty + 1) * th)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw]
        return out

    def close(self) -> None:
        self._raw.close()
        self._tif.close()


class _OpenSlideLevel:
    """A level read with OpenSlide (``read_region`` takes level-0 coordinates)."""

    def __init__(self, path: Path, level: int) -> None:
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: OpenSlide cannot open the slide: {e}") from e
        if not 0 <= level < self._slide.level_count:
            n = self._slide.level_count
            self._slide.close()
            raise DataError(f"{path}: level {level} does not exist (the slide has {n} level(s))")
        self.level = level
        self.width, self.height = self._slide.level_dimensions[level]
        self._down = float(self._slide.level_downsamples[level])

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        loc = (int(round(x * self._down)), int(round(y * self._down)))
        rgba = self._slide.read_region(loc, self.level, (w, h))
        # transparent pixels (outside the scanned area) become white background
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))

    def close(self) -> None:
        self._slide.close()


def open_level(slide_path: str | os.PathLike[str], level: int = 0) -> SlideLevel:
    """Open one level of a slide: OpenSlide when importable, else tifffile.

    Raises DataError naming the path when the file is missing, unreadable or has no such level.
    """
    path = Path(slide_path)
    if not path.is_file():
        raise DataError(f"{path}: slide file not found")
    try:
        import openslide  # noqa: F401
    except ImportError:
        return _TiffLevel(path, level)
    return _OpenSlideLevel(path, level)


@dataclass(frozen=True)
class _Grid:
    width: int
    height: int
    size: int
    stride: int

    def positions(self) -> list[tuple[int, int]]:
        """Top-left corners (x, y) of the full tiles, row-major; partial tiles at the edges are left out."""
        ys = range(0, self.height - self.size + 1, self.stride)
        xs = range(0, self.width - self.size + 1, self.stride)
        return [(x, y) for y in ys for x in xs]


def iter_tiles(
    slide_path: str | os.PathLike[str], *, tile_size: int = 256, level: int = 0, stride: int | None = None
) -> Iterator[tuple[int, int, np.ndarray, float]]:
    """(x, y, pixels, tissue fraction) of every full tile of a slide level, row-major.

    ``x``, ``y``: top-left corner in level pixels, multiples of ``stride`` (default
    ``tile_size``); ``pixels``: (tile_size, tile_size, 3) uint8 RGB. The slide is opened with
    :func:`open_level` (DataError naming the path when it cannot be) and closed at the end.
    """
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    stride = tile_size if stride is None else stride
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    slide = open_level(slide_path, level)
    try:
        for x, y in _Grid(slide.width, slide.height, tile_size, stride).positions():
            rgb = slide.read(x, y, tile_size, tile_size)
            yield x, y, rgb, tissue_fraction(rgb)
    finally:
        slide.close()


def tile_slide(
    slide_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tile_size: int = 256,
    level: int = 0,
    stride: int | None = None,
    min_tissue: float = 0.5,
    max_tiles: int = 0,
) -> list[dict[str, Any]]:
    """Cut ``level`` of a slide into ``tile_size`` squares and keep those with enough tissue.

    Tiles start at multiples of ``stride`` (default ``tile_size``: no overlap) in level pixels;
    only full tiles are cut. A tile is kept when ``tissue_fraction`` (saturated, not near-white,
    not black pixels; see :func:`tissue_mask`) is at least ``min_tissue``. Kept tiles are
    written as PNG to ``out_dir/tiles/<slide stem>_L<level>_x<x>_y<y>.png`` and described, one JSON
    object a line, in ``out_dir/tiles.jsonl`` (rewritten each call): ``slide`` (the path as
    given), ``level``, ``x``, ``y`` (top-left corner in level pixels), ``size``,
    ``tissue_fraction``, ``path`` (relative to ``out_dir``). ``max_tiles > 0`` stops after that
    many kept tiles (row-major order).

    Returns:
        the rows of tiles.jsonl, in row-major order.
    Raises:
        DataError naming the path for a missing or unreadable slide, or a level it does not have.
    """
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    tiles = iter_tiles(slide_path, tile_size=tile_size, level=level, stride=stride)
    out = Path(out_dir)
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    stem = Path(slide_path).stem
    rows: list[dict[str, Any]] = []
    try:
        for x, y, rgb, frac in tiles:
            if frac < min_tissue:
                continue
            rel = f"tiles/{stem}_L{level}_x{x}_y{y}.png"
            Image.fromarray(rgb).save(out / rel)
            rows.append(
                {
                    "slide": str(slide_path),
                    "level": level,
                    "x": x,
                    "y": y,
                    "size": tile_size,
                    "tissue_fraction": round(frac, 6),
                    "path": rel,
                }
            )
            if max_tiles and len(rows) >= max_tiles:
                break
    finally:
        tiles.close()  # closes the slide
    tmp = out / "tiles.jsonl.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out / "tiles.jsonl")
    return rows
