"""Reading the records of a data file (JSON / JSONL / Parquet); the resumable prompt sampler
:class:`PromptSampler` lives in :mod:`mmpo.rollout.prompt_samplers`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpo.data_rows import RecordError, iter_rows  # RecordError: re-exported (callers import it from here)
from mmpo.rollout.prompt_samplers import PromptSampler  # noqa: F401  (re-exported: the ``uniform`` prompt sampler)


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
