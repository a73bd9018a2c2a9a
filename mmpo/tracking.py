"""Run tracking: a progress bar, ``metrics.jsonl``, TensorBoard events and a PNG of the curves.

Everything lands in the run folder:

- ``metrics.jsonl``: one JSON object per :meth:`Tracker.log` call, ``{"step": int, ...}``;
  non-finite floats are written as ``null`` so every line is strict JSON;
- ``tensorboard/``: one scalar per numeric metric (``tensorboard --logdir runs``), the default
  tracker; ``trainer.report_to`` picks the trackers (:mod:`mmpo.trackers`: also wandb, MLflow,
  Trackio);
- ``curves.png``: written by :meth:`Tracker.close`.

A resumed run (``start_step > 0``) first drops every line and TensorBoard event after
``start_step``, so the files of a resumed run equal those of a straight run.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from mmpo.errors import DataError
from mmpo.trackers import TENSORBOARD_DIR as TENSORBOARD_DIR  # re-exported: the run folder layout
from mmpo.trackers import Backend, open_backends

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
#: Training metrics plotted by :meth:`Tracker.close` (when present), then every ``eval/*`` key.
PLOT_KEYS = ("reward_mean", "loss", "kl", "entropy")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in file order ([] if the file does not exist).

    A torn last line (the process died mid-write) is skipped; a bad line elsewhere raises
    DataError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not an object with a 'step'")
        except ValueError as exc:
            if number == len(lines):
                break
            raise DataError(f"{path}: line {number} is not a metrics record ({exc})") from None
        records.append(record)
    return records


def _scalar(value: Any) -> float | int | None:
    """A plain Python number from ints, floats, bools, numpy scalars and one-element tensors or
    arrays; None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is not None and math.prod(shape) == 1 and callable(getattr(value, "item", None)):
        return _scalar(value.item())
    return None


def _json_value(value: Any) -> Any:
    """A JSON-safe value: numbers as numbers (non-finite -> null), strings/bools/None kept."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    number = _scalar(value)
    if number is None:
        return str(value)
    if isinstance(number, float) and not math.isfinite(number):
        return None
    return number


class Tracker:
    """Writes metrics of one run. On non-main ranks pass ``enabled=False``: every call is a no-op.

    Args:
        run_dir: the run folder (created if missing).
        total_steps: length of the progress bar (the trainer's max_steps).
        start_step: last step already done (a resumed run); 0 for a fresh run, which starts a
            new ``metrics.jsonl``.
        enabled: False on non-main ranks.
        progress: show a tqdm bar (on stderr), or an open tqdm bar to move instead (closed by
            :meth:`close`).
        tensorboard: write TensorBoard events (used when ``report_to`` is None).
        report_to: the trackers (:mod:`mmpo.trackers`: tensorboard, wandb, mlflow, trackio) that
            receive metrics and logged rollouts besides ``metrics.jsonl``; None =
            ``["tensorboard"]`` (or ``[]`` with ``tensorboard=False``).
        config: the resolved run config, recorded by each tracker.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress: Any = True,
        tensorboard: bool = True,
        report_to: Sequence[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.run_dir / METRICS_FILE
        self._file = None
        self._backends: list[Backend] = []
        self._bar = None
        self._closed = False
        self._postfix: dict[str, str] = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        names = list(report_to) if report_to is not None else (["tensorboard"] if tensorboard else [])
        self._backends = open_backends(names, self.run_dir, start_step, config)
        if progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        elif progress:  # an open bar to drive: the run's (mmpo.progress.RunProgress), shown since the model loaded
            self._bar = progress

    def _truncate(self, start_step: int) -> None:
        """Keep only records with step <= start_step (none for a fresh run); atomic rewrite."""
        if not self.metrics_path.exists():
            return
        kept = [r for r in read_metrics(self.metrics_path) if start_step > 0 and r["step"] <= start_step]
        tmp = self.metrics_path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in kept:
                fh.write(json.dumps(record) + "\n")
        os.replace(tmp, self.metrics_path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl, send numeric values to the
        trackers, and move the progress bar to ``step`` (postfix: reward and loss)."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("Tracker.log called after close()")
        record = {"step": int(step)}
        record.update({str(k): _json_value(v) for k, v in metrics.items() if k != "step"})
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._backends:
            scalars = {str(k): n for k, v in metrics.items() if k != "step" and (n := _scalar(v)) is not None}
            for backend in self._backends:
                backend.log_metrics(int(step), scalars)
        if self._bar is not None:
            for key, label in (("reward_mean", "reward"), ("loss", "loss")):
                number = _scalar(metrics.get(key))
                if number is not None:
                    self._postfix[label] = f"{number:.4g}"
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            self._bar.set_postfix(self._postfix, refresh=True)

    def log_samples(self, step: int, records: list[dict[str, Any]], samples_dir: Path) -> None:
        """Logged rollouts (:mod:`mmpo.samples` records; media paths relative to ``samples_dir``)
        to the trackers: TensorBoard text and images, tables with images in wandb, MLflow, Trackio."""
        if not self.enabled or not records:
            return
        for backend in self._backends:
            backend.log_samples(int(step), records, Path(samples_dir))

    def close(self) -> Path | None:
        """Flush and close everything and write ``curves.png``; returns its path (None when
        disabled). Calling it again only rewrites nothing and returns the same path."""
        if not self.enabled:
            return None
        curves = self.run_dir / CURVES_FILE
        if self._closed:
            return curves
        self._closed = True
        if self._file is not None:
            self._file.close()
        for backend in self._backends:
            backend.close()
        if self._bar is not None:
            self._bar.close()
        return plot_curves(read_metrics(self.metrics_path), curves)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot_curves(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Save a PNG with one subplot per key of PLOT_KEYS present in ``records``, then one per
    ``eval/*`` key (plotted at the steps where it was logged). Uses the Agg canvas directly,
    so no global matplotlib backend is changed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    keys = [k for k in PLOT_KEYS if _series(records, k)[0]] + [k for k in eval_keys if _series(records, k)[0]]
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100)
    FigureCanvasAgg(fig)
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
        ax.set_axis_off()
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = _series(records, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
