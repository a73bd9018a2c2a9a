"""Converters from public pathology VQA layouts into the canonical JSONL of ``vlm_reasoning``.

Canonical row (one JSON object a line; image paths relative to the JSONL file's folder)::

    {"id": "pathvqa-train-000012", "images": ["images/pathvqa-train-000012.png"],
     "question": "...", "options": null | ["...", ...], "answer": "B" | "yes" | "free text",
     "meta": {"source": ..., ...}}

Images are re-encoded as RGB PNG under ``<out_dir>/images/``. Rows are numbered from 0 (the
first data row of a file, after a CSV header) in error messages:
``"<file>: row <i>: field '<f>': <why>"``. With ``skip_bad_rows=True`` such rows are left out
and counted instead (logged as a warning, with the first reason). The output JSONL is written
to a temporary file and renamed, so it is never half written.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmpo.errors import DataError
from mmpo_tasks.vlm_reasoning.data import RowError, iter_records

log = logging.getLogger(__name__)

OPTION_LETTERS = "ABCDE"
YES_NO = {"yes": "yes", "no": "no", "y": "yes", "n": "no", "true": "yes", "false": "no"}


@dataclass
class ConvertStats:
    """What a conversion wrote and skipped."""

    written: int = 0
    skipped: int = 0
    first_error: str | None = None
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- readers


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """(row number from 0, row dict) of a .parquet, .jsonl/.json (JSON lines) or .csv / .tsv file.

    A JSON line that does not parse, or is not an object, yields a RowError in place of the row.
    """
    if path.suffix.lower() not in (".parquet", ".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        raise DataError(f"{path}: unknown file type {path.suffix!r} (expected .parquet, .jsonl, .json or .csv)")
    for i, rec in iter_records(path, json_lines=True):
        yield i, rec if isinstance(rec, (dict, RowError)) else RowError("<line>", "not a JSON object")


# ---------------------------------------------------------------------------- fields


def _text(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        raise RowError(name, "missing")
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise RowError(name, f"expected text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise RowError(name, "empty")
    return text


def _decode_image(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise RowError(name, f"cannot decode the image bytes ({len(data)} bytes): {e}") from e
    return img


def _open_image_file(path: Path, name: str) -> Image.Image:
    if not path.is_file():
        raise RowError(name, f"image file {path} not found")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # noqa: BLE001
        raise RowError(name, f"cannot read image {path}: {e}") from e
    return img


def _b64(text: str, name: str) -> bytes:
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowError(name, f"not a readable path nor base64 image data: {e}") from e


def load_image(value: Any, base: Path, name: str = "image") -> Image.Image:
    """An image from a Hugging Face ``Image`` feature value or a path.

    Accepted: raw bytes; {"bytes": bytes | base64 str | None, "path": str | None} (bytes win,
    a path is resolved against ``base``); a str path (absolute or relative to ``base``); a
    ``data:`` URI or base64 string.
    """
    if value is None:
        raise RowError(name, "missing")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_image(bytes(value), name)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _decode_image(data if isinstance(data, (bytes, bytearray)) else _b64(str(data), name), name)
        if path:
            return _open_image_file(base / str(path), name)
        raise RowError(name, "neither 'bytes' nor 'path' is set")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise RowError(name, "empty")
        if text.startswith("data:"):
            return _decode_image(_b64(text, name), name)
        try:
            is_file = (base / text).is_file()
        except OSError:  # e.g. "File name too long": a base64 string
            is_file = False
        if not is_file and len(text) > 256:
            return _decode_image(_b64(text, name), name)
        return _open_image_file(base / text, name)
    raise RowError(name, f"expected image bytes, a {{'bytes', 'path'}} dict or a path, got {type(value).__name__}")


def save_png(img: Image.Image, path: Path) -> None:
    """Save as RGB PNG (palette, grey, CMYK, alpha are converted; alpha over white)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    img.convert("RGB").save(path, format="PNG")


# ---------------------------------------------------------------------------- writing


class _Writer:
    """Collects canonical rows for one output file; handles bad rows and the atomic write."""

    def __init__(self, out_path: Path, skip_bad_rows: bool, stats: ConvertStats | None = None) -> None:
        self.out_path = out_path
        self.skip = skip_bad_rows
        self.stats = stats if stats is not None else ConvertStats()
        self.lines: list[str] = []
        out_path.parent.mkdir(parents=True, exist_ok=True)
        (out_path.parent / "images").mkdir(exist_ok=True)

    def bad(self, src: Path, i: int, err: RowError) -> None:
        msg = f"{src}: row {i}: {err}"
        if not self.skip:
            raise DataError(msg)
        self.stats.skipped += 1
        self.stats.first_error = self.stats.first_error or msg
        if len(self.stats.errors) < 100:
            self.stats.errors.append(msg)

    def add(self, row: dict[str, Any]) -> None:
        self.lines.append(json.dumps(row, ensure_ascii=False))
        self.stats.written += 1

    def finish(self) -> Path:
        tmp = self.out_path.with_name(self.out_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in self.lines), encoding="utf-8")
        os.replace(tmp, self.out_path)
        if self.stats.skipped:
            log.warning(
                "%s: skipped %d bad row(s); first: %s", self.out_path, self.stats.skipped, self.stats.first_error
            )
        log.info("%s: wrote %d row(s)", self.out_path, self.stats.written)
        return self.out_path


def normalise_answer(answer: str) -> tuple[str, str]:
    """(answer, qtype): yes/no answers (any case, y/n, true/false) become 'yes'/'no' ('yes/no');
    others are kept as stripped free text ('open')."""
    key = answer.strip().lower().rstrip(".")
    if key in YES_NO:
        return YES_NO[key], "yes/no"
    return answer.strip(), "open"


def pathvqa_to_jsonl(
    src_files: Path | str | Iterable[Path | str],
    out_dir: Path | str,
    *,
    split_name: str,
    skip_bad_rows: bool = False,
    limit: int = 0,
    stats: ConvertStats | None = None,
) -> Path:
    """Convert PathVQA in the Hugging Face datasets layout into ``<out_dir>/<split_name>.jsonl``.

    Each source file (``.parquet`` shards, or JSON lines) holds rows with ``image`` (a HF Image
    value: {"bytes", "path"} or raw bytes; a path is relative to the source file), ``question``
    and ``answer``. Yes/no answers are normalised to "yes"/"no" (meta.qtype "yes/no"), others
    kept as free text (meta.qtype "open"); ``options`` is null. ``limit > 0`` stops after that
    many rows written. Images go to ``<out_dir>/images/pathvqa-<split>-<n>.png``. ``stats``, when
    given, is filled with the numbers of rows written and skipped.

    Raises:
        DataError "<file>: row <i>: field '<f>': <why>" on a bad row unless ``skip_bad_rows``.
    """
    if isinstance(src_files, (str, Path)):
        src_files = [src_files]
    sources = [Path(p) for p in src_files]
    if not sources:
        raise DataError("pathvqa_to_jsonl: no source files given")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split_name):
        raise DataError(f"split_name {split_name!r}: use letters, digits, '_', '-' or '.'")
    out = Path(out_dir)
    writer = _Writer(out / f"{split_name}.jsonl", skip_bad_rows, stats)
    n = 0
    for src in sources:
        if limit and n >= limit:
            break
        for i, row in iter_rows(src):
            if limit and n >= limit:
                break
            try:
                if isinstance(row, RowError):
                    raise row
                question = _text(row, "question")
                answer, qtype = normalise_answer(_text(row, "answer"))
                img = load_image(row.get("image"), src.parent)
            except RowError as e:
                writer.bad(src, i, e)
                continue
            rid = f"pathvqa-{split_name}-{n:06d}"
            rel = f"images/{rid}.png"
            save_png(img, out / rel)
            writer.add(
                {
                    "id": rid,
                    "images": [rel],
                    "question": question,
                    "options": None,
                    "answer": answer,
                    "meta": {"source": "pathvqa", "qtype": qtype, "file": src.name, "row": i},
                }
            )
            n += 1
    return writer.finish()


def _options(row: dict[str, Any]) -> list[str]:
    """The non-empty options A.. in order; an empty one followed by a set one is an error."""
    present = []
    for letter in OPTION_LETTERS:
        value = row.get(letter)
        text = "" if value is None else str(value).strip()
        present.append(text)
    last = max((k for k, t in enumerate(present) if t), default=-1)
    for k in range(last):
        if not present[k]:
            raise RowError(
                OPTION_LETTERS[k],
                f"empty, but option {OPTION_LETTERS[last]} is set (options must be A, B, ... without gaps)",
            )
    options = present[: last + 1]
    if len(options) < 2:
        raise RowError("B", f"a multiple-choice row needs at least options A and B, got {len(options)}")
    return options


def _answer_letter(row: dict[str, Any], options: list[str]) -> str:
    """The answer letter: 'B', 'b', '(B)', 'B.' or 'B)'; or the exact text of one option."""
    raw = _text(row, "answer")
    m = re.fullmatch(r"\(?([A-Ea-e])[).:]?", raw)
    if m:
        letter = m.group(1).upper()
        if OPTION_LETTERS.index(letter) >= len(options):
            raise RowError(
                "answer", f"{raw!r} names option {letter}, but only {OPTION_LETTERS[: len(options)]} are set"
            )
        return letter
    matches = [k for k, t in enumerate(options) if t.lower() == raw.lower()]
    if len(matches) == 1:
        return OPTION_LETTERS[matches[0]]
    raise RowError(
        "answer", f"{raw!r} is neither an option letter ({OPTION_LETTERS[: len(options)]}) nor the text of one option"
    )


def mcq_to_jsonl(
    src: Path | str,
    out_dir: Path | str,
    *,
    image_root: Path | str | None = None,
    skip_bad_rows: bool = False,
    stats: ConvertStats | None = None,
) -> Path:
    """Convert a multiple-choice pathology set (CSV, TSV or JSON lines) into ``<out_dir>/<src stem>.jsonl``.

    Columns: ``question``; options ``A``..``E`` (trailing ones may be empty or missing, at least
    A and B); ``answer`` (a letter, also "(B)"/"b."; or the exact text of one option); ``image``
    (a path relative to ``image_root``, default the source file's folder; in JSON lines also a
    list of paths). Optional ``solution`` (or ``explanation``) becomes ``solution``; an ``id``
    is kept as meta.source_id. Each distinct source image is written once as
    ``<out_dir>/images/<src stem>-<n>.png``. ``stats``, when given, is filled with the numbers
    of rows written and skipped.

    Raises:
        DataError "<file>: row <i>: field '<f>': <why>" on a bad row unless ``skip_bad_rows``;
        DataError naming the file when a required column is absent from a CSV header.
    """
    src = Path(src)
    if not src.is_file():
        raise DataError(f"{src}: file not found")
    base = Path(image_root) if image_root is not None else src.parent
    out = Path(out_dir)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.stem)
    writer = _Writer(out / f"{stem}.jsonl", skip_bad_rows, stats)
    written_images: dict[Path, str] = {}
    rows = iter_rows(src)
    if src.suffix.lower() in (".csv", ".tsv"):
        with open(src, encoding="utf-8-sig", newline="") as f:
            header = [
                h.strip() for h in next(csv.reader(f, delimiter="\t" if src.suffix.lower() == ".tsv" else ","), [])
            ]
        missing = [c for c in ("question", "A", "B", "answer", "image") if c not in header]
        if missing:
            raise DataError(f"{src}: missing column(s) {missing}; header is {header}")
    n = 0
    for i, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            question = _text(row, "question")
            options = _options(row)
            answer = _answer_letter(row, options)
            image_value = row.get("image")
            paths = image_value if isinstance(image_value, list) else [image_value]
            rels = []
            for k, p in enumerate(paths):
                if not isinstance(p, str) or not p.strip():
                    raise RowError("image", "missing or empty" if not p else f"expected a path, got {type(p).__name__}")
                source_path = (base / p.strip()).resolve()
                if source_path not in written_images:
                    img = _open_image_file(source_path, "image")
                    rel = f"images/{stem}-{len(written_images):06d}.png"
                    save_png(img, out / rel)
                    written_images[source_path] = rel
                rels.append(written_images[source_path])
        except RowError as e:
            writer.bad(src, i, e)
            continue
        meta: dict[str, Any] = {"source": stem, "row": i}
        if row.get("id") not in (None, ""):
            meta["source_id"] = row["id"]
        out_row: dict[str, Any] = {
            "id": f"{stem}-{n:06d}",
            "images": rels,
            "question": question,
            "options": options,
            "answer": answer,
        }
        solution = row.get("solution") or row.get("explanation")
        if isinstance(solution, str) and solution.strip():
            out_row["solution"] = solution.strip()
        out_row["meta"] = meta
        writer.add(out_row)
        n += 1
    return writer.finish()
