"""Frame tools of the video QA task: ``video_clip`` (a few small frames spread over a time range)
and ``frame_at`` (one larger frame), registered in ``mmpo.rollout.tools.TOOLS``.

The video a tool reads is ONLY ``context["video"]``, a local path the trainer set from the
dataset row; the arguments (model-generated, untrusted) are numbers and nothing else, and the
schemas refuse any other key (``"path"``, ``"url"``, ``"video"``...). Context keys read:
``video`` (path), ``clip_size`` (longer side of ``video_clip`` frames, default 112 px) and
``frame_size`` (``frame_at``, default 224 px).

A model mistake never raises: times outside ``[0, duration]`` (or absurd ones, 1e12, +-inf, an
integer beyond a float's range) are clamped and the returned text says so; ``end_s < start_s``, a
NaN (Python's ``json`` accepts ``NaN``), a ``num_frames`` above the cap, a missing or unreadable video each give
``ToolResult(error=True, text=<why>)``, shown to the model. Only programmer errors raise (a bad
``clip_size`` in the context, a non-path ``video``).

Open readers are kept in a small LRU :class:`ReaderCache` keyed by the context path (plus the
file's mtime and size), shared by both tools, so the calls of one rollout do not reopen the file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from mmpo.errors import DataError
from mmpo.rollout.tools import TOOLS, Tool, ToolResult
from mmpo_tasks.video_frames.video import VideoReader

log = logging.getLogger(__name__)

DEFAULT_CLIP_SIZE = 112
DEFAULT_FRAME_SIZE = 224


class ReaderCache:
    """At most ``maxsize`` open :class:`VideoReader` s, least recently used dropped first.

    Keyed by ``(path, mtime_ns, size)`` of the context path, so a file rewritten in place is
    reopened. A dropped reader is not closed here (another thread may still be reading it); it
    closes when the last reference goes. ``opens`` and ``hits`` count misses and hits.
    """

    def __init__(self, maxsize: int = 4, *, backend: str = "auto", num_threads: int = 1) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize, self.backend, self.num_threads = maxsize, backend, num_threads
        self._items: OrderedDict[tuple[str, int, int], VideoReader] = OrderedDict()
        self._lock = threading.Lock()
        self.opens = 0
        self.hits = 0

    def get(self, path: str | os.PathLike[str]) -> VideoReader:
        """The reader of ``path`` (opened on a miss); DataError when it is missing or unreadable."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise DataError(f"{path}: video file not found ({e.strerror})") from None
        key = (os.fspath(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            reader = self._items.get(key)
            if reader is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return reader
        reader = VideoReader(path, backend=self.backend, num_threads=self.num_threads)  # outside the lock
        with self._lock:
            self.opens += 1
            if key in self._items:  # another thread opened it meanwhile: keep one
                self._items.move_to_end(key)
                return self._items[key]
            self._items[key] = reader
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return reader

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: shared by the tools unless one is given its own
DEFAULT_CACHE = ReaderCache()


def fmt_time(t: float) -> str:
    """``1.0``, ``1.25``, ``0.03``: seconds to at most 2 decimals, at least one."""
    s = f"{t:.2f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _show(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return repr(value)[:40]
    return format(value, "g")


def _size(context: dict[str, Any], key: str, default: int) -> int:
    size = context.get(key, default)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"context[{key!r}] must be a positive integer (pixels), got {size!r}")
    return size


class _VideoTool(Tool):
    def __init__(self, cache: ReaderCache | None = None) -> None:
        self.cache = cache if cache is not None else DEFAULT_CACHE

    def _reader(self, context: dict[str, Any]) -> VideoReader | ToolResult:
        video = context.get("video")
        if video is None or video == "":
            return ToolResult(text=f"{self.name}: this sample has no video to read frames from", error=True)
        if not isinstance(video, (str, os.PathLike)):
            raise TypeError(f"context['video'] must be a path (str or PathLike), got {type(video).__name__}")
        try:
            return self.cache.get(Path(video))
        except DataError as e:
            log.warning("%s: %s", self.name, e)
            return ToolResult(
                text=f"{self.name}: the video of this sample cannot be read; no frames are available", error=True
            )

    def _number(self, arguments: dict[str, Any], key: str) -> float | ToolResult:
        value = arguments.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ToolResult(text=f"{self.name}: {key} must be a number of seconds, got {_show(value)}", error=True)
        try:
            number = float(value)
        except OverflowError:  # an integer beyond a float's range: as far as +-inf, clamped by the caller
            number = math.inf if value > 0 else -math.inf
        if math.isnan(number):
            return ToolResult(text=f"{self.name}: {key} must be a number of seconds, got NaN", error=True)
        return number

    @staticmethod
    def _clamp(key: str, value: float, duration: float, notes: list[str]) -> float:
        if value < 0:
            notes.append(f"{key}={_show(value)} clamped to 0.0 s")
            return 0.0
        if value > duration:
            notes.append(f"{key}={_show(value)} clamped to {fmt_time(duration)} s (the end of the video)")
            return duration
        return value

    def _frames(self, reader: VideoReader, indices: list[int], size: int) -> list[Any] | ToolResult:
        try:
            return reader.frames_at([reader.time_of(i) for i in indices], size)
        except DataError as e:
            log.warning("%s: %s", self.name, e)
            return ToolResult(text=f"{self.name}: these frames of the video cannot be decoded", error=True)


class VideoClipTool(_VideoTool):
    """``num_frames`` frames evenly spaced over ``[start_s, end_s]`` (both ends included; one frame
    in the middle when ``num_frames`` is 1) at ``context["clip_size"]`` px, with their times.
    Sample times falling on the same video frame give that frame once (the text says so)."""

    name = "video_clip"

    def __init__(self, max_frames: int = 8, default_frames: int = 4, cache: ReaderCache | None = None) -> None:
        super().__init__(cache)
        if not 1 <= default_frames <= max_frames:
            raise ValueError(
                f"video_clip: need 1 <= default_frames <= max_frames, got {default_frames} and {max_frames}"
            )
        self.max_frames, self.default_frames = max_frames, default_frames
        self.description = (
            "Look at a stretch of the video: returns num_frames small frames evenly spaced from start_s to "
            f"end_s (seconds, both included) with their timestamps. num_frames is 1..{max_frames} "
            f"(default {default_frames}). Use it to find when something happens."
        )
        self.parameters = {
            "type": "object",
            "properties": {
                "start_s": {"type": "number", "description": "start of the range, seconds from the beginning"},
                "end_s": {"type": "number", "description": "end of the range, seconds (>= start_s)"},
                "num_frames": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": max_frames,
                    "description": f"how many frames, 1..{max_frames} (default {default_frames})",
                },
            },
            "required": ["start_s", "end_s"],
            "additionalProperties": False,
        }

    def run(self, arguments: dict[str, Any], context: dict[str, Any]) -> ToolResult:
        start = self._number(arguments, "start_s")
        if isinstance(start, ToolResult):
            return start
        end = self._number(arguments, "end_s")
        if isinstance(end, ToolResult):
            return end
        if end < start:
            why = f"end_s={_show(end)} is before start_s={_show(start)}; give start_s <= end_s"
            return ToolResult(text=f"video_clip: {why}", error=True)
        n = arguments.get("num_frames", self.default_frames)
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int):
            return ToolResult(text=f"video_clip: num_frames must be an integer, got {_show(n)}", error=True)
        if not 1 <= n <= self.max_frames:
            why = f"num_frames={n} is outside 1..{self.max_frames} (at most {self.max_frames} frames a call)"
            return ToolResult(text=f"video_clip: {why}", error=True)
        size = _size(context, "clip_size", DEFAULT_CLIP_SIZE)
        reader = self._reader(context)
        if isinstance(reader, ToolResult):
            return reader

        duration = reader.duration_s
        notes: list[str] = []
        start = self._clamp("start_s", start, duration, notes)
        end = self._clamp("end_s", end, duration, notes)
        if n == 1 or end == start:
            times = [(start + end) / 2]
        else:
            times = [start + k * (end - start) / (n - 1) for k in range(n)]
        indices = list(dict.fromkeys(reader.index_at(t) for t in times))  # unique, in time order
        if len(indices) < n:
            notes.append(
                f"{n} frames asked; this range holds {len(indices)} distinct frame(s) "
                f"(the video has {reader.fps:g} frames per second)"
            )
        frames = self._frames(reader, indices, size)
        if isinstance(frames, ToolResult):
            return frames
        stamps = ", ".join(f"{fmt_time(reader.time_of(i))} s" for i in indices)
        head = "".join(f"{note}. " for note in notes)
        text = (
            f"{head}{len(frames)} frame(s) of {fmt_time(start)}-{fmt_time(end)} s, in order, at {stamps} "
            f"(the video is {fmt_time(duration)} s long)."
        )
        return ToolResult(text=text, images=frames)


class FrameAtTool(_VideoTool):
    """The frame nearest to ``t_s`` at ``context["frame_size"]`` px, with its time."""

    name = "frame_at"
    description = (
        "Look closely at one moment: returns the video frame nearest to t_s seconds, "
        "larger than video_clip's frames, with its timestamp."
    )
    parameters = {
        "type": "object",
        "properties": {"t_s": {"type": "number", "description": "time in seconds from the beginning"}},
        "required": ["t_s"],
        "additionalProperties": False,
    }

    def run(self, arguments: dict[str, Any], context: dict[str, Any]) -> ToolResult:
        t = self._number(arguments, "t_s")
        if isinstance(t, ToolResult):
            return t
        size = _size(context, "frame_size", DEFAULT_FRAME_SIZE)
        reader = self._reader(context)
        if isinstance(reader, ToolResult):
            return reader
        duration = reader.duration_s
        notes: list[str] = []
        t = self._clamp("t_s", t, duration, notes)
        index = reader.index_at(t)
        frames = self._frames(reader, [index], size)
        if isinstance(frames, ToolResult):
            return frames
        head = "".join(f"{note}. " for note in notes)
        text = f"{head}Frame at {fmt_time(reader.time_of(index))} s (the video is {fmt_time(duration)} s long)."
        return ToolResult(text=text, images=frames)


TOOLS.register("video_clip")(VideoClipTool)
TOOLS.register("frame_at")(FrameAtTool)

__all__ = ["DEFAULT_CACHE", "FrameAtTool", "ReaderCache", "VideoClipTool", "fmt_time"]
