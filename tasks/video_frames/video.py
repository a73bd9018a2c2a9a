"""Read frames of a local video at given times (decord, else PyAV), write small test videos, and
make synthetic event videos whose questions can only be answered by looking at the right frames.

Time model (both backends): the video is taken to have a constant frame rate ``fps``; frame ``i``
is shown at ``i / fps`` seconds after the first frame, ``duration_s = num_frames / fps``, and
the frame for a time ``t`` is the nearest one, ``clamp(floor(t * fps + 0.5), 0, num_frames - 1)``.
So decord and PyAV return the same frames for the same times (the tests check it).

Only local files are opened, and always through their resolved absolute path (so a name like
``http://...`` or ``concat:...`` can never be taken for an FFmpeg protocol). A missing, corrupt or
empty file raises ``DataError`` naming the path and the reader's error.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from mmpo.errors import DataError

BACKENDS = ("auto", "decord", "pyav")

# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def resize_longer(image: Image.Image, size: int | None) -> Image.Image:
    """``image`` resized (up or down) so its longer side is ``size`` px, aspect kept; as is for None."""
    if size is None:
        return image
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    w, h = image.size
    if max(w, h) == size:
        return image
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)


def _import_decord() -> Any:
    """``import decord``, after pygame's image module when pygame is installed: decord bundles a
    libpng that, loaded first, shadows the one of pygame's SDL_image, and every later
    ``pygame.image.load`` in the process fails ("Error reading the PNG file"; e.g. gymnasium's
    Pendulum render). Loaded in this order both work in one process (tested)."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import pygame.image  # noqa: F401
    except ImportError:
        pass
    import decord

    return decord


class _DecordBackend:
    name = "decord"

    def __init__(self, path: str, num_threads: int) -> None:
        decord = _import_decord()

        self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())

    def read(self, indices: list[int]) -> list[np.ndarray]:
        """Frames ``[H, W, 3]`` uint8 RGB of the sorted, unique ``indices``."""
        batch = self._vr.get_batch(indices).asnumpy()
        return [batch[k] for k in range(len(indices))]

    def close(self) -> None:
        self._vr = None


def _rgb(frame: Any) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of a PyAV frame: the pixels of ``frame.to_ndarray(format="rgb24")``,
    which is ~50x slower in PyAV 18 (4 ms for a 64 x 64 frame)."""
    return frame.reformat(format="rgb24").to_ndarray()


class _PyAVBackend:
    """Seeks to the key frame before each wanted frame and decodes forward; a frame's index is
    ``round((pts - start) * time_base * fps)``. Nearby wanted frames share one decoding pass."""

    name = "pyav"

    def __init__(self, path: str, num_threads: int) -> None:
        import av

        self._container = av.open(path)
        try:
            if not self._container.streams.video:
                raise DataError("no video stream")
            self._stream = stream = self._container.streams.video[0]
            stream.codec_context.thread_count = num_threads
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self._tb = float(stream.time_base) if stream.time_base else 0.0
            self._start = stream.start_time or 0
            n = int(stream.frames or 0)
            if n <= 0 and self.fps > 0:  # containers without a frame count (mkv, webm): estimate
                if stream.duration is not None and self._tb > 0:
                    n = round(stream.duration * self._tb * self.fps)
                elif self._container.duration is not None:
                    n = round(self._container.duration / 1_000_000 * self.fps)
            self.num_frames = n
        except BaseException:
            self._container.close()
            raise

    def _index(self, frame: Any, previous: int) -> int:
        if frame.pts is None or self._tb <= 0:
            return previous + 1
        return round((frame.pts - self._start) * self._tb * self.fps)

    def _seek(self, index: int) -> None:
        pts = self._start + int(index / self.fps / self._tb) if self._tb > 0 else self._start
        self._container.seek(max(pts, self._start), stream=self._stream, backward=True, any_frame=False)

    def read(self, indices: list[int]) -> list[np.ndarray]:
        """Frames of the sorted, unique ``indices``. A wanted index the stream skips gets the frame
        before it; past the real last frame (an estimated count), the last frame."""
        out: dict[int, np.ndarray] = {}
        gap = max(16, int(2 * self.fps))  # decode on rather than seek again when the next frame is this close
        pos = 0
        while pos < len(indices):
            self._seek(indices[pos])
            prev: Any = None
            idx, served = -1, False
            for frame in self._container.decode(self._stream):
                idx = self._index(frame, idx)
                while pos < len(indices) and indices[pos] < idx:  # skipped (or landed past it): nearest earlier
                    out[indices[pos]] = _rgb(prev if prev is not None else frame)
                    pos, served = pos + 1, True
                if pos < len(indices) and indices[pos] == idx:
                    out[idx] = _rgb(frame)
                    pos, served = pos + 1, True
                prev = frame
                if pos == len(indices) or (served and indices[pos] - idx > gap):
                    break
            else:  # end of stream: what is left gets the last frame
                if prev is None:
                    raise DataError(f"no frame decoded after seeking to frame {indices[pos]}")
                last = _rgb(prev)
                for k in indices[pos:]:
                    out[k] = last
                pos = len(indices)
        return [out[k] for k in indices]

    def close(self) -> None:
        self._container.close()


class VideoReader:
    """Frames of a local video at given times.

    ``backend``: ``"auto"`` (decord, falling back to PyAV when decord is not installed or cannot
    open or decode the file), ``"decord"`` or ``"pyav"``. Opening reads the header and decodes
    the first frame, so a corrupt file fails here with ``DataError`` rather than mid-rollout.
    Reads are serialized by a lock (one reader may be shared by threads). ``num_threads`` is the
    decoder's thread count (1 keeps many parallel rollouts from oversubscribing the CPUs).
    """

    def __init__(self, path: str | os.PathLike[str], *, backend: str = "auto", num_threads: int = 1) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._lock = threading.Lock()
        self._backend: _DecordBackend | _PyAVBackend | None = None
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: video file not found")
        resolved = str(self.path.resolve())  # absolute: never read as an FFmpeg protocol
        errors: list[str] = []
        order = ("decord", "pyav") if backend == "auto" else (backend,)
        for name in order:
            try:
                self._backend = self._open(name, resolved, num_threads)
                break
            except ImportError as e:
                errors.append(f"{name} is not installed ({_first_line(e)})")
            except (
                Exception
            ) as e:  # DataError from the checks; decord raises RuntimeError / DECORDError, PyAV FFmpegError
                errors.append(f"{name}: {_first_line(e)}")
        if self._backend is None:
            raise DataError(f"{self.path}: cannot read video: {'; '.join(errors)}")
        self.open_errors = errors  # why earlier backends were passed over (empty when the first worked)

    @staticmethod
    def _open(name: str, path: str, num_threads: int) -> _DecordBackend | _PyAVBackend:
        backend = _DecordBackend(path, num_threads) if name == "decord" else _PyAVBackend(path, num_threads)
        try:
            if backend.num_frames <= 0:
                raise DataError("the video has no frames")
            if not (backend.fps > 0 and math.isfinite(backend.fps)):
                raise DataError(f"the video has no usable frame rate ({backend.fps})")
            first = backend.read([0])[0]
            if first.ndim != 3 or first.shape[-1] != 3 or 0 in first.shape:
                raise DataError(f"first frame has shape {first.shape}, not [H, W, 3]")
        except BaseException:
            backend.close()
            raise
        return backend

    @property
    def backend(self) -> str:
        """The backend in use: ``"decord"`` or ``"pyav"``."""
        return self._require().name

    @property
    def fps(self) -> float:
        return self._require().fps

    @property
    def num_frames(self) -> int:
        return self._require().num_frames

    @property
    def duration_s(self) -> float:
        """``num_frames / fps``: the end of the last frame's display time."""
        return self.num_frames / self.fps

    def _require(self) -> _DecordBackend | _PyAVBackend:
        if self._backend is None:
            raise ValueError(f"{self.path}: VideoReader is closed")
        return self._backend

    def index_at(self, t_s: float) -> int:
        """The index of the frame nearest to ``t_s`` seconds, clamped into the video."""
        if not math.isfinite(t_s):
            raise ValueError(f"time must be finite, got {t_s}")
        return min(max(math.floor(t_s * self.fps + 0.5), 0), self.num_frames - 1)

    def time_of(self, index: int) -> float:
        """The time (s) frame ``index`` is shown at."""
        return index / self.fps

    def arrays_at(self, indices: list[int]) -> list[np.ndarray]:
        """Frames ``[H, W, 3]`` uint8 RGB at frame ``indices`` (any order, repeats allowed)."""
        unique = sorted(set(indices))
        if not unique:
            return []
        with self._lock:
            backend = self._require()
            if unique and not (0 <= unique[0] and unique[-1] < backend.num_frames):
                bad = unique[0] if unique[0] < 0 else unique[-1]
                raise IndexError(f"{self.path}: frame index {bad} outside 0..{backend.num_frames - 1}")
            try:
                frames = dict(zip(unique, backend.read(unique)))
            except DataError as e:
                raise DataError(f"{self.path}: cannot decode frames {unique[:4]}...: {e}") from e
            except Exception as e:  # decoder errors mid-file
                raise DataError(f"{self.path}: cannot decode frames ({backend.name}): {_first_line(e)}") from e
        return [frames[i] for i in indices]

    def frames_at(self, times_s: list[float], size: int | None = None) -> list[Image.Image]:
        """RGB frames nearest to ``times_s`` (seconds, clamped into the video), resized so the
        longer side is ``size`` px (aspect kept) unless ``size`` is None."""
        arrays = self.arrays_at([self.index_at(t) for t in times_s])
        return [resize_longer(Image.fromarray(a), size) for a in arrays]

    def close(self) -> None:
        """Release the file (waits for a read in progress). Reading afterwards raises ValueError."""
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._backend is None:
            return f"VideoReader({str(self.path)!r}, closed)"
        return f"VideoReader({str(self.path)!r}, {self.backend}, {self.num_frames} frames at {self.fps:g} fps)"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_video(
    frames: list[np.ndarray], path: str | os.PathLike[str], fps: float, *, crf: int = 18, gop: int | None = None
) -> Path:
    """Encode ``frames`` (each ``[H, W, 3]`` uint8 RGB, all one shape) as H.264 (libx264, yuv420p,
    constant ``fps``) with PyAV. yuv420p needs even sides: an odd height or width is padded by
    repeating the last row / column. ``gop``: key frame interval (x264's default, 250, when None).
    Written to a temporary name, then renamed into place; returns the path."""
    import av

    if not frames:
        raise ValueError("write_video: no frames")
    shape = frames[0].shape
    for k, f in enumerate(frames):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3 or f.shape != shape:
            raise ValueError(f"write_video: frame {k} is {f.dtype} {f.shape}; expected uint8 {shape} [H, W, 3]")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"write_video: fps must be > 0, got {fps}")
    h, w = shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix or '.mp4'}")
    from fractions import Fraction

    try:
        with av.open(str(tmp.resolve()), "w", format="mp4" if path.suffix in ("", ".mp4") else None) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = w + w % 2, h + h % 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            if gop is not None:
                stream.codec_context.gop_size = gop
            for f in frames:
                f = np.pad(f, pad, mode="edge") if (h % 2 or w % 2) else f
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Synthetic event videos
# ---------------------------------------------------------------------------------------------

#: saturated colours that survive H.264 / yuv420p; the background is mid grey
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
BACKGROUND = (128, 128, 128)
SHAPES = ("square", "circle", "triangle", "diamond")
QUESTION_KINDS = ("colour_at", "first_shape", "when_colour", "count")
LETTERS = "ABCDEFGH"
EVENT_S = 1.0  # how long a shape stays on screen
GRID_S = 0.5  # event starts lie on this grid, at least this far from each other and the ends
BOX_FRACTION = 0.6  # a shape's bounding box side over the frame side: every shape covers >= 1/6 of the frame
NOISE = 6  # per-pixel uniform noise amplitude, so consecutive frames differ


def nearest_color(rgb: Any) -> str:
    """The name of the palette colour (or ``"grey"`` for the background) nearest to ``rgb``."""
    value = np.asarray(rgb, dtype=np.float64).reshape(3)
    palette = {**COLORS, "grey": BACKGROUND}
    return min(palette, key=lambda name: float(np.sum((value - np.asarray(palette[name])) ** 2)))


def shape_mask(shape: str, box: int) -> np.ndarray:
    """``[box, box]`` bool mask of ``shape`` filling a square box (centre pixel always inside)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    c = (box - 1) / 2
    y, x = np.mgrid[0:box, 0:box].astype(np.float64)
    if shape == "square":
        return np.ones((box, box), dtype=bool)
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (box / 2) ** 2
    if shape == "diamond":
        return np.abs(x - c) + np.abs(y - c) <= box / 2
    # triangle: apex at the top middle, base along the bottom row
    return np.abs(x - c) <= (y + 0.5) / 2


def _fmt_s(t: float) -> str:
    return f"{t:.1f}"


def _event_times(rng: np.random.Generator, duration_s: float, num_events: int) -> list[float]:
    """Start times on the 0.5 s grid: events 1 s long, >= 0.5 s apart and from both ends."""
    free = duration_s - 2 * GRID_S - num_events * EVENT_S - (num_events - 1) * GRID_S
    if free < -1e-9:
        raise ValueError(f"{num_events} events of {EVENT_S} s do not fit in {duration_s} s")
    slack = int(math.floor(free / GRID_S + 1e-9))
    gaps = rng.multinomial(slack, [1 / (num_events + 1)] * (num_events + 1))
    starts, t = [], GRID_S
    for k in range(num_events):
        t += gaps[k] * GRID_S
        starts.append(round(float(t), 3))
        t += EVENT_S + GRID_S
    return starts


def _choice(
    rng: np.random.Generator, correct: str, options: list[str], *, keep_order: bool = False
) -> tuple[list[str], str]:
    if not keep_order:
        options = [options[k] for k in rng.permutation(len(options))]
    return options, LETTERS[options.index(correct)]


def event_questions(
    events: list[dict[str, Any]], duration_s: float, rng: np.random.Generator, *, shuffle_options: bool = True
) -> list[dict[str, Any]]:
    """One question of each kind in ``QUESTION_KINDS`` about ``events``, each ``{"kind", "question",
    "options", "answer" (letter), "answer_text"}``. Each needs the right frames: the colour shown
    at an event's middle, the shape of the earliest event, the 1 s window of a colour's event
    (distractor windows never overlap it), and how many shapes appear."""
    if not events:
        raise ValueError("event_questions: no events")
    out: list[dict[str, Any]] = []

    e = events[int(rng.integers(len(events)))]
    mid = (e["start_s"] + e["end_s"]) / 2
    options, answer = _choice(rng, e["color"], list(COLORS), keep_order=not shuffle_options)
    out.append(
        {
            "kind": "colour_at",
            "question": f"What colour is the shape shown at about {_fmt_s(mid)} s?",
            "options": options,
            "answer": answer,
            "answer_text": e["color"],
        }
    )

    first = min(events, key=lambda ev: ev["start_s"])
    options, answer = _choice(rng, first["shape"], list(SHAPES))
    out.append(
        {
            "kind": "first_shape",
            "question": "Which shape appears first?",
            "options": options,
            "answer": answer,
            "answer_text": first["shape"],
        }
    )

    e = events[int(rng.integers(len(events)))]
    correct = (e["start_s"], e["end_s"])
    windows = [(k * GRID_S, k * GRID_S + EVENT_S) for k in range(int((duration_s - EVENT_S) / GRID_S + 1e-9) + 1)]
    disjoint = [w for w in windows if w[1] <= correct[0] + 1e-9 or w[0] >= correct[1] - 1e-9]
    picks = [disjoint[k] for k in rng.permutation(len(disjoint))[:3]]
    spans = sorted([correct, *picks])
    labels = [f"{_fmt_s(a)}-{_fmt_s(b)} s" for a, b in spans]
    text = f"{_fmt_s(correct[0])}-{_fmt_s(correct[1])} s"
    options, answer = _choice(rng, text, labels, keep_order=True)
    out.append(
        {
            "kind": "when_colour",
            "question": f"At what time does the {e['color']} shape appear?",
            "options": options,
            "answer": answer,
            "answer_text": text,
        }
    )

    options, answer = _choice(rng, str(len(events)), [str(k) for k in range(1, len(SHAPES) + 1)], keep_order=True)
    out.append(
        {
            "kind": "count",
            "question": "How many shapes appear in the video?",
            "options": options,
            "answer": answer,
            "answer_text": str(len(events)),
        }
    )
    return out


def synthetic_event_video(
    path: str | os.PathLike[str],
    *,
    seed: int,
    duration_s: float = 8,
    fps: float = 4,
    size: int = 64,
    num_events: int = 3,
    shuffle_options: bool = True,
) -> dict[str, Any]:
    """Write a ``size`` x ``size`` clip of ``duration_s`` s at ``fps`` to ``path``: a grey background
    with per-frame noise where ``num_events`` (1..4) shapes, each of its own colour and shape, are
    shown for 1 s each at random, non-overlapping times (starts on a 0.5 s grid).

    Frame ``i`` shows event ``e`` when ``e.start_s <= i / fps < e.end_s``. Returns ``{"path",
    "fps", "duration_s", "num_frames", "size", "events", "questions"}``: events are ``{"start_s",
    "end_s", "color", "shape", "position"}`` with ``position = [x0, y0, x1, y1]`` the shape's
    bounding box in pixels (x1, y1 exclusive); questions come from :func:`event_questions`.
    """
    if not 1 <= num_events <= len(COLORS):
        raise ValueError(f"num_events must be in 1..{len(COLORS)}, got {num_events}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    if not (fps > 0 and duration_s > 0):
        raise ValueError(f"fps and duration_s must be > 0, got {fps} and {duration_s}")
    rng = np.random.default_rng(seed)
    starts = _event_times(rng, float(duration_s), num_events)
    colors = [list(COLORS)[k] for k in rng.permutation(len(COLORS))[:num_events]]
    shapes = [SHAPES[k] for k in rng.permutation(len(SHAPES))[:num_events]]
    box = int(round(BOX_FRACTION * size))
    events = []
    for start, color, shape in zip(starts, colors, shapes):
        x0, y0 = (int(v) for v in rng.integers(0, size - box + 1, size=2))
        events.append(
            {
                "start_s": float(start),
                "end_s": float(round(start + EVENT_S, 3)),
                "color": color,
                "shape": shape,
                "position": [x0, y0, x0 + box, y0 + box],
            }
        )

    num_frames = int(round(duration_s * fps))
    frames = []
    for i in range(num_frames):
        t = i / fps
        img = np.empty((size, size, 3), dtype=np.int16)
        img[:] = BACKGROUND
        for ev in events:
            if ev["start_s"] - 1e-9 <= t < ev["end_s"] - 1e-9:
                x0, y0, x1, y1 = ev["position"]
                region = img[y0:y1, x0:x1]
                region[shape_mask(ev["shape"], box)] = COLORS[ev["color"]]
        img += rng.integers(-NOISE, NOISE + 1, size=img.shape, dtype=np.int16)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    write_video(frames, path, fps)
    return {
        "path": str(path),
        "fps": float(fps),
        "duration_s": float(duration_s),
        "num_frames": num_frames,
        "size": size,
        "events": events,
        "questions": event_questions(events, float(duration_s), rng, shuffle_options=shuffle_options),
    }


def synthetic_dataset(
    folder: str | os.PathLike[str], n: int, seed: int, *, kinds: Sequence[str] = QUESTION_KINDS, **video_kwargs: Any
) -> list[dict[str, Any]]:
    """Write ``n`` synthetic event videos to ``folder/videos/`` and ``folder/qa.jsonl``, one question
    a video, the ``kinds`` taking turns (default: all of ``QUESTION_KINDS``). Rows: ``{"id", "video" (relative to
    ``folder``), "question", "options" (4; a ``when_colour`` question in a clip too short for three
    distractor windows has fewer), "answer" (letter), "events", "kind"}``; returned too.
    ``video_kwargs`` go to :func:`synthetic_event_video` (duration_s, fps, size, num_events)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unknown = sorted(set(kinds) - set(QUESTION_KINDS))
    if not kinds or unknown:
        raise ValueError(f"question kinds {unknown or list(kinds)} are not among {list(QUESTION_KINDS)}")
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"videos/synth_{i:05d}.mp4"
        video_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        info = synthetic_event_video(folder / rel, seed=video_seed, **video_kwargs)
        q = next(q for q in info["questions"] if q["kind"] == kinds[i % len(kinds)])
        rows.append(
            {
                "id": f"synth_{i:05d}",
                "video": rel,
                "question": q["question"],
                "options": q["options"],
                "answer": q["answer"],
                "events": info["events"],
                "kind": q["kind"],
            }
        )
    tmp = folder / f".qa.jsonl.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, folder / "qa.jsonl")
    return rows


__all__ = [
    "BACKGROUND",
    "COLORS",
    "QUESTION_KINDS",
    "SHAPES",
    "VideoReader",
    "event_questions",
    "nearest_color",
    "resize_longer",
    "shape_mask",
    "synthetic_dataset",
    "synthetic_event_video",
    "write_video",
]
