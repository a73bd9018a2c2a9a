"""Stateful, resumable prompt sampling over a task's training samples, and reading the records
of a data file (JSON / JSONL / Parquet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmpo.data_rows import RecordError, iter_rows  # RecordError: re-exported (callers import it from here)


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


def read_records(path: str | Path, *, allow_object: bool = False) -> list[Any]:
    """The records of a ``.json`` (a list; also a single object when ``allow_object``), ``.jsonl``
    (a record a line; a line that is not JSON becomes a :class:`RecordError` in its place, naming
    its line, so a caller can skip it and say which line) or ``.parquet`` file; a file of another
    suffix is read as JSON. Read by :func:`mmpo.data_rows.iter_rows`. A missing or unreadable file,
    or JSON of the wrong shape, raises DataError naming the file."""

    suffix = Path(path).suffix.lower()
    kind = None if suffix in (".parquet", ".jsonl") else "json"
    return [
        RecordError(f"{place}: {rec}") if isinstance(rec, RecordError) else rec
        for place, rec in iter_rows(path, kind=kind, allow_object=allow_object)
    ]


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
