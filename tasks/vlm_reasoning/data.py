"""Rows of the ``vlm_reasoning`` task: read our JSONL and the layouts people already have.

Files: ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects), ``.parquet`` (pyarrow),
or a folder of such files (read in name order). Layouts, detected per file from its first row
(``format: auto``) or forced:

- ``mmpo`` (ours): ``{"id", "images": [...] | "image", "question", "options": [...] | null,
  "answer", "solution"?, "video"?, "meta"?}``.
- ``trl`` (TRL conversational rows): ``prompt`` = chat messages whose content is a string or a
  list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts; ``image`` (one) or
  ``images`` (list); the answer in ``solution`` or ``answer``.
- ``verl`` (verl / EasyR1 parquet): ``prompt`` (chat list, verl) or ``problem`` (string,
  EasyR1) with ``<image>`` placeholders; ``images``; ``reward_model: {"ground_truth": ...}``
  (verl) or ``answer`` (EasyR1).
- ``llava``: ``{"id", "image": str | [str], "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`` (the first human/gpt pair is used).

Images are a path (absolute, or relative to ``image_root`` when given, else to the data file's
folder; ``file://`` allowed), encoded bytes, ``{"bytes": ..., "path": ...}`` (how HF datasets
store images) or a ``data:image/...;base64,`` URI. They stay encoded in the rows and are decoded
when a prompt is built; at load every image (file or bytes) and video file is opened and its
header decoded (:mod:`mmpo.media_check`: a non-image, a truncated JPEG or a corrupt video is a bad
row, ``field 'images[0]': <path>: not a readable image: ...``).

Answers: a number becomes its text, a boolean ``yes``/``no``; an answer holding
``<answer>...</answer>`` or ``\\boxed{...}`` (a worked solution) is reduced to that content and
the full text kept as ``solution``. Multiple choice: an ``options`` (or ``choices``) list, or
option lines ``"A. ..."``, ``"(A) ..."``, ``"A) ..."``, ``"A: ..."`` in the question when the
answer is a single letter. A multiple-choice answer is stored as the option letter; the given
answer may be the letter (``"B"``, ``"(b)"``), the option's text or, with an options list, its
0-based index.

Strict keys: a row key its layout does not read (:data:`LAYOUT_KEYS`; nested: chat messages
``role``/``content``, content parts ``type``/``text``/``image``/``video``, ``reward_model``
``style``/``ground_truth``, LLaVA turns ``from``/``value``; ``meta`` and verl's ``extra_info`` are
free-form) raises ``DataError("<file>: line <n>: unknown key 'imgs'. Did you mean 'images'? ...")``
whatever ``skip_bad_rows`` says; ``unknown_keys`` (``task.unknown_keys``) turns it into a warning
or silence (:mod:`mmpo.data_rows`).

A bad row raises ``DataError("<file>: line <n>: field '<name>': <why>")`` (``line <n>`` of a JSONL
file, ``row <n>`` of a JSON list or a Parquet file; both counted from 1); with ``skip_bad_rows`` it
is skipped, counted by reason, and the loader logs once ``"skipped K of N rows in <file>: first:
<reason>"``.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from mmpo.core.registry import did_you_mean
from mmpo.data import RecordError
from mmpo.data_rows import KeyCheck, iter_rows, skip_reason
from mmpo.errors import DataError
from mmpo.media_check import MediaCache, MediaError, check_image
from mmpo.rewards import extract_answer_tag, normalize_answer

log = logging.getLogger(__name__)

FORMATS = ("auto", "mmpo", "trl", "verl", "llava")
ANSWER_TYPES = ("auto", "choice", "open")
SUFFIXES = (".jsonl", ".json", ".parquet")
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# "A. text", "A) text", "A: text", "(A) text" on a line of their own
_OPTION_LINE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])\s*[.):：])\s*(\S.*?)\s*$")
_LETTER_ANSWER = re.compile(r"\(?([A-Za-z])\)?\.?")

_COMMON_KEYS = ("id", "options", "choices", "meta", "data_source", "video")
#: the top-level keys each layout reads (``meta`` and ``extra_info`` are free-form mappings)
LAYOUT_KEYS: dict[str, frozenset[str]] = {
    "mmpo": frozenset({*_COMMON_KEYS, "images", "image", "question", "answer", "solution"}),
    "trl": frozenset({*_COMMON_KEYS, "prompt", "images", "image", "videos", "answer", "solution"}),
    # verl (geo3k, gsm8k, agent-loop layouts) and EasyR1 (problem / answer / images / videos)
    "verl": frozenset(
        {
            *_COMMON_KEYS,
            "prompt",
            "problem",
            "images",
            "image",
            "videos",
            "answer",
            "solution",
            "reward_model",
            "ability",
            "extra_info",
            "agent_name",
        }
    ),
    "llava": frozenset({*_COMMON_KEYS, "image", "images", "conversations"}),
}
MESSAGE_KEYS = frozenset({"role", "content"})
PART_KEYS = frozenset({"type", "text", "image", "video"})
REWARD_MODEL_KEYS = frozenset({"style", "ground_truth"})
TURN_KEYS = frozenset({"from", "value"})
#: keys that say the same thing: a row may give one of each pair
_SAME = (("images", "image"), ("options", "choices"), ("videos", "video"))


class RowError(Exception):
    """A problem with one field of one row (the loader adds the file and row)."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(f"field '{field_name}': {why}")
        self.field_name = field_name
        self.why = why


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """An image kept encoded: a file ``path`` or encoded ``data`` (PNG, JPEG, ...)."""

    path: Path | None = None
    data: bytes | None = None

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"<{len(self.data or b'')} bytes>"

    def load(self) -> Image.Image:
        """The decoded image in RGB. Raises DataError naming the path when it cannot be read."""
        try:
            img = Image.open(self.path) if self.path is not None else Image.open(io.BytesIO(self.data or b""))
            img.load()
            return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"image {self.describe()} cannot be read: {exc}") from None


@dataclass(frozen=True)
class VideoSource:
    """A video file (``path``) or its frames (``frames``, in order)."""

    path: Path | None = None
    frames: tuple[ImageSource, ...] = ()

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"{len(self.frames)} frames"

    def load(self, fps: float, max_frames: int) -> tuple[list[Image.Image], float]:
        """``(frames, frames per second)``: at most ``max_frames`` RGB frames, evenly spread.

        A video file is sampled at ``fps`` (PyAV decodes it; ``pip install av``), then thinned
        to ``max_frames``. Frames given as images are taken to be ``fps`` apart.
        """
        if self.path is None:
            keep = _spread(len(self.frames), max_frames)
            frames = [self.frames[k].load() for k in keep]
            return frames, fps * len(keep) / max(1, len(self.frames))
        try:
            import av
        except ImportError:
            raise DataError(f"video {self.path}: reading video files needs PyAV (pip install av)") from None
        frames, times, next_t = [], [], 0.0
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                for frame in container.decode(stream):
                    t = float(frame.time) if frame.time is not None else len(times) / fps
                    if t + 1e-6 >= next_t:
                        frames.append(frame.to_image().convert("RGB"))
                        times.append(t)
                        next_t = t + 1.0 / fps
        except (av.error.FFmpegError, IndexError, OSError) as exc:
            raise DataError(f"video {self.path} cannot be read: {exc}") from None
        if not frames:
            raise DataError(f"video {self.path} has no frames")
        keep = _spread(len(frames), max_frames)
        span = times[keep[-1]] - times[keep[0]]
        rate = (len(keep) - 1) / span if len(keep) > 1 and span > 0 else fps
        return [frames[k] for k in keep], rate


def _spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices evenly spread over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return [round(j * (n - 1) / (k - 1)) for j in range(k)]


@dataclass
class Row:
    """One question. ``answer`` is the option letter for multiple choice, else the answer text.

    ``question`` keeps ``<image>`` placeholders when the data had them (the template puts the
    images there when their count matches). ``options_in_question``: the options are already
    written in the question (parsed from its lines), so the template does not list them again.
    """

    id: str
    question: str
    answer: str
    images: list[ImageSource] = field(default_factory=list)
    options: list[str] | None = None
    options_in_question: bool = False
    solution: str | None = None
    video: VideoSource | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "<file>: line <n>" (or "row <n>"), for error messages

    @property
    def letters(self) -> list[str]:
        return list(LETTERS[: len(self.options)]) if self.options else []

    @property
    def answer_type(self) -> str:
        return "choice" if self.options else "open"


@dataclass
class LoadResult:
    """Rows read from one file (or folder), how many were seen and skipped, the first skip's
    message and the skipped rows counted by short reason (:func:`mmpo.data_rows.skip_reason`)."""

    rows: list[Row]
    total: int
    skipped: int = 0
    first_error: str | None = None
    skip_reasons: Counter[str] = field(default_factory=Counter)


# ---------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------


def data_files(path: str | Path) -> list[Path]:
    """The data files of ``path``: itself, or a folder's .jsonl/.json/.parquet files in name order."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{p}: folder holds no data files ({', '.join(SUFFIXES)})")
        return files
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{p}: unsupported file type '{p.suffix}' (use {', '.join(SUFFIXES)})")
    return [p]


def iter_records(path: Path, *, json_lines: bool = False) -> Iterator[tuple[int, Any]]:
    """``(row index from 0, record)`` of a .parquet, .jsonl, .json or .csv / .tsv file.

    A ``.json`` file holds a list of rows (``json_lines=True`` reads it as JSON lines, as HF
    exports do); a file of any other suffix is read as JSON lines; a JSONL line that is not JSON
    yields a RowError instead. All but CSV / TSV are read by :func:`mmpo.data_rows.iter_rows`
    (Parquet in record batches, so a large shard is never loaded whole).
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        kind = None if suffix == ".parquet" or (suffix == ".json" and not json_lines) else "jsonl"
        for i, (_, rec) in enumerate(iter_rows(path, kind=kind)):
            yield i, RowError("<json>", str(rec)) if isinstance(rec, RecordError) else rec
        return
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        for i, rec in enumerate(reader):
            yield i, {k.strip(): v for k, v in rec.items() if k is not None}


def detect_format(rec: dict[str, Any]) -> str | None:
    """The layout of a record from its keys, or None when it fits none."""
    if "conversations" in rec:
        return "llava"
    if "question" in rec:
        return "mmpo"
    if "reward_model" in rec or "problem" in rec:
        return "verl"
    if "prompt" in rec:
        return "trl"
    return None


# ---------------------------------------------------------------------------------------------
# Field helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class _Context:
    file: Path
    image_root: Path | None
    media: MediaCache = field(default_factory=MediaCache)

    def checked(self, path: Path, field_name: str, video: bool) -> Path:
        """``path`` after opening it and decoding its header (:mod:`mmpo.media_check`)."""
        try:
            self.media.check(path, video=video)
        except MediaError as exc:
            raise RowError(field_name, exc.naming(path)) from None
        return path

    def resolve(self, ref: str, field_name: str) -> Path:
        """An existing file for path ``ref`` (absolute; else under image_root, then the file's folder)."""
        ref = ref[len("file://") :] if ref.startswith("file://") else ref
        p = Path(ref).expanduser()
        if p.is_absolute():
            tried = [p]
        else:
            tried = ([self.image_root / p] if self.image_root is not None else []) + [self.file.parent / p]
        for cand in tried:
            if cand.is_file():
                return cand.resolve()
        raise RowError(field_name, f"file not found: {' or '.join(str(t) for t in tried)}")


def _check_bytes(data: bytes, field_name: str) -> None:
    try:
        check_image(data)
    except MediaError as exc:
        raise RowError(field_name, str(exc)) from None


def _image(entry: Any, field_name: str, ctx: _Context) -> ImageSource:
    if isinstance(entry, (bytes, bytearray, memoryview)):
        data = bytes(entry)
        _check_bytes(data, field_name)
        return ImageSource(data=data)
    if isinstance(entry, dict):
        if entry.get("bytes"):
            return _image(entry["bytes"], f"{field_name}.bytes", ctx)
        if entry.get("path"):
            return _image(entry["path"], f"{field_name}.path", ctx)
        raise RowError(field_name, "an image mapping needs non-empty 'bytes' or 'path'")
    if isinstance(entry, str) and entry.strip():
        ref = entry.strip()
        if ref.startswith(("http://", "https://")):
            raise RowError(field_name, f"remote image {ref!r}: nothing is downloaded, store the file locally")
        if ref.startswith("data:image"):
            try:
                data = base64.b64decode(ref.split("base64,", 1)[1])
            except (IndexError, ValueError):
                raise RowError(field_name, "a data: URI image must be base64 ('data:image/png;base64,...')") from None
            _check_bytes(data, field_name)
            return ImageSource(data=data)
        return ImageSource(path=ctx.checked(ctx.resolve(ref, field_name), field_name, video=False))
    raise RowError(field_name, f"an image must be a path, bytes or {{'bytes', 'path'}}, got {_show(entry)}")


def _images(value: Any, field_name: str, ctx: _Context) -> list[ImageSource]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [_image(v, f"{field_name}[{i}]", ctx) for i, v in enumerate(value)]
    return [_image(value, field_name, ctx)]


def _video(value: Any, field_name: str, ctx: _Context) -> VideoSource | None:
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        return VideoSource(path=ctx.checked(ctx.resolve(value, field_name), field_name, video=True))
    if isinstance(value, (list, tuple)):
        if len(value) < 2:
            raise RowError(field_name, f"a video given as frames needs at least 2 frames, got {len(value)}")
        return VideoSource(frames=tuple(_images(value, field_name, ctx)))
    raise RowError(field_name, f"a video must be a path or a list of frame paths, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 60 else text


def _text(value: Any, field_name: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError(field_name, "missing or empty")
    if not isinstance(value, str):
        raise RowError(field_name, f"must be a string, got {_show(value)}")
    return value.strip()


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _answer(value: Any, field_name: str) -> tuple[str, Any, str | None]:
    """``(answer text, raw value, solution)``: a worked solution is reduced to its final answer."""
    if isinstance(value, bool):
        return ("yes" if value else "no"), value, None
    if isinstance(value, (int, float)):
        return str(value), value, None
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, int, float)):
        return _answer(value[0], field_name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError(field_name, "missing or empty")
    if not isinstance(value, str):
        raise RowError(field_name, f"must be a string or a number, got {_show(value)}")
    text = value.strip()
    inner = extract_answer_tag(text)
    if inner is None:
        inner = _last_boxed(text)
    if inner is not None:
        if not inner:
            raise RowError(field_name, f"the final answer inside {_show(text)} is empty")
        return inner, value, text
    return text, value, None


def _strip_letter(answer: str) -> str | None:
    m = _LETTER_ANSWER.fullmatch(answer.strip())
    return m.group(1).upper() if m else None


def _options_in_text(question: str) -> list[str] | None:
    """Options written as lines "A. ..." (A, B, C, ... in order, at least 2) in the question."""
    found: list[str] = []
    for line in question.splitlines():
        m = _OPTION_LINE.match(line)
        if not m:
            continue
        letter = m.group(1) or m.group(2)
        if letter == LETTERS[len(found)]:
            found.append(m.group(3))
        elif letter == "A":  # a new list starts: keep the latest one
            found = [m.group(3)]
    return found if len(found) >= 2 else None


# ---------------------------------------------------------------------------------------------
# Layout converters: record -> raw fields (still unchecked for choice / answer consistency)
# ---------------------------------------------------------------------------------------------


def _chat_question(messages: Any, field_name: str) -> str:
    """The last user message of a chat list as text, image parts as ``<image>`` placeholders."""
    if isinstance(messages, str):
        return _text(messages, field_name)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowError(field_name, f"must be a list of chat messages or a string, got {_show(messages)}")
    users = [(i, m) for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RowError(field_name, "has no message with role 'user'")
    i, msg = users[-1]
    content = msg.get("content")
    where = f"{field_name}[{i}].content"
    if isinstance(content, str):
        return _text(content, where)
    if not isinstance(content, (list, tuple)):
        raise RowError(where, f"must be a string or a list of parts, got {_show(content)}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text") or ""))
        elif kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "video":
            pieces.append(VIDEO_PLACEHOLDER)
        else:
            raise RowError(where, f"unknown content part {_show(part)} (expected type text, image or video)")
    return _text("\n".join(pieces), where)


def _meta(rec: dict[str, Any]) -> dict[str, Any]:
    meta = rec.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise RowError("meta", f"must be a mapping, got {_show(meta)}")
    meta = dict(meta or {})
    if rec.get("data_source") and "source" not in meta:
        meta["source"] = rec["data_source"]
    return meta


def _from_mmpo(rec: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    key = "images" if "images" in rec else "image"
    okey = "choices" if "choices" in rec and "options" not in rec else "options"
    return {
        "question": _text(rec.get("question"), "question"),
        "answer": ("answer", rec.get("answer")),
        "images": _images(rec.get(key), key, ctx),
        "options": (okey, rec.get(okey)),
        "solution": rec.get("solution"),
        "video": _video(rec.get("video"), "video", ctx),
        "meta": _meta(rec),
    }


def _from_chat(rec: dict[str, Any], ctx: _Context, answer_keys: tuple[str, ...]) -> dict[str, Any]:
    if "prompt" in rec:
        question = _chat_question(rec["prompt"], "prompt")
    elif "problem" in rec:
        question = _text(rec["problem"], "problem")
    else:
        raise RowError("prompt", "missing (neither 'prompt' nor 'problem' is present)")
    answer: tuple[str, Any] | None = None
    for key in answer_keys:
        if key == "reward_model.ground_truth":
            rm = rec.get("reward_model")
            if isinstance(rm, dict) and rm.get("ground_truth") not in (None, ""):
                answer = (key, rm["ground_truth"])
        elif rec.get(key) not in (None, ""):
            answer = (key, rec[key])
        if answer is not None:
            break
    if answer is None:
        answer = (" or ".join(answer_keys), None)
    solution = rec.get("solution") if answer[0] != "solution" else None
    key = "images" if rec.get("images") is not None else "image"
    okey = "choices" if "choices" in rec and "options" not in rec else "options"
    return {
        "question": question,
        "answer": answer,
        "images": _images(rec.get(key), key, ctx),
        "options": (okey, rec.get(okey)),
        "solution": solution,
        "video": _video(rec.get("videos", rec.get("video")), "videos" if "videos" in rec else "video", ctx),
        "meta": _meta(rec),
    }


def _from_llava(rec: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RowError("conversations", f"must be a non-empty list of turns, got {_show(conv)}")
    q_i = next((i for i, t in enumerate(conv) if isinstance(t, dict) and t.get("from") in ("human", "user")), None)
    if q_i is None:
        raise RowError("conversations", "has no turn from 'human'")
    a_i = next(
        (
            i
            for i in range(q_i + 1, len(conv))
            if isinstance(conv[i], dict) and conv[i].get("from") in ("gpt", "assistant")
        ),
        None,
    )
    return {
        "question": _text(conv[q_i].get("value"), f"conversations[{q_i}].value"),
        "answer": (
            f"conversations[{a_i if a_i is not None else q_i + 1}].value",
            conv[a_i].get("value") if a_i is not None else None,
        ),
        "images": _images(rec.get("image", rec.get("images")), "image" if "image" in rec else "images", ctx),
        "options": ("options", rec.get("options")),
        "solution": None,
        "video": _video(rec.get("video"), "video", ctx),
        "meta": _meta(rec),
    }


def check_keys(rec: dict[str, Any], fmt: str, keys: KeyCheck, file: Path, where: str) -> None:
    """Check the keys of a ``fmt`` row and of its nested mappings whose layout is known (chat
    messages and their content parts, ``reward_model``, LLaVA turns) against :data:`LAYOUT_KEYS`."""
    keys.check(rec, LAYOUT_KEYS[fmt], file, where, layout=f"{fmt} layout")
    prompt = rec.get("prompt")
    if fmt in ("trl", "verl") and isinstance(prompt, (list, tuple)):
        for i, msg in enumerate(prompt):
            if not isinstance(msg, dict):
                continue
            keys.check(msg, MESSAGE_KEYS, file, where, f"prompt[{i}]", "chat message")
            content = msg.get("content")
            if isinstance(content, (list, tuple)):
                for j, part in enumerate(content):
                    if isinstance(part, dict):
                        keys.check(part, PART_KEYS, file, where, f"prompt[{i}].content[{j}]", "content part")
    if fmt == "verl" and isinstance(rec.get("reward_model"), dict):
        keys.check(rec["reward_model"], REWARD_MODEL_KEYS, file, where, "reward_model", f"{fmt} layout")
    if fmt == "llava" and isinstance(rec.get("conversations"), list):
        for i, turn in enumerate(rec["conversations"]):
            if isinstance(turn, dict):
                keys.check(turn, TURN_KEYS, file, where, f"conversations[{i}]", f"{fmt} layout")


def _convert(rec: Any, fmt: str, ctx: _Context) -> dict[str, Any]:
    if isinstance(rec, RowError):
        raise rec
    if not isinstance(rec, dict):
        raise RowError("<row>", f"a row must be a JSON object, got {_show(rec)}")
    for a, b in _SAME:
        if rec.get(a) is not None and rec.get(b) is not None:
            raise RowError(b, f"given together with '{a}'; a row gives one of them")
    if fmt == "mmpo":
        return _from_mmpo(rec, ctx)
    if fmt == "trl":
        return _from_chat(rec, ctx, ("solution", "answer"))
    if fmt == "verl":
        return _from_chat(rec, ctx, ("reward_model.ground_truth", "answer", "solution"))
    return _from_llava(rec, ctx)


def _build_row(rec: Any, i: int, where: str, fmt: str, ctx: _Context, answer_type: str) -> Row:
    """The row of record ``rec`` (the ``i``-th of its file, from 0: its default id) at ``where``."""
    raw = _convert(rec, fmt, ctx)
    answer_key, answer_value = raw["answer"]
    answer, original, solution = _answer(answer_value, answer_key)
    solution = raw["solution"] if raw["solution"] is not None else solution
    if solution is not None and not isinstance(solution, str):
        solution = str(solution)
    options_key, options = raw["options"]
    question = raw["question"]
    in_question = False
    if options is not None:
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, (str, int, float)) for o in options):
            raise RowError(options_key, f"must be a list of strings, got {_show(options)}")
        options = [str(o).strip() for o in options]
        if not 2 <= len(options) <= len(LETTERS):
            raise RowError(options_key, f"needs 2 to {len(LETTERS)} options, got {len(options)}")
        answer = _letter_for(answer, original, options, answer_key)
        if answer_type == "open":  # ask for the option's text instead
            answer, options = options[LETTERS.index(answer)], None
    elif answer_type != "open" and _strip_letter(answer) is not None:
        parsed = _options_in_text(question)
        letter = _strip_letter(answer)
        if parsed is not None and letter in LETTERS[: len(parsed)]:
            options, answer, in_question = parsed, letter, True
    if answer_type == "choice" and not options:
        raise RowError(
            options_key or "options",
            "answer_type is 'choice' but the row has no options list and no 'A. ...' option lines in its question",
        )
    row_id = rec.get("id") if isinstance(rec, dict) else None
    return Row(
        id=str(row_id) if row_id not in (None, "") else f"{ctx.file.stem}-{i}",
        question=question,
        answer=answer,
        images=raw["images"],
        options=list(options) if options else None,
        options_in_question=in_question,
        solution=solution,
        video=raw["video"],
        meta=raw["meta"],
        where=f"{ctx.file}: {where}",
    )


def _letter_for(answer: str, original: Any, options: list[str], field_name: str) -> str:
    """The option letter of ``answer``: a letter, an option's text, or (an int) an option index."""
    letters = LETTERS[: len(options)]
    letter = _strip_letter(answer)
    if letter is not None and letter in letters:
        return letter
    norm = normalize_answer(answer)
    for k, opt in enumerate(options):
        if normalize_answer(opt) == norm:
            return letters[k]
    if isinstance(original, int) and not isinstance(original, bool) and 0 <= original < len(options):
        return letters[original]
    raise RowError(
        field_name, f"{answer!r} is neither an option letter {letters[0]}-{letters[-1]} nor one of the options"
    )


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


def load_file(
    path: Path,
    *,
    format: str = "auto",
    image_root: str | Path | None = None,
    answer_type: str = "auto",
    skip_bad_rows: bool = False,
    max_rows: int = 0,
    unknown_keys: str | KeyCheck = "error",
) -> LoadResult:
    """Rows of one data file (see the module docstring). ``max_rows > 0`` stops after that many good
    rows; ``unknown_keys`` (error | warn | ignore, or a :class:`~mmpo.data_rows.KeyCheck`) is what a
    row key the layout does not read does."""
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; choose from {', '.join(FORMATS)}")
    if answer_type not in ANSWER_TYPES:
        raise DataError(f"unknown answer_type {answer_type!r}; choose from {', '.join(ANSWER_TYPES)}")
    keys = KeyCheck.of(unknown_keys)
    ctx = _Context(file=Path(path), image_root=Path(image_root).expanduser() if image_root else None)
    fmt = None if format == "auto" else format
    out = LoadResult(rows=[], total=0)
    for i, (where, rec) in enumerate(iter_rows(ctx.file)):
        if max_rows and len(out.rows) >= max_rows:
            break
        out.total += 1
        if fmt is None and isinstance(rec, dict):
            fmt = detect_format(rec)
            if fmt is None:
                markers = ["question", "prompt", "problem", "conversations", "reward_model"]
                hint = next((h for k in rec if (h := did_you_mean(str(k), markers))), "")
                raise DataError(
                    f"{ctx.file}: cannot tell the data layout from {where} (keys: {', '.join(map(str, rec))}); "
                    f"expected 'question' (mmpo), 'prompt' (trl/verl), 'problem' (EasyR1) or 'conversations' (llava), "
                    f"or set the task's format: mmpo|trl|verl|llava.{hint}"
                )
        if isinstance(rec, dict):
            check_keys(rec, fmt or "mmpo", keys, ctx.file, where)
        try:
            if isinstance(rec, RecordError):
                raise RowError("<json>", str(rec))
            out.rows.append(_build_row(rec, i, where, fmt or "mmpo", ctx, answer_type))
        except RowError as exc:
            message = f"{ctx.file}: {where}: {exc}"
            if not skip_bad_rows:
                raise DataError(message + " (set the task's skip_bad_rows: true to skip bad rows)") from None
            out.skipped += 1
            out.skip_reasons[skip_reason(exc.field_name, exc.why)] += 1
            out.first_error = out.first_error or message
    if out.skipped:
        log.warning("skipped %d of %d rows in %s: first: %s", out.skipped, out.total, ctx.file, out.first_error)
    if not out.rows:
        raise DataError(
            f"{ctx.file}: no usable rows"
            + (f" (all {out.total} were bad; first: {out.first_error})" if out.total else "")
        )
    return out


def load_rows(
    path: str | Path,
    *,
    format: str = "auto",
    image_root: str | Path | None = None,
    answer_type: str = "auto",
    skip_bad_rows: bool = False,
    max_rows: int = 0,
    unknown_keys: str | KeyCheck = "error",
) -> LoadResult:
    """Rows of a data file or of every data file in a folder (each detected on its own).

    ``max_rows > 0`` keeps only the first ``max_rows`` good rows in all. Raises DataError for a
    missing/unsupported file, an unknown key (unless ``unknown_keys`` is warn / ignore), a bad row
    (unless ``skip_bad_rows``) or no usable rows.
    """
    keys = KeyCheck.of(unknown_keys)
    out = LoadResult(rows=[], total=0)
    for f in data_files(path):
        left = max_rows - len(out.rows) if max_rows else 0
        if max_rows and left <= 0:
            break
        res = load_file(
            f,
            format=format,
            image_root=image_root,
            answer_type=answer_type,
            skip_bad_rows=skip_bad_rows,
            max_rows=left,
            unknown_keys=keys,
        )
        out.rows.extend(res.rows)
        out.total += res.total
        out.skipped += res.skipped
        out.skip_reasons.update(res.skip_reasons)
        out.first_error = out.first_error or res.first_error
    return out


__all__ = [
    "FORMATS",
    "ANSWER_TYPES",
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
    "LETTERS",
    "LAYOUT_KEYS",
    "ImageSource",
    "VideoSource",
    "Row",
    "LoadResult",
    "RowError",
    "check_keys",
    "data_files",
    "iter_records",
    "detect_format",
    "load_file",
    "load_rows",
]
