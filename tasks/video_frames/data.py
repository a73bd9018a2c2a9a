"""Rows of the video QA task: multiple-choice questions about local video files.

A ``.jsonl`` file (one JSON object a line) or a ``.parquet`` file of rows::

    {"id": str | int, "video": "videos/x.mp4", "question": str,
     "options": [2..8 strings], "answer": "B" | "<the option's text>", ...}

``video`` is a local path, relative to ``video_root`` when given, else to the data file's folder
(its resolved target, symlinks followed, must lie inside that folder: :func:`mmpo.paths.contained_path`;
absolute paths are taken as they are; URLs are refused). ``answer`` is an option letter (``"B"``,
``"(B)"``, ``"B."``, upper case) or, failing that, the exact text of one option (then, if no
option matches exactly, a case-insensitive match that must be unique). A ``meta`` object (free-form)
and the optional ``events`` and ``kind`` (written by the synthetic set) are merged into the row's
``meta``. Any other key is unknown: a ``DataError`` naming the file, the line and the key (with the
closest known key), or a warning / nothing with ``unknown_keys`` warn / ignore
(:mod:`mmpo.data_rows`).

Every row is checked: keys, options, answer, and its video is opened once (header and first
frame, PyAV; each distinct file only once). A bad row does not stop the run: it is skipped and
recorded as ``{"line": n, "id": ..., "error": "<file>: line <n>: key '<k>': <why>", "reason": ...}``
(lines counted from 1; for Parquet, ``row <n>``, rows counted from 1; ``reason``: the short reason
the task's summary line counts). ``DataError`` is raised only when the file itself cannot be read,
a row has an unknown key (unless ``unknown_keys`` says otherwise) or no row is valid.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from mmpo.data import RecordError
from mmpo.data_rows import KeyCheck, iter_numbered_rows, skip_reason
from mmpo.errors import DataError
from mmpo.paths import PathRefused, contained_path
from mmpo_tasks.video_frames.video import VideoReader

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGH"
MIN_OPTIONS, MAX_OPTIONS = 2, 8
REQUIRED = ("id", "video", "question", "options", "answer")
#: optional keys, merged into the row's meta (``events`` and ``kind`` come from the synthetic set)
OPTIONAL = ("meta", "events", "kind")
_LETTER = re.compile(r"\(?([A-H])\)?\.?")


class _RowError(Exception):
    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"key '{key}': {why}")
        self.key, self.why = key, why


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def answer_letter(answer: Any, options: list[str]) -> str:
    """The option letter of ``answer`` (a letter, or an option's text; see the module docstring).
    Raises ValueError saying why when it names no option or more than one."""
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"must be an option letter or an option's text, got {_show(answer)}")
    text = answer.strip()
    m = _LETTER.fullmatch(text)
    if m and LETTERS.index(m.group(1)) < len(options):
        return m.group(1)
    for same in (lambda o: o == text, lambda o: o.casefold() == text.casefold()):
        hits = [k for k, o in enumerate(options) if same(o)]
        if len(hits) == 1:
            return LETTERS[hits[0]]
        if len(hits) > 1:
            raise ValueError(f"{_show(text)} matches options {', '.join(LETTERS[k] for k in hits)}; give the letter")
    raise ValueError(
        f"{_show(text)} is neither a letter A..{LETTERS[len(options) - 1]} nor one of the {len(options)} options"
    )


def _records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """``(unit, number from 1, record or _RowError)`` (:func:`~mmpo.data_rows.iter_numbered_rows`);
    DataError when the file is missing, unreadable or not ``.jsonl`` / ``.parquet``."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix.lower() not in (".jsonl", ".parquet"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")
    for unit, n, rec in iter_numbered_rows(path):
        yield unit, n, _RowError("<json>", str(rec)) if isinstance(rec, RecordError) else rec


def _text(rec: dict[str, Any], key: str) -> str:
    value = rec[key]
    if not isinstance(value, str) or not value.strip():
        raise _RowError(key, f"must be a non-empty string, got {_show(value)}")
    return value.strip()


def _options(value: Any) -> list[str]:
    if hasattr(value, "tolist"):  # a numpy array from pandas-written Parquet
        value = value.tolist()
    if not isinstance(value, list) or not MIN_OPTIONS <= len(value) <= MAX_OPTIONS:
        raise _RowError("options", f"must be a list of {MIN_OPTIONS}..{MAX_OPTIONS} strings, got {_show(value)}")
    for k, o in enumerate(value):
        if not isinstance(o, str) or not o.strip():
            raise _RowError("options", f"option {LETTERS[k]} must be a non-empty string, got {_show(o)}")
    return [o.strip() for o in value]


def _video_path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _RowError("video", f"must be a path to a video file, got {_show(value)}")
    ref = value.strip()
    if "://" in ref:
        raise _RowError("video", f"{_show(ref)}: must be a local file path, not a URL")
    p = Path(ref).expanduser()
    if p.is_absolute():
        return p
    try:
        return contained_path(base, p)  # symlinks followed: a link out of the folder is refused
    except PathRefused as e:
        raise _RowError("video", e.why) from None


def _probe(path: Path) -> dict[str, Any]:
    """fps, frame count and duration of ``path`` (opened once: header and first frame)."""
    # PyAV when installed: cheapest to open (decord reads every packet of the file to index it)
    backend = "pyav" if importlib.util.find_spec("av") is not None else "auto"
    with VideoReader(path, backend=backend) as reader:
        return {"fps": reader.fps, "num_frames": reader.num_frames, "duration_s": reader.duration_s}


def load_video_qa(
    path: str | os.PathLike[str],
    *,
    video_root: str | os.PathLike[str] | None = None,
    check_videos: bool = True,
    unknown_keys: str | KeyCheck = "error",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(rows, skipped)`` of a video QA file (layout and checks: module docstring).

    A row: ``{"id" (str), "video" (absolute path str), "question", "options", "answer" (letter),
    "answer_text", "duration_s", "fps", "num_frames", "meta"}`` (the video's numbers are None
    when ``check_videos`` is False, then only the file's existence is checked). ``skipped``:
    ``{"line", "id", "error", "reason"}`` for each row left out. ``unknown_keys`` (error | warn |
    ignore, or a :class:`~mmpo.data_rows.KeyCheck`): what a key not in the layout does.
    """
    path = Path(path)
    keys = KeyCheck.of(unknown_keys)
    allowed = (*REQUIRED, *OPTIONAL)
    base = Path(video_root).expanduser() if video_root is not None else path.parent
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    probed: dict[Path, dict[str, Any] | str] = {}
    total = 0
    for label, n, rec in _records(path):
        total += 1
        rid = rec.get("id") if isinstance(rec, dict) else None
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        if isinstance(rec, dict):
            keys.check(rec, allowed, path, f"{label} {n}")
        try:
            if isinstance(rec, _RowError):
                raise rec
            if not isinstance(rec, dict):
                raise _RowError("<row>", f"expected a JSON object, got {type(rec).__name__}")
            for key in REQUIRED:
                if key not in rec or rec[key] is None:
                    raise _RowError(key, "missing")
            if rid is None or not rid.strip():
                raise _RowError("id", f"must be a non-empty string or an integer, got {_show(rec['id'])}")
            if rid in seen_ids:
                raise _RowError("id", f"{_show(rid)} repeats the id of line {seen_ids[rid]}")
            question = _text(rec, "question")
            options = _options(rec["options"])
            try:
                letter = answer_letter(rec["answer"], options)
            except ValueError as e:
                raise _RowError("answer", str(e)) from None
            video = _video_path(rec["video"], base)
            if not video.is_file():
                raise _RowError("video", f"file not found: {video}")
            video = video.resolve()
            info: dict[str, Any] | str = {"fps": None, "num_frames": None, "duration_s": None}
            if check_videos:
                if video not in probed:
                    try:
                        probed[video] = _probe(video)
                    except DataError as e:  # the summary counts the reason before the ":", not the file
                        probed[video] = f"not a readable video: {e}"
                info = probed[video]
                if isinstance(info, str):
                    raise _RowError("video", info)
        except _RowError as e:
            skipped.append(
                {"line": n, "id": rid, "error": f"{path}: {label} {n}: {e}", "reason": skip_reason(e.key, e.why)}
            )
            continue
        seen_ids[rid] = n
        meta = dict(rec["meta"]) if isinstance(rec.get("meta"), dict) else {}
        meta.update({k: rec[k] for k in OPTIONAL if k in rec and k != "meta"})
        rows.append(
            {
                "id": rid,
                "video": str(video),
                "question": question,
                "options": options,
                "answer": letter,
                "answer_text": options[LETTERS.index(letter)],
                **info,
                "meta": meta,
            }
        )
    if not rows:
        first = f"; first: {skipped[0]['error']}" if skipped else ""
        raise DataError(f"{path}: no valid rows ({total} read, {len(skipped)} skipped){first}")
    if skipped:
        log.warning("skipped %d of %d rows in %s; first: %s", len(skipped), total, path, skipped[0]["error"])
    return rows, skipped


__all__ = ["LETTERS", "OPTIONAL", "REQUIRED", "answer_letter", "load_video_qa"]
