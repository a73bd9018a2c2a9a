"""Media checked at the door: every image or video a data row references is opened and its header
decoded when the rows are loaded, so a non-image named ``.png``, a truncated JPEG or a corrupt video
is found then (naming the file and the row) and not when the row is drawn mid-run.

- :func:`check_image` opens an image file (or encoded bytes) with PIL and runs ``verify()`` (for PNG
  this walks every chunk and checks its CRC, so a truncated PNG fails). ``verify()`` does not decode
  JPEG scan data, so a JPEG that does not end with its EOI marker (``FF D9``, trailing zero padding
  allowed) is decoded in full: a truncated one fails there, one with harmless bytes after its EOI
  (some cameras append data) passes. Cost: a header read for almost every file.
- :func:`check_video` opens a video file with PyAV, requires a video stream and decodes its first
  frame (a corrupt or empty container fails).
- :func:`check_media` picks one of the two by the file's suffix.

Each raises :class:`MediaError` (a ``ValueError``) with a short reason; the loaders turn it into
their row error (``DataError`` naming the file and the line, or a skipped, counted row with
``skip_bad_rows``). :func:`draw_samples` is the training-time half: a sample whose media fail when
it is drawn is dropped (replaced by the next drawn index) with a counted warning when the task skips
bad rows.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from mmpo.errors import DataError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_JPEG_EOI = b"\xff\xd9"
_TAIL = 64

T = TypeVar("T")


class MediaError(ValueError):
    """An image or video that cannot be read: ``reason`` (short, e.g. ``"not a readable image"``, what
    a load summary counts) and ``detail`` (the reader's words); the caller names the file and row."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail

    def naming(self, path: str | Path) -> str:
        """The message with ``path`` named after the reason: ``"<reason> (<path>): <detail>"``."""
        return f"{self.reason} ({path})" + (f": {self.detail}" if self.detail else "")


def _jpeg_ends_cleanly(tail: bytes) -> bool:
    return tail.rstrip(b"\x00").endswith(_JPEG_EOI)


def check_image(source: str | Path | bytes) -> tuple[int, int]:
    """``(width, height)`` of an image file or encoded bytes after the checks of the module
    docstring; MediaError saying why it is not a readable image."""
    from PIL import Image

    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
    reason = f"image bytes ({len(data)}) are not a readable image" if data is not None else "not a readable image"
    try:
        with Image.open(io.BytesIO(data) if data is not None else Path(source)) as im:
            fmt, size = im.format, im.size
            im.verify()
        if fmt == "JPEG":
            if data is not None:
                tail = data[-_TAIL:]
            else:
                with open(source, "rb") as f:
                    f.seek(0, 2)
                    f.seek(max(0, f.tell() - _TAIL))
                    tail = f.read()
            if not _jpeg_ends_cleanly(tail):
                with Image.open(io.BytesIO(data) if data is not None else Path(source)) as im:
                    im.load()  # no EOI at the end: decode it all; a truncated JPEG raises here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError is an OSError; PIL's verify() raises SyntaxError for a bad chunk
        raise MediaError(reason, str(e)) from None
    if 0 in size:
        raise MediaError(reason, f"its size is {size[0]}x{size[1]}")
    return size


def check_video(path: str | Path) -> int:
    """The frame count of a video file (from its header; 0 when the container does not say) after
    opening it with PyAV and decoding its first frame; MediaError saying why it cannot be read."""
    try:
        import av
    except ImportError:
        raise MediaError("cannot check a video", "reading video files needs PyAV (pip install av)") from None
    try:
        with av.open(str(Path(path).resolve())) as container:
            if not container.streams.video:
                raise MediaError("not a readable video", "it has no video stream")
            stream = container.streams.video[0]
            frames = int(stream.frames or 0)
            for _ in container.decode(stream):
                return frames
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        raise MediaError("not a readable video", str(e)) from None
    raise MediaError("not a readable video", "no frame could be decoded")


def check_media(path: str | Path) -> None:
    """:func:`check_video` for a file with a video suffix (:data:`VIDEO_SUFFIXES`), else
    :func:`check_image`."""
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        check_video(path)
    else:
        check_image(path)


class MediaCache:
    """Checks each distinct file once (many rows may show the same image); remembers the outcome."""

    def __init__(self) -> None:
        self._seen: dict[Path, MediaError | None] = {}

    def check(self, path: str | Path, video: bool | None = None) -> None:
        """:func:`check_media` (``video`` forces the kind); MediaError (the same one again for a
        file seen before)."""
        key = Path(path)
        if key not in self._seen:
            try:
                if video is True:
                    check_video(key)
                elif video is False:
                    check_image(key)
                else:
                    check_media(key)
                self._seen[key] = None
            except MediaError as e:
                self._seen[key] = e
        error = self._seen[key]
        if error is not None:
            raise MediaError(error.reason, error.detail)


# ---------------------------------------------------------------------------------- at draw time


def draw_samples(
    make: Callable[[int], T],
    indices: Iterable[int],
    more: Callable[[], int],
    *,
    skip_bad_rows: bool,
    warn: Callable[[str], None],
    max_extra: int = 64,
) -> tuple[list[T], int]:
    """``(samples, dropped)``: ``make(i)`` for each of ``indices``. When ``make`` raises DataError
    (an image vanished or became unreadable after loading): with ``skip_bad_rows`` the sample is
    dropped, ``warn`` gets one line naming it, and the index ``more()`` draws takes its place (so the
    step keeps its size; at most ``max_extra`` replacements, then DataError); without it, DataError
    saying how to go on. ``dropped`` counts the dropped samples."""
    out: list[T] = []
    dropped = 0
    pending = list(indices)
    while pending:
        i = pending.pop(0)
        try:
            out.append(make(i))
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(
                    f"training sample {i}: {e} (set the task's skip_bad_rows: true to drop such samples and go on)"
                ) from None
            dropped += 1
            if dropped > max_extra:
                raise DataError(f"{dropped} training samples could not be read this step; last: {e}") from None
            warn(f"warning: training sample {i} dropped from this step: {e}")
            pending.append(more())
    return out, dropped


def task_skips_bad_rows(task: Any) -> bool:
    """Whether ``task`` drops bad rows: its ``skip_bad_rows`` attribute, else its config's, else False."""
    value = getattr(task, "skip_bad_rows", None)
    if value is None:
        value = getattr(getattr(task, "config", None), "skip_bad_rows", False)
    return bool(value)


def warn_line(text: str) -> None:
    """``text`` on stderr above any progress bar, from every rank (a drop on rank 3 is said by rank 3)."""
    from mmpo.data_rows import is_main_process

    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    tqdm.write(text if is_main_process() else f"[rank {rank}] {text}", file=sys.stderr)


def draw_prompts(task: Any, sampler: Any, n: int) -> tuple[list[Any], int]:
    """``(samples, dropped)``: the task's next ``n`` training samples from ``sampler`` (a
    :class:`mmpo.data.PromptSampler`), a sample that fails to build dropped and replaced as in
    :func:`draw_samples` when the task skips bad rows (:func:`task_skips_bad_rows`). The replacements
    are drawn from the sampler, whose state the checkpoint keeps, so a resumed run draws the same.
    Afterwards ``sampler.last_indices`` ends with the indices of the returned samples, in order (a
    dropped sample's index replaced by its replacement's), for the rewards reported back to it."""
    before = list(getattr(sampler, "last_indices", []))
    kept: list[int] = []

    def make(i: int) -> Any:
        sample = task.train_sample(i)
        kept.append(i)
        return sample

    out = draw_samples(
        make, sampler.next(n), lambda: sampler.next(1)[0], skip_bad_rows=task_skips_bad_rows(task), warn=warn_line
    )
    if hasattr(sampler, "last_indices"):
        sampler.last_indices = before + kept
    return out


__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "MediaCache",
    "MediaError",
    "check_image",
    "check_media",
    "check_video",
    "draw_prompts",
    "draw_samples",
    "task_skips_bad_rows",
    "warn_line",
]
