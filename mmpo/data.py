"""Stateful, resumable prompt sampling over a task's training samples, and reading the records
of a data file (JSON / JSONL / Parquet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class PromptSampler:
    """Yields sample indices in a seeded random order, epoch after epoch, sharded by rank.

    The order of epoch ``e`` is a permutation drawn from ``seed + e``, so the position
    (``epoch``, ``pos``) is all the state needed for an exact resume.
    """

    def __init__(
        self, num_samples: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if num_samples < 1:
            raise ValueError("PromptSampler needs at least one sample")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def next(self, n: int) -> list[int]:
        """The next ``n`` indices for this rank (ranks take disjoint, interleaved slices)."""
        out: list[int] = []
        order = self._order()
        while len(out) < n:
            if self.pos >= self.num_samples:
                self.epoch += 1
                self.pos = 0
                order = self._order()
            if self.pos % self.world_size == self.rank:
                out.append(order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])


class RecordError(ValueError):
    """A record of a data file that could not be read; the message names its line."""


def read_records(path: str | Path, *, allow_object: bool = False) -> list[Any]:
    """The records of a ``.json`` (a list; also a single object when ``allow_object``), ``.jsonl``
    (a record a line; a line that is not JSON becomes a :class:`RecordError` in its place, so a
    caller can skip it and say which line) or ``.parquet`` file. A missing or unreadable file, or
    JSON of the wrong shape, raises DataError naming the file."""
    from mmpo.errors import DataError

    src = Path(path)
    if not src.is_file():
        raise DataError(f"{src}: file not found")
    suffix = src.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(src).to_pylist()
        text = src.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            rows: list[Any] = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        rows.append(RecordError(f"line {n}: not valid JSON ({e.msg})"))
            return rows
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{src}: not valid JSON: {e}") from None
    except Exception as e:  # OSError, UnicodeDecodeError, pyarrow errors
        raise DataError(f"{src}: cannot read: {e}") from None
    if isinstance(data, list):
        return data
    if allow_object:
        return [data]
    raise DataError(f"{src}: expected a JSON list of rows, got {type(data).__name__}")


def print_conversion_summary(stats: dict[str, Any], unit: str, shown: int = 5) -> None:
    """A data-prep converter's report: the first ``shown`` skipped records' errors (stderr), then
    ``<out>: N <unit>(s) written, M skipped``. ``stats`` holds ``out``, ``written`` and ``skipped``
    (a list of ``{"error": ...}``)."""
    import sys

    skipped = stats["skipped"]
    for s in skipped[:shown]:
        print(f"skipped: {s['error']}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"... and {len(skipped) - shown} more skipped", file=sys.stderr)
    print(f"{stats['out']}: {stats['written']} {unit}(s) written, {len(skipped)} skipped")
