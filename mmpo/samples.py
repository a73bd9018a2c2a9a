"""Logged rollouts: what the policy did at each step, in the run folder and the trackers.

A trainer hands :meth:`SampleLog.write` up to ``trainer.log_samples`` :class:`SampleRow` per step
(main rank). Each step becomes ``samples/step_<8-digit step>.parquet``, one row per rollout:

==============  ==============================================================================
column          content
==============  ==============================================================================
step            the training step (int)
prompt_id       the prompt's / context's id (str)
group           the group index within the step (int)
prompt          the prompt as text (images are in ``media``)
completion      what the policy produced: the completion text, an agent's turns with each tool
                call and result, a diffusion sample's description, an episode's action list
reward          the total reward (float)
advantage       the row's advantage (float; the mean over its units when they differ)
reward/<name>   one column per reward component (float)
media           paths relative to ``samples/``: ``media/step_<step>_<row>_<k>.png`` or ``.gif``
==============  ==============================================================================

Media given as a PIL image is saved as PNG; a list of PIL images as an animated GIF; a
matplotlib ``Figure`` as PNG. The same rows go to the trackers (:meth:`mmpo.tracking.Tracker.log_samples`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

SAMPLES_DIR = "samples"
MEDIA_DIR = "media"
#: the fixed columns of a samples Parquet file, in order (then ``reward/<name>``, then ``media``)
COLUMNS = ("step", "prompt_id", "group", "prompt", "completion", "reward", "advantage")
#: frames per second of episode GIFs
GIF_FPS = 4


@dataclass
class SampleRow:
    """One logged rollout. ``media`` items: a PIL image (PNG), a list of PIL images (GIF), a
    matplotlib Figure (PNG), or a path of an existing PNG/GIF/JPEG file (copied)."""

    prompt_id: str
    group: int
    prompt: str
    completion: str
    reward: float
    advantage: float
    components: dict[str, float] = field(default_factory=dict)
    media: list[Any] = field(default_factory=list)


def samples_file(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/samples/step_<8-digit step>.parquet``."""
    return Path(run_dir) / SAMPLES_DIR / f"step_{int(step):08d}.parquet"


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def save_media(item: Any, path_stem: Path) -> Path:
    """Write one media item next to ``path_stem`` (suffix chosen by its type); returns the path."""
    from PIL import Image

    if isinstance(item, Image.Image):
        path = path_stem.with_suffix(".png")
        item.save(path)
        return path
    if isinstance(item, (list, tuple)) and item and all(isinstance(f, Image.Image) for f in item):
        path = path_stem.with_suffix(".gif")
        frames = [f.convert("RGB") for f in item]
        frames[0].save(
            path, save_all=True, append_images=frames[1:], duration=int(1000 / GIF_FPS), loop=0, optimize=False
        )
        return path
    if hasattr(item, "savefig"):  # a matplotlib Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        path = path_stem.with_suffix(".png")
        if item.canvas is None or not isinstance(item.canvas, FigureCanvasAgg):
            FigureCanvasAgg(item)
        item.savefig(path, format="png")
        return path
    if isinstance(item, (str, Path)) and Path(item).is_file():
        import shutil

        suffix = Path(item).suffix.lower()
        if suffix not in (".png", ".gif", ".jpg", ".jpeg"):
            raise ValueError(f"logged media file {item} is not a PNG, GIF or JPEG")
        path = path_stem.with_suffix(suffix)
        shutil.copyfile(item, path)
        return path
    raise TypeError(f"cannot log media of type {type(item).__name__} (a PIL image, a list of them, a Figure or a file)")


def to_records(step: int, rows: Sequence[SampleRow], media: Sequence[list[str]]) -> list[dict[str, Any]]:
    """The Parquet rows of ``rows`` (``media[i]``: row i's paths relative to ``samples/``)."""
    names = sorted({k for r in rows for k in r.components})
    out = []
    for row, paths in zip(rows, media):
        record: dict[str, Any] = {
            "step": int(step),
            "prompt_id": str(row.prompt_id),
            "group": int(row.group),
            "prompt": str(row.prompt),
            "completion": str(row.completion),
            "reward": _finite(row.reward),
            "advantage": _finite(row.advantage),
        }
        for name in names:
            value = row.components.get(name)
            record[f"reward/{name}"] = None if value is None else _finite(value)
        record["media"] = list(paths)
        out.append(record)
    return out


class SampleLog:
    """Writes logged rollouts of one run (main rank; ``limit`` = ``trainer.log_samples``)."""

    def __init__(self, run_dir: str | Path, limit: int, tracker: Any = None) -> None:
        self.dir = Path(run_dir) / SAMPLES_DIR
        self.limit = int(limit)
        self.tracker = tracker

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def truncate(self, start_step: int) -> None:
        """Drop the files of steps after ``start_step`` (a resumed run redoes them)."""
        if not self.dir.is_dir():
            return
        for path in self.dir.glob("step_*.parquet"):
            if int(path.stem.removeprefix("step_")) > start_step:
                path.unlink()
        media = self.dir / MEDIA_DIR
        if media.is_dir():
            for path in media.glob("step_*"):
                if int(path.name.split("_")[1]) > start_step:
                    path.unlink()

    def write(self, step: int, rows: Sequence[SampleRow]) -> Path | None:
        """Save media and ``samples/step_<step>.parquet`` (atomic), then send the rows to the
        tracker; the first ``limit`` rows are kept. Returns the Parquet path (None when nothing
        was logged)."""
        rows = list(rows)[: self.limit]
        if not rows:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        media_dir = self.dir / MEDIA_DIR
        media_dir.mkdir(parents=True, exist_ok=True)
        media: list[list[str]] = []
        for i, row in enumerate(rows):
            paths = []
            for k, item in enumerate(row.media):
                path = save_media(item, media_dir / f"step_{int(step):08d}_{i:03d}_{k}")
                paths.append(path.relative_to(self.dir).as_posix())
            media.append(paths)
        records = to_records(step, rows, media)
        path = samples_file(self.dir.parent, step)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(pa.Table.from_pylist(records), tmp)
        os.replace(tmp, path)
        if self.tracker is not None:
            self.tracker.log_samples(step, records, self.dir)
        return path


def pick_sample_rows(group_ids: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` row indices to log from rollouts with group ids ``group_ids`` (rows of a group
    need not be adjacent): whole groups first, in order of first appearance, so the contrast within
    a group shows; then the first rows of the next group that does not fit whole. Sorted."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(int(g), []).append(i)
    chosen: list[int] = []
    rest: list[int] = []
    for members in groups.values():
        if len(chosen) + len(members) <= n:
            chosen += members
        elif not rest:
            rest = members
    chosen += rest[: max(0, n - len(chosen))]
    return sorted(chosen)


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every logged rollout of a run, in step order (``[]`` when none were logged)."""
    import pyarrow.parquet as pq

    folder = Path(run_dir) / SAMPLES_DIR
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("step_*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def samples_markdown(records: list[dict[str, Any]], max_chars: int = 400) -> str:
    """A markdown table of logged rollouts (prompt, completion, reward, advantage, components)."""

    def cell(value: Any) -> str:
        text = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        text = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
        return text.replace("|", "\\|").replace("\n", "<br>")

    extra = sorted({k for r in records for k in r if k.startswith("reward/")})
    head = ["prompt_id", "group", "prompt", "completion", "reward", "advantage", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(h)) for h in head) + " |" for r in records]
    return "\n".join(lines)


__all__ = [
    "SampleRow",
    "SampleLog",
    "samples_file",
    "save_media",
    "to_records",
    "read_samples",
    "pick_sample_rows",
    "COLUMNS",
]
