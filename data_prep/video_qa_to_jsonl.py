"""Convert MVBench or Video-MME question files into the JSONL of the video_frames task.

    python data_prep/video_qa_to_jsonl.py mvbench  json/action_sequence.json --video-root VIDEOS --out OUT.jsonl
    python data_prep/video_qa_to_jsonl.py videomme videomme/test.parquet     --video-root VIDEOS --out OUT.jsonl
        [--no-check-videos]

Output rows (read back with ``mmpo_tasks.video_frames.data.load_video_qa``): ``{"id", "video"
(relative to the output file's folder when the video lies inside it, else absolute), "question", "options",
"answer" (letter), "meta"}``. A row that cannot be converted is skipped and reported (row number
counted from 1, its id, why); the output is written to a temporary file, then renamed into place.

Assumed layouts (nothing is downloaded; check against your copy):

- **MVBench** (OpenGVLab/MVBench, ``json/<task>.json``): a JSON list of ``{"video": "<path
  relative to the task's video folder>", "question": str, "candidates": [str, ...], "answer":
  "<the text of one candidate>"}``, optionally ``"start"`` / ``"end"`` (seconds; the tasks
  evaluated on a segment). ``--video-root`` is the folder the task's ``video`` paths are relative
  to (it differs per task, e.g. ``video/star/Charades_v1_480``). Tasks whose ``video`` is a folder
  of frames are not supported (those rows are skipped). No ids in the file: ``mvbench_<task
  file stem>_<row>``. ``meta``: ``{"source": "mvbench", "task", "start_s", "end_s"}``.
- **Video-MME** (lmms-lab/Video-MME, ``videomme/test-*.parquet``; a .json list or .jsonl of the
  same rows is accepted too): rows with ``"videoID"`` (the YouTube id, which names the file
  ``<videoID>.mp4`` in the released video archives) or, without it, ``"video_id"``;
  ``"question"``, ``"options": ["A. ...", "B. ...", ...]`` (the ``"A. "`` / ``"(A) "`` /
  ``"A) "`` prefix is removed when its letter matches the position), ``"answer": "A"``; optional
  ``"question_id"`` (the id; else ``videomme_<video>_<row>``), ``"duration"``, ``"domain"``,
  ``"sub_category"``, ``"task_type"`` (kept in ``meta``). The video is ``<video-root>/<id>.mp4``
  (``.mkv``, ``.webm``, ``.avi``, ``.mov`` are tried when the .mp4 is absent).

With the default video check, a row whose video file is not found is skipped (the files are not
decoded here; ``load_video_qa`` opens each one). ``--no-check-videos`` writes the paths as given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from mmpo.data import RecordError, print_conversion_summary, read_records
from mmpo.errors import DataError, MMPOError
from mmpo_tasks.video_frames.data import LETTERS, MAX_OPTIONS, MIN_OPTIONS, answer_letter

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
_PREFIX = re.compile(r"^\s*(?:\(([A-H])\)|([A-H])\s*[.):])\s*")


class _Skip(Exception):
    """A row that cannot be converted (the message says why)."""


def _str(rec: dict[str, Any], key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _Skip(f"key '{key}': must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _options(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not MIN_OPTIONS <= len(value) <= MAX_OPTIONS:
        raise _Skip(f"key '{key}': must be a list of {MIN_OPTIONS}..{MAX_OPTIONS} strings, got {value!r:.60}")
    if not all(isinstance(o, str) and o.strip() for o in value):
        raise _Skip(f"key '{key}': every option must be a non-empty string")
    return [o.strip() for o in value]


def _rel(video: Path, out_dir: Path) -> str:
    """``video`` relative to ``out_dir`` when it lies inside it, else absolute (the loader refuses a
    relative path that leaves the data file's folder)."""
    target, root = video.resolve(), out_dir.resolve()
    return target.relative_to(root).as_posix() if target.is_relative_to(root) else str(target)


def _write(rows: Iterator[dict[str, Any]] | list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _convert(src: Path, out: Path, make: Callable[[int, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    records = read_records(src)
    rows, skipped, ids = [], [], set()
    for n, rec in enumerate(records, 1):
        rid = None
        try:
            if isinstance(rec, RecordError):
                raise _Skip(str(rec))
            if not isinstance(rec, dict):
                raise _Skip(f"expected an object, got {type(rec).__name__}")
            row = make(n, rec)
            rid = row["id"]
            if rid in ids:
                raise _Skip(f"key 'id': {rid!r} repeats an earlier row's id")
        except _Skip as e:
            skipped.append({"row": n, "id": rid, "error": f"{src}: row {n}: {e}"})
            continue
        ids.add(rid)
        rows.append(row)
    if not rows:
        first = f"; first: {skipped[0]['error']}" if skipped else ""
        raise DataError(f"{src}: no row could be converted ({len(records)} read){first}")
    _write(rows, out)
    return {"out": str(out), "written": len(rows), "skipped": skipped}


def convert_mvbench(
    json_path: str | os.PathLike[str],
    video_root: str | os.PathLike[str],
    out_jsonl: str | os.PathLike[str],
    *,
    check_videos: bool = True,
) -> dict[str, Any]:
    """Convert one MVBench task file (layout: module docstring). Returns ``{"out", "written",
    "skipped": [{"row", "id", "error"}]}``; DataError when the file is unreadable or no row converts."""
    src, root, out = Path(json_path), Path(video_root), Path(out_jsonl)
    task = src.stem

    def make(n: int, rec: dict[str, Any]) -> dict[str, Any]:
        video_ref = _str(rec, "video")
        question = _str(rec, "question")
        options = _options(rec.get("candidates"), "candidates")
        answer = rec.get("answer")
        if not isinstance(answer, str) or answer.strip() not in options:
            raise _Skip(f"key 'answer': {answer!r:.60} is not one of the candidates")
        video = root / video_ref
        if check_videos:
            if video.is_dir():
                raise _Skip(f"key 'video': {video} is a folder of frames; only video files are supported")
            if not video.is_file():
                raise _Skip(f"key 'video': file not found: {video}")
        meta: dict[str, Any] = {"source": "mvbench", "task": task}
        for key, name in (("start", "start_s"), ("end", "end_s")):
            if isinstance(rec.get(key), (int, float)) and not isinstance(rec.get(key), bool):
                meta[name] = float(rec[key])
        return {
            "id": f"mvbench_{task}_{n - 1:05d}",
            "video": _rel(video, out.parent),
            "question": question,
            "options": options,
            "answer": LETTERS[options.index(answer.strip())],
            "meta": meta,
        }

    return _convert(src, out, make)


def _strip_prefixes(options: list[str]) -> list[str]:
    """``"A. text"`` -> ``"text"`` for every option whose prefix letter is its position's."""
    out = []
    for k, o in enumerate(options):
        m = _PREFIX.match(o)
        letter = m and (m.group(1) or m.group(2))
        out.append((o[m.end() :].strip() or o) if m and letter == LETTERS[k] else o)
    return out


def convert_videomme(
    src_path: str | os.PathLike[str],
    video_root: str | os.PathLike[str],
    out_jsonl: str | os.PathLike[str],
    *,
    check_videos: bool = True,
) -> dict[str, Any]:
    """Convert Video-MME rows (layout: module docstring). Returns like :func:`convert_mvbench`."""
    src, root, out = Path(src_path), Path(video_root), Path(out_jsonl)

    def make(n: int, rec: dict[str, Any]) -> dict[str, Any]:
        vid = rec.get("videoID") or rec.get("video_id")
        if not isinstance(vid, str) or not vid.strip() or "/" in vid or "\\" in vid or vid.strip() in (".", ".."):
            raise _Skip(f"key 'videoID' / 'video_id': must be a video name, got {vid!r:.60}")
        vid = vid.strip()
        question = _str(rec, "question")
        options = _strip_prefixes(_options(rec.get("options"), "options"))
        try:
            letter = answer_letter(rec.get("answer"), options)
        except ValueError as e:
            raise _Skip(f"key 'answer': {e}") from None
        video = root / f"{vid}.mp4"
        if check_videos:
            found = [root / f"{vid}{s}" for s in VIDEO_SUFFIXES if (root / f"{vid}{s}").is_file()]
            if not found:
                raise _Skip(f"key 'videoID': no video file {root / vid}{{{','.join(VIDEO_SUFFIXES)}}}")
            video = found[0]
        qid = rec.get("question_id")
        has_qid = isinstance(qid, (str, int)) and not isinstance(qid, bool) and str(qid).strip()
        rid = str(qid).strip() if has_qid else f"videomme_{vid}_{n - 1:05d}"
        meta = {"source": "videomme", "video_id": rec.get("video_id"), "videoID": rec.get("videoID")}
        meta.update({k: rec[k] for k in ("duration", "domain", "sub_category", "task_type") if k in rec})
        return {
            "id": rid,
            "video": _rel(video, out.parent),
            "question": question,
            "options": options,
            "answer": letter,
            "meta": meta,
        }

    return _convert(src, out, make)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("layout", choices=["mvbench", "videomme"], help="layout of SRC")
    p.add_argument("src", help="MVBench task .json, or Video-MME .parquet / .json / .jsonl")
    p.add_argument("--video-root", required=True, help="folder holding the videos (see the layouts above)")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--no-check-videos", action="store_true", help="do not check that the video files exist")
    a = p.parse_args(argv)
    convert = convert_mvbench if a.layout == "mvbench" else convert_videomme
    try:
        stats = convert(a.src, a.video_root, a.out, check_videos=not a.no_check_videos)
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_conversion_summary(stats, "row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
