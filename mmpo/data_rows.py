"""Strict data rows, shared by every task's loaders.

- :func:`iter_rows` reads the records of a ``.jsonl`` / ``.json`` / ``.parquet`` file with their
  1-based place (``line N`` of a JSONL file, ``row N`` of a JSON list or a Parquet file).
- :class:`KeyCheck` checks a row's keys (and the keys of its nested mappings whose layout is known)
  against the keys its layout reads. What an unknown key does is ``task.unknown_keys``: ``error``
  (a :class:`~mmpo.errors.DataError` naming the file, the place, the key and the closest known
  key), ``warn`` (one line per distinct unknown key, then the key is ignored) or ``ignore``.
- :class:`LoadSummary` is the one line a task prints when it starts: rows loaded per split, rows
  held out for evaluation and why, rows skipped and why.

Lines go to stderr (stdout stays machine-readable: ``mmpo eval`` / ``mmpo bench`` print JSON
there) and only from the main process (``RANK`` / ``LOCAL_RANK`` 0), since every rank loads the
same data.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpo.core.registry import did_you_mean
from mmpo.errors import ConfigError, DataError


class RecordError(ValueError):
    """A record of a data file that could not be read; the message names its line."""


UNKNOWN_KEYS_MODES: tuple[str, ...] = ("error", "warn", "ignore")
_INDEX = re.compile(r"\[\d+\]")


def is_main_process() -> bool:
    """Whether this process is rank 0 (or runs without a launcher)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def main_print(text: str) -> None:
    """``text`` on stderr, from the main process only (above a progress bar, not through it)."""
    if is_main_process():
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)


# ---------------------------------------------------------------------------------------- reading


ROW_KINDS: tuple[str, ...] = ("jsonl", "json", "parquet")


def iter_numbered_rows(
    path: str | Path, *, kind: str | None = None, allow_object: bool = False
) -> Iterator[tuple[str, int, Any]]:
    """``(unit, n, record)`` of each row of a data file: :func:`iter_rows` with the place split
    into its unit (``"line"`` or ``"row"``) and its 1-based number, for a caller that keeps the
    number (e.g. in a skipped-row record)."""
    path = Path(path)
    if kind is not None and kind not in ROW_KINDS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(ROW_KINDS)} (or None: from the suffix)")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = kind or path.suffix.lower().lstrip(".")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=256)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        n = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # a corrupt page shows only when its batch is read
                raise DataError(f"{path}: not a readable Parquet file: {e}") from None
            for rec in batch.to_pylist():
                n += 1
                yield "row", n, rec
    elif kind == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON ({e}); a .json file holds a list of rows, use .jsonl for one row a line"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        if allow_object and isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows, got {type(data).__name__}")
        for n, rec in enumerate(data, 1):
            yield "row", n, rec
    elif kind == "jsonl":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield "line", n, json.loads(line)
            except json.JSONDecodeError as e:
                yield "line", n, RecordError(f"not valid JSON ({e.msg} at char {e.pos})")
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")


def iter_rows(path: str | Path, *, kind: str | None = None, allow_object: bool = False) -> Iterator[tuple[str, Any]]:
    """``(place, record)`` of each row of a ``.jsonl``, ``.json`` (a list) or ``.parquet`` file.

    ``place`` is ``"line N"`` for JSONL (the file's line, 1-based; blank lines are passed over) and
    ``"row N"`` for a JSON list or a Parquet file (1-based). A JSONL line that is not JSON yields a
    :class:`~mmpo.data.RecordError` in place of its record. DataError when the file is missing,
    unreadable or of another type. Parquet is read in record batches (a large shard is never whole
    in memory). ``kind`` (one of :data:`ROW_KINDS`) reads the file as that kind whatever its suffix
    (e.g. ``"jsonl"`` for a ``.json`` file of JSON lines); ``allow_object``: a ``.json`` file
    holding one object is one row.
    """
    for unit, n, rec in iter_numbered_rows(path, kind=kind, allow_object=allow_object):
        yield f"{unit} {n}", rec


# ------------------------------------------------------------------------------------- key check


class KeyCheck:
    """What the loaders of one task do with a row key its layout does not read (``mode``: one of
    :data:`UNKNOWN_KEYS_MODES`). One instance serves all files of a task, so ``warn`` reports each
    distinct key once per file (list indices in nested keys do not make a key distinct)."""

    def __init__(self, mode: str = "error") -> None:
        if mode not in UNKNOWN_KEYS_MODES:
            raise ConfigError(f"task.unknown_keys={mode!r}: use one of {', '.join(UNKNOWN_KEYS_MODES)}")
        self.mode = mode
        #: ``(file, key with list indices removed)`` already warned about
        self.warned: set[tuple[str, str]] = set()

    @classmethod
    def of(cls, value: str | KeyCheck) -> KeyCheck:
        """``value`` itself, or a new check of mode ``value``."""
        return value if isinstance(value, KeyCheck) else cls(value)

    def unknown(self, row: Mapping[Any, Any], allowed: Collection[str]) -> list[str]:
        """The keys of ``row`` not in ``allowed``, in row order."""
        return [str(k) for k in row if k not in allowed]

    def check(
        self,
        row: Mapping[Any, Any],
        allowed: Collection[str],
        file: str | Path,
        where: str,
        prefix: str = "",
        layout: str = "",
        noun: str = "key",
    ) -> None:
        """Check the keys of ``row`` (a record of ``file`` at ``where``, e.g. ``"line 3"``; or, with
        ``prefix`` such as ``"prompt[0]"``, a mapping nested in it) against ``allowed``; ``layout``
        (e.g. ``"llava layout"``) says in the error whose keys these are; ``noun``: what a key is
        called there (``"column"`` for a table)."""
        if self.mode == "ignore":
            return
        for key in self.unknown(row, allowed):
            name = f"{prefix}.{key}" if prefix else key
            hint = did_you_mean(key, sorted(allowed))
            if self.mode == "error":
                of = (f" of '{prefix}'" if prefix else "") + (f" ({layout})" if layout else "")
                raise DataError(
                    f"{file}: {where}: unknown {noun} '{name}'.{hint} Known {noun}s{of}: {', '.join(sorted(allowed))}. "
                    "Rename it, or set task.unknown_keys: warn (or ignore) to load the rows without it."
                )
            seen = (str(file), _INDEX.sub("[]", name))
            if seen not in self.warned:
                self.warned.add(seen)
                main_print(
                    f"warning: {file}: {where}: unknown {noun} '{name}' is ignored.{hint} "
                    f"(said once per {noun}; task.unknown_keys: ignore silences it)"
                )


# ----------------------------------------------------------------------------------- the summary


def skip_reason(key: str, why: str) -> str:
    """A short reason for counting skipped rows alike: the key without list indices and the start
    of ``why`` (up to a ``:``, ``(`` or ``, got``), e.g. ``("images[0]", "file not found: x.png")``
    -> ``"images: file not found"``."""
    short = re.split(r":|\(|, got", why, maxsplit=1)[0].strip() or why.strip()
    key = _INDEX.sub("", key).strip()
    return f"{key}: {short}" if key else short


@dataclass
class LoadSummary:
    """What a task loaded, printed as one line when it starts (:meth:`line`).

    ``splits``: rows (``unit``) per split, in order, e.g. ``{"train": 90, "eval": 10}`` (a string
    where the count is not fixed, e.g. ``"generated"``); ``held_out`` rows of the training data kept
    for evaluation and why (``held_out_why``, e.g. ``"eval_fraction=0.1 of task.train_file"``, or
    where the evaluation rows come from when none are held out); ``skipped``: reason -> rows;
    ``notes``: anything else worth the line (e.g. hours inserted into a time series).
    """

    task: str
    unit: str = "rows"
    splits: dict[str, int | str] = field(default_factory=dict)
    held_out: int = 0
    held_out_why: str = ""
    skipped: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, n: int = 1) -> None:
        """Count ``n`` skipped rows for ``reason``."""
        self.skipped[reason] += n

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def line(self) -> str:
        """E.g. ``vlm_reasoning data: train 90, eval 10 rows; 10 held out for evaluation
        (eval_fraction=0.1 of task.train_file); 2 skipped (images: file not found: 2)``."""
        splits = ", ".join(f"{name} {n}" for name, n in self.splits.items()) or "nothing"
        parts = [f"{self.task} data: {splits} {self.unit}"]
        why = f" ({self.held_out_why})" if self.held_out_why else ""
        parts.append(f"{self.held_out} held out for evaluation{why}")
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common())
            parts.append(f"{self.num_skipped} skipped ({reasons})")
        else:
            parts.append("0 skipped")
        parts.extend(self.notes)
        return "; ".join(parts)

    def print(self) -> None:
        """:meth:`line` on stderr, from the main process only."""
        main_print(self.line())


__all__ = [
    "ROW_KINDS",
    "UNKNOWN_KEYS_MODES",
    "KeyCheck",
    "LoadSummary",
    "is_main_process",
    "iter_numbered_rows",
    "iter_rows",
    "main_print",
    "skip_reason",
]
