"""Tracker backends for ``trainer.report_to``: TensorBoard, Weights & Biases, MLflow and Trackio.

:class:`mmpo.tracking.Tracker` opens one backend per name (after writing ``metrics.jsonl``,
which is always on) and hands each the same calls:

- :meth:`Backend.log_config`: the resolved run config, once, before anything else;
- :meth:`Backend.log_metrics`: the numeric metrics of one step;
- :meth:`Backend.log_samples`: the logged rollouts of one step (:mod:`mmpo.samples` records,
  media paths relative to ``samples/``) as a table with its images where the tracker has one;
- :meth:`Backend.close`.

Every backend but TensorBoard is an optional extra (``pip install 'mmpo[wandb]'``); a missing
package is refused at config load (:func:`missing_package`). Where each one writes:

=============  ==================================================================================
tensorboard    ``<run>/tensorboard/``: scalars, the rollouts as a markdown text, their images.
wandb          mode from ``WANDB_MODE``; else ``online`` with a W&B key (``WANDB_API_KEY`` or
               ``.netrc``), ``offline`` without one. Files under ``<run>/wandb/`` (or
               ``WANDB_DIR``); project ``WANDB_PROJECT`` or ``mmpo``; rollouts as a
               ``wandb.Table`` with ``wandb.Image`` columns (``media_0``, ...).
mlflow         tracking URI ``MLFLOW_TRACKING_URI``, else a local SQLite store
               ``<run>/mlflow.db`` with artifacts in ``<run>/mlartifacts/`` (MLflow 3 refuses its
               old ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE`` is set); experiment
               ``MLFLOW_EXPERIMENT_NAME`` or ``mmpo``; config as flattened params and
               ``config.yaml``; rollouts as ``samples/step_<step>.json`` tables
               (``mlflow.log_table``) with an image column and the media files beside them.
trackio        trackio's local store (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``)
               unless ``TRACKIO_SPACE_ID`` / ``TRACKIO_SERVER_URL`` is set; project
               ``TRACKIO_PROJECT`` or ``mmpo``; rollouts as a ``trackio.Table`` whose ``media``
               cells hold ``trackio.Image`` lists. No dashboard is launched
               (``trackio show`` opens it).
=============  ==================================================================================

Each run is named after its run folder. The ids of the tracker runs are kept in
``<run>/trackers.json``; a resumed run (``start_step > 0``) continues the same wandb run id,
MLflow run and Trackio run instead of opening new ones. No backend prints onto the progress
bar: wandb runs with ``silent`` settings and no console capture, MLflow's and Trackio's
start-up lines are swallowed.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterator

#: ``<run>/trackers.json``: ``{tracker name: {ids needed to resume its run}}``
IDS_FILE = "trackers.json"
DEFAULT_PROJECT = "mmpo"
TENSORBOARD_DIR = "tensorboard"
#: tracker name -> the module it imports (the pip extra has the tracker's name; TensorBoard is
#: a core dependency)
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
#: the fixed columns of a rollouts table (then ``reward/<name>`` columns, then media)
SAMPLE_COLUMNS = ("step", "prompt_id", "group", "prompt", "completion", "reward", "advantage")


def missing_package(name: str) -> str | None:
    """The pip command that installs tracker ``name`` when its package cannot be imported; None
    when it can. Checks with ``importlib.util.find_spec`` (nothing is imported)."""
    module = MODULES[name]
    if importlib.util.find_spec(module) is not None:
        return None
    return "pip install tensorboard" if name == "tensorboard" else f"pip install 'mmpo[{name}]'"


def read_ids(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The stored tracker run ids of a run folder ({} when there are none or the file is unreadable)."""
    path = Path(run_dir) / IDS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_ids(run_dir: Path, name: str, ids: dict[str, Any]) -> None:
    data = read_ids(run_dir)
    data[name] = ids
    tmp = run_dir / f".{IDS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / IDS_FILE)


def sample_columns(records: list[dict[str, Any]]) -> list[str]:
    """The text/number columns of a rollouts table: the fixed ones, then every ``reward/<name>``."""
    extra = sorted({k for r in records for k in r if k.startswith("reward/")})
    return [*SAMPLE_COLUMNS, *extra]


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Swallow stdout, warnings and INFO logs of ``loggers`` (start-up banners of trackers)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


class Backend(abc.ABC):
    """One tracker of one run (main rank only).

    Args:
        run_dir: the run folder; the run is named after it.
        start_step: the last step already done (a resumed run continues its tracker run).
    """

    name: ClassVar[str]

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.run_dir = Path(run_dir)
        self.start_step = int(start_step)
        #: this tracker's stored ids when resuming ({} for a fresh run)
        self.stored: dict[str, Any] = read_ids(self.run_dir).get(self.name, {}) if start_step > 0 else {}

    def save_ids(self, **ids: Any) -> None:
        _write_ids(self.run_dir, self.name, ids)

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the resolved run config (called once, before any metrics)."""

    @abc.abstractmethod
    def log_metrics(self, step: int, metrics: dict[str, float | int]) -> None:
        """Record the numeric metrics of ``step``."""

    @abc.abstractmethod
    def log_samples(self, step: int, records: list[dict[str, Any]], samples_dir: Path) -> None:
        """Record the logged rollouts of ``step`` (records of :func:`mmpo.samples.to_records`)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and finish the tracker run."""


class TensorBoardBackend(Backend):
    """TensorBoard events in ``<run>/tensorboard``; a resumed run purges events after ``start_step``."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int) -> None:
        super().__init__(run_dir, start_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a crashed run wrote after its last checkpoint.
        self.writer = SummaryWriter(
            log_dir=str(self.run_dir / TENSORBOARD_DIR),
            purge_step=start_step + 1 if start_step > 0 else None,
        )

    def log_metrics(self, step: int, metrics: dict[str, float | int]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=int(step))

    def log_samples(self, step: int, records: list[dict[str, Any]], samples_dir: Path) -> None:
        """One markdown table as text (``samples``) and each image (``samples/<row>_<k>``; a GIF: its first frame)."""
        import numpy as np
        from PIL import Image

        from mmpo.samples import samples_markdown

        self.writer.add_text("samples", samples_markdown(records), global_step=int(step))
        for i, record in enumerate(records):
            for k, rel in enumerate(record.get("media") or []):
                with Image.open(samples_dir / rel) as im:
                    array = np.asarray(im.convert("RGB"))
                self.writer.add_image(f"samples/{i}_{k}", array, global_step=int(step), dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _wandb_has_key() -> bool:
    """Whether W&B credentials are at hand (env or .netrc) without asking the server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        import wandb
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=wandb.Settings().base_url))
    except Exception:  # an unreadable .netrc or a changed wandb internal: no key
        return False


class WandbBackend(Backend):
    """A W&B run; metrics are plotted against ``step`` (``define_metric``), so a resumed run
    may log steps again."""

    name = "wandb"

    def __init__(self, run_dir: Path, start_step: int) -> None:
        super().__init__(run_dir, start_step)
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_key() else "offline")
        # before init: the process-wide settings decide whether wandb sends its own telemetry
        wandb.setup(settings=wandb.Settings(mode=mode))
        run_id = self.stored.get("id") or uuid.uuid4().hex[:12]
        kwargs: dict[str, Any] = dict(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
            settings=wandb.Settings(silent=True, console="off", show_info=False, show_warnings=False),
        )
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:
            if mode != "online":
                raise
            warnings.warn(f"wandb: cannot start an online run ({exc}); logging offline instead (wandb sync later)")
            wandb.setup(settings=wandb.Settings(mode="offline"))
            self.run = wandb.init(mode="offline", **kwargs)
        self.run.define_metric("step", hidden=True)
        self.run.define_metric("*", step_metric="step")
        self.save_ids(id=run_id, project=kwargs["project"])

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float | int]) -> None:
        self.run.log({**metrics, "step": int(step)})

    def log_samples(self, step: int, records: list[dict[str, Any]], samples_dir: Path) -> None:
        """Key ``samples``: one row per rollout; ``media_<k>`` holds its k-th image (None past its last)."""
        columns = sample_columns(records)
        n_media = max(len(r.get("media") or []) for r in records)
        data = []
        for record in records:
            media = list(record.get("media") or [])
            images = [self.wandb.Image(str(samples_dir / rel)) for rel in media]
            data.append([record.get(c) for c in columns] + images + [None] * (n_media - len(images)))
        table = self.wandb.Table(columns=columns + [f"media_{k}" for k in range(n_media)], data=data)
        self.run.log({"samples": table, "step": int(step)})

    def close(self) -> None:
        self.run.finish()


class MlflowBackend(Backend):
    """An MLflow run through ``MlflowClient`` (no global active run)."""

    name = "mlflow"
    _LOGGERS = ("mlflow", "alembic")

    def __init__(self, run_dir: Path, start_step: int) -> None:
        super().__init__(run_dir, start_step)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.run_dir.resolve()}/mlflow.db"
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        with _quiet(*self._LOGGERS):
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = None
            if self.stored.get("tracking_uri") == uri and self.stored.get("run_id"):
                try:
                    self.client.get_run(self.stored["run_id"])
                    self.run_id = self.stored["run_id"]
                    self.client.update_run(self.run_id, status="RUNNING")
                except MlflowException:
                    self.run_id = None
            if self.run_id is None:
                found = self.client.get_experiment_by_name(experiment)
                if found is not None:
                    experiment_id = found.experiment_id
                else:
                    location = (self.run_dir.resolve() / "mlartifacts").as_uri() if local else None
                    experiment_id = self.client.create_experiment(experiment, artifact_location=location)
                run = self.client.create_run(
                    experiment_id, run_name=self.run_dir.name, tags={"mmpo.run_dir": str(self.run_dir.resolve())}
                )
                self.run_id = run.info.run_id
        self.save_ids(tracking_uri=uri, run_id=self.run_id, experiment=experiment)

    def log_config(self, config: dict[str, Any]) -> None:
        """Flattened params (``trainer.lr``, ...) not logged before (MLflow params cannot change;
        a resumed run adds only new keys), and the whole config as ``config.yaml``."""
        from mlflow.entities import Param

        with _quiet(*self._LOGGERS):
            logged = self.client.get_run(self.run_id).data.params
            params = [Param(key, str(value)[:6000]) for key, value in _flatten(config).items() if key not in logged]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            self.client.log_dict(self.run_id, config, "config.yaml")

    def log_metrics(self, step: int, metrics: dict[str, float | int]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(k), float(v), stamp, int(step)) for k, v in metrics.items()]
        with _quiet(*self._LOGGERS):
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_samples(self, step: int, records: list[dict[str, Any]], samples_dir: Path) -> None:
        """``samples/step_<step>.json`` (columns as in the Parquet file; ``media``: artifact paths
        of the files logged under ``samples/media/``; ``image``: the first image, when every row has one)."""
        from PIL import Image

        table: dict[str, list[Any]] = {c: [r.get(c) for r in records] for c in sample_columns(records)}
        table["media"] = [[f"samples/{rel}" for rel in r.get("media") or []] for r in records]
        images = []
        if all(r.get("media") for r in records):
            for r in records:
                with Image.open(samples_dir / r["media"][0]) as im:
                    images.append(im.convert("RGB"))
            table["image"] = images
        with _quiet(*self._LOGGERS):
            for record in records:
                for rel in record.get("media") or []:
                    self.client.log_artifact(self.run_id, str(samples_dir / rel), f"samples/{Path(rel).parent}")
            self.client.log_table(self.run_id, data=table, artifact_file=f"samples/step_{int(step):08d}.json")

    def close(self) -> None:
        with _quiet(*self._LOGGERS):
            self.client.set_terminated(self.run_id, status="FINISHED")


def _mlflow_key(key: str) -> str:
    """MLflow metric names allow letters, digits and ``_ - . space : /``; others become ``_``."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


class TrackioBackend(Backend):
    """A Trackio run (``trackio.init``; no system-metric threads, no dashboard)."""

    name = "trackio"

    def __init__(self, run_dir: Path, start_step: int) -> None:
        super().__init__(run_dir, start_step)
        import trackio

        self.trackio = trackio
        project = os.environ.get("TRACKIO_PROJECT") or DEFAULT_PROJECT
        resume = "allow" if self.stored.get("name") else "never"
        name = self.stored.get("name") or self.run_dir.name
        with _quiet():
            self.run = trackio.init(
                project=project,
                name=name,
                resume=resume,
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        self.save_ids(project=project, name=name, run_id=self.run.id)

    def log_config(self, config: dict[str, Any]) -> None:
        # trackio stores the run's config with its first log
        self.run.config.update(json.loads(json.dumps(config, default=str)))

    def log_metrics(self, step: int, metrics: dict[str, float | int]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.run.log(clean, step=int(step))

    def log_samples(self, step: int, records: list[dict[str, Any]], samples_dir: Path) -> None:
        """Key ``samples``: one row per rollout, its images in the ``media`` cell."""
        columns = sample_columns(records)
        data = [
            [r.get(c) for c in columns] + [[self.trackio.Image(str(samples_dir / rel)) for rel in r.get("media") or []]]
            for r in records
        ]
        self.run.log({"samples": self.trackio.Table(columns=columns + ["media"], data=data)}, step=int(step))

    def close(self) -> None:
        with _quiet():
            self.trackio.finish()


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (TensorBoardBackend, WandbBackend, MlflowBackend, TrackioBackend)
}


def open_backends(
    names: list[str] | tuple[str, ...], run_dir: str | Path, start_step: int = 0, config: dict[str, Any] | None = None
) -> list[Backend]:
    """One started backend per name, in order, each given ``config`` (when not None)."""
    backends = []
    for name in names:
        backend = BACKENDS[name](Path(run_dir), start_step)
        if config is not None:
            backend.log_config(config)
        backends.append(backend)
    return backends


__all__ = [
    "BACKENDS",
    "Backend",
    "IDS_FILE",
    "MODULES",
    "MlflowBackend",
    "TensorBoardBackend",
    "TrackioBackend",
    "WandbBackend",
    "missing_package",
    "open_backends",
    "read_ids",
]
