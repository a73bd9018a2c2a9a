"""What a run report shows, read from the run folder (no HTML here).

- ``config.yaml``: the resolved config (text);
- ``metrics.jsonl``: every numeric metric per step (:func:`mmpo.tracking.read_metrics`);
- ``samples/step_*.parquet``: the logged rollouts (:func:`mmpo.samples.read_samples`);
- evaluation folders: every folder under the run with a ``metrics.json`` or ``predictions.jsonl``
  (the layout of :func:`mmpo.evaluate.write_evaluation`: ``mmpo eval``'s ``eval/``, ``eval_<name>/``,
  in-training ``eval/step_<8-digit step>/``), with its pictures.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpo.errors import ConfigError

#: folders of a run that hold no evaluation results (not searched)
SKIP_DIRS = frozenset({"checkpoints", "model", "samples", "tensorboard", "wandb", "mlruns", "trackio", "sft"})
PICTURE_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg")
#: an evaluation folder's images of its predictions rows (``mmpo.evaluate.MEDIA_DIR``)
EVAL_MEDIA_DIR = "media"
#: predictions rows shown per evaluation folder
PREDICTION_ROWS = 6
#: pictures shown per evaluation folder
PICTURES_PER_EVAL = 6
#: suffixes that name a statistic of a metric, not a category (``reward_std`` is not category ``std``)
STAT_WORDS = frozenset({"mean", "std", "min", "max", "median", "sum", "rate", "frac", "var", "abs", "total"})
_STEP_DIR = re.compile(r"step_(\d+)$")


@dataclass
class EvalFolder:
    """One evaluation folder of a run: ``path`` relative to the run folder (POSIX)."""

    path: str
    checkpoint: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    num_predictions: int
    pictures: list[str] = field(default_factory=list)  # relative to the run folder
    step: int | None = None  # in-training evaluations (``eval/step_<step>``)


@dataclass
class RunData:
    """Everything a report shows of one run folder."""

    run_dir: Path
    config_text: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    evals: list[EvalFolder]
    kind: str | None


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the records where it is a finite number."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if is_number(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def metric_keys(records: list[dict[str, Any]]) -> list[str]:
    """Every key logged as a number at least once, in first-seen order (``step`` excluded)."""
    seen: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and is_number(value):
                seen.setdefault(key, None)
    return list(seen)


def split_categories(names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split metric names into plain ones and per-category families.

    ``<metric>/<category>`` is category ``<category>`` of ``<metric>``; ``<metric>_<category>`` is
    one too when ``<metric>`` itself is a name and no word of ``<category>`` is a statistic
    (:data:`STAT_WORDS`): ``accuracy_colour`` next to ``accuracy``. Returns ``(plain, families)``
    with ``families[metric]`` the full names of its categories (the metric itself stays in plain).
    """
    present = set(names)
    families: dict[str, list[str]] = {}
    plain = []
    for name in names:
        base = None
        if "/" in name:
            base = name.split("/", 1)[0]
        else:
            for cut in [m.start() for m in re.finditer("_", name)]:
                head, tail = name[:cut], name[cut + 1 :]
                if head in present and not STAT_WORDS.intersection(tail.split("_")):
                    base = head
                    break
        if base is None:
            plain.append(name)
        else:
            families.setdefault(base, []).append(name)
    return plain, families


def category_of(base: str, name: str) -> str:
    """``accuracy/colour`` or ``accuracy_colour`` -> ``colour``."""
    return name[len(base) + 1 :]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None


def _read_predictions(path: Path, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The first ``limit`` rows of a predictions.jsonl file and its row count (a torn last line
    is skipped, as in metrics.jsonl)."""
    rows: list[dict[str, Any]] = []
    count = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            count += 1
            if len(rows) < limit and isinstance(row, dict):
                rows.append(row)
    return rows, count


def _eval_dirs(run_dir: Path) -> list[Path]:
    found = set()
    for name in ("metrics.json", "predictions.jsonl"):
        for path in run_dir.rglob(name):
            rel = path.relative_to(run_dir).parts
            if rel and rel[0] in SKIP_DIRS:
                continue
            found.add(path.parent)
    return list(found)


def _sort_key(run_dir: Path, folder: Path) -> tuple[int, int, str]:
    match = _STEP_DIR.match(folder.name)
    if match:
        return (0, int(match.group(1)), str(folder))
    return (1, 0, folder.relative_to(run_dir).as_posix())


def read_eval_folder(run_dir: Path, folder: Path) -> EvalFolder:
    """One evaluation folder: metrics, the first predictions rows and up to
    :data:`PICTURES_PER_EVAL` pictures (in the folder and one level down). The step is the one
    in ``metrics.json`` (in-training evaluations) or in the folder's name."""
    metrics: dict[str, float] = {}
    checkpoint = ""
    match = _STEP_DIR.match(folder.name)
    step = int(match.group(1)) if match else None
    if (folder / "metrics.json").is_file():
        data = _read_json(folder / "metrics.json")
        if isinstance(data, dict):
            checkpoint = str(data.get("checkpoint") or "")
            step = int(data["step"]) if is_number(data.get("step")) else step
            metrics = {str(k): float(v) for k, v in data.items() if is_number(v) and k != "step"}
    predictions: list[dict[str, Any]] = []
    count = 0
    if (folder / "predictions.jsonl").is_file():
        predictions, count = _read_predictions(folder / "predictions.jsonl", PREDICTION_ROWS)
    # the evaluator's pictures; media/ holds the predictions rows' own images (shown with the rows)
    pictures = sorted(p for p in folder.glob("*") if p.suffix.lower() in PICTURE_SUFFIXES)
    pictures += sorted(
        p for p in folder.glob("*/*") if p.suffix.lower() in PICTURE_SUFFIXES and p.parent.name != EVAL_MEDIA_DIR
    )
    return EvalFolder(
        path=folder.relative_to(run_dir).as_posix(),
        checkpoint=checkpoint,
        metrics=metrics,
        predictions=predictions,
        num_predictions=count,
        pictures=[p.relative_to(run_dir).as_posix() for p in pictures[:PICTURES_PER_EVAL]],
        step=step,
    )


def read_run(run_dir: str | Path, kind: str | None = None) -> RunData:
    """Read everything a report shows. ConfigError when ``run_dir`` is not a run folder (it has
    neither ``config.yaml`` nor ``metrics.jsonl``)."""
    import yaml

    from mmpo.samples import read_samples
    from mmpo.tracking import METRICS_FILE, read_metrics

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not run_dir.is_dir() or not (config_path.is_file() or (run_dir / METRICS_FILE).is_file()):
        raise ConfigError(
            f"{run_dir} is not a run folder: it has no config.yaml or {METRICS_FILE} "
            "(give the output_dir of `mmpo train`)"
        )
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    config = yaml.safe_load(config_text) if config_text else {}
    config = config if isinstance(config, dict) else {}
    folders = sorted(_eval_dirs(run_dir), key=lambda f: _sort_key(run_dir, f))
    return RunData(
        run_dir=run_dir,
        config_text=config_text,
        config=config,
        records=read_metrics(run_dir / METRICS_FILE),
        samples=read_samples(run_dir),
        evals=[read_eval_folder(run_dir, f) for f in folders],
        kind=kind,
    )


__all__ = [
    "EvalFolder",
    "RunData",
    "read_run",
    "read_eval_folder",
    "series",
    "metric_keys",
    "split_categories",
    "category_of",
    "is_number",
]
