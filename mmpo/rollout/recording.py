"""Episode videos: frames ``[H, W, 3]`` uint8 -> an animated GIF (Pillow) or MP4 (PyAV), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write ``image [H, W, 3]`` uint8 as a PNG."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, format="PNG")


def save_episode_video(frames: Sequence[np.ndarray], path: str | Path, *, fps: int = 4) -> Path:
    """Write ``frames`` to ``path``: ``.gif`` with Pillow, ``.mp4`` (H.264) with PyAV.

    Frames of different sizes are not allowed; the file appears only once complete.
    """
    path = Path(path)
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    arrays = [np.asarray(f, dtype=np.uint8) for f in frames]
    if any(a.shape != arrays[0].shape or a.ndim != 3 or a.shape[-1] != 3 for a in arrays):
        raise ValueError(f"{path}: frames must all be [H, W, 3] of one size; got {sorted({a.shape for a in arrays})}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        if path.suffix.lower() == ".gif":
            from PIL import Image

            images = [Image.fromarray(a) for a in arrays]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        elif path.suffix.lower() == ".mp4":
            _write_mp4(arrays, tmp, fps)
        else:
            raise ValueError(f"{path}: unknown video format {path.suffix!r} (use .gif or .mp4)")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_mp4(arrays: list[np.ndarray], path: Path, fps: int) -> None:
    import av

    h, w = arrays[0].shape[:2]
    # H.264 with yuv420p needs even sides
    arrays = [a[: h - h % 2, : w - w % 2] for a in arrays]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for a in arrays:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


__all__ = ["save_episode_video"]
