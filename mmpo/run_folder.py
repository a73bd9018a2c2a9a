"""A run folder keeps its config: a rerun of a folder that already trained is checked against its
``config.yaml`` before any model loads.

- A folder that holds ``config.yaml`` and any training output (a checkpoint, ``metrics.jsonl`` or
  the final ``model/``) is a rerun. Every dotted key whose value differs from the saved one is a
  change; changes stop the run (ConfigError, exit 2) listing each ``key: old -> new``.
- ``resume.allow_changes: [key, ...]`` accepts the named changes (a key also covers the keys
  below it). They are appended, with the step they take effect at, to ``config_history.yaml``,
  and ``config.yaml`` is rewritten with the new values.
- ``trainer.max_steps`` may grow without being named when no schedule reads it (see
  :func:`schedules_on_max_steps`); when one does, it must be named, and the history says which
  schedules stretch. Growth is recorded in the history either way.
- :data:`ALWAYS_CHANGEABLE` keys never affect what is trained and may always change (unrecorded).

Values are compared as written to ``config.yaml``: secrets redacted (:mod:`mmpo.redact`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from mmpo.config import RunConfig, read_yaml, save_config, to_dict
from mmpo.config_keys import RESTORED_FROM_CHECKPOINT, covers
from mmpo.errors import ConfigError
from mmpo.redact import redact

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.yaml"
#: keys (and the keys below them) that only name where or how results are shown, never what is
#: trained: the folder itself (it may be moved), this section, trackers, the HTML report, logged
#: rollouts and the wall-clock limit (a stopped run resumes)
ALWAYS_CHANGEABLE = (
    "output_dir",
    "resume",
    "trainer.report",
    "trainer.report_to",
    "trainer.log_samples",
    "trainer.time_limit_s",
)
MAX_STEPS = "trainer.max_steps"
#: KL schedules that do not read ``total_steps`` (any other one is taken to stretch with max_steps)
KL_SCHEDULES_WITHOUT_LENGTH = ("constant", "pi_target", "ares_bucket")
_ABSENT = "(absent)"


@dataclass
class Change:
    """One changed key of a rerun: ``key: old -> new`` (values as in ``config.yaml``)."""

    key: str
    old: Any
    new: Any
    note: str = ""

    def describe(self) -> str:
        shown = f"{self.key}: {_show(self.old)} -> {_show(self.new)}"
        return f"{shown} ({self.note})" if self.note else shown


def _show(value: Any) -> str:
    if value is _ABSENT:
        return _ABSENT
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def is_rerun(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a saved config and training output (checkpoints, metrics, model)."""
    if not (run_dir / CONFIG_FILE).is_file():
        return False
    ckpts = run_dir / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())
    metrics = run_dir / "metrics.jsonl"
    return has_ckpt or (metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / "model").is_dir()


def written_config(cfg: Any) -> dict[str, Any]:
    """``cfg`` as ``config.yaml`` holds it (secrets redacted, YAML types)."""
    return yaml.safe_load(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def diff_configs(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """The keys (dotted, leaves; lists compared whole) whose values differ, in ``new``'s order."""
    a, b = _flatten(old), _flatten(new)
    keys = list(b) + [k for k in a if k not in b]
    return [Change(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def schedules_on_max_steps(cfg: RunConfig, task: Any = None) -> list[str]:
    """What reads ``trainer.max_steps`` as the length of a schedule (so growing it stretches the
    schedule): the learning-rate decay, a KL schedule that reads ``total_steps`` (any not in
    :data:`KL_SCHEDULES_WITHOUT_LENGTH`), a task's own step schedule (one that overrides
    :meth:`mmpo.tasks.TokenTask.begin_step`, e.g. HiconAgent's DCS)."""
    from mmpo.tasks import TokenTask
    from mmpo.trainers.algorithm import kl_is_on

    found = []
    if cfg.trainer.lr_schedule != "constant":
        found.append(f"the learning-rate schedule (trainer.lr_schedule: {cfg.trainer.lr_schedule})")
    if kl_is_on(cfg.algorithm) and cfg.algorithm.kl_schedule not in KL_SCHEDULES_WITHOUT_LENGTH:
        found.append(f"the KL schedule (algorithm.kl_schedule: {cfg.algorithm.kl_schedule})")
    step_hook = getattr(type(task), "begin_step", None)
    if step_hook is not None and step_hook is not TokenTask.begin_step:
        found.append(f"the task's step schedule ({type(task).__name__}.begin_step)")
    return found


def check_rerun(cfg: RunConfig, run_dir: str | Path, task: Any = None) -> list[Change]:
    """The accepted changes of a rerun of ``run_dir`` with ``cfg`` ([] for a new folder); raises
    ConfigError listing every change ``resume.allow_changes`` does not accept. Writes nothing."""
    run_dir = Path(run_dir)
    if not is_rerun(run_dir):
        return []
    saved = run_dir / CONFIG_FILE
    changes = [
        c
        for c in diff_configs(read_yaml(saved), written_config(cfg))
        if not any(covers(k, c.key) for k in ALWAYS_CHANGEABLE)
    ]
    allowed = cfg.resume.allow_changes
    refused: list[Change] = []
    for c in changes:
        named = any(covers(a, c.key) or covers(c.key, a) for a in allowed)
        grows = c.key == MAX_STEPS and isinstance(c.old, int) and isinstance(c.new, int) and c.new > c.old
        if grows:
            schedules = schedules_on_max_steps(cfg, task)
            if schedules and named:
                c.note = f"stretches {', '.join(schedules)} from {c.old} to {c.new} steps"
            elif schedules:
                c.note = f"would stretch {', '.join(schedules)}; name it in resume.allow_changes to accept that"
                refused.append(c)
            else:
                c.note = "no schedule reads it"
        elif not named:
            refused.append(c)
    if refused:
        lines = "; ".join(c.describe() for c in refused)
        fixed = [c.key for c in refused if any(covers(k, c.key) for k in RESTORED_FROM_CHECKPOINT)]
        free = [c.key for c in refused if c.key not in fixed]
        how = f"accept the changes with resume.allow_changes=[{','.join(free)}]" if free else ""
        if fixed:
            how += ("; " if how else "") + f"{', '.join(fixed)} cannot change on resume (optimizer state)"
        raise ConfigError(
            f"{run_dir} already holds a run made with other values ({saved}). Changed: {lines}. "
            f"Rerun with the saved values or use another output_dir; {how}"
        )
    return changes


def record_changes(run_dir: str | Path, changes: Sequence[Change], step: int) -> Path | None:
    """Append ``changes`` (taking effect at ``step``) to ``run_dir/config_history.yaml`` (a list
    of ``{step, changes: [{key, old, new, note?}]}``); None when there are none."""
    if not changes:
        return None
    path = Path(run_dir) / HISTORY_FILE
    history = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    entries = history if isinstance(history, list) else []
    items = []
    for c in changes:
        item = {"key": c.key, "old": None if c.old is _ABSENT else c.old, "new": None if c.new is _ABSENT else c.new}
        if c.note:
            item["note"] = c.note
        items.append(item)
    entries.append({"step": int(step), "changes": items})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(entries, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_run_config(cfg: RunConfig, run_dir: str | Path, changes: Sequence[Change], step: int) -> Path:
    """Record a rerun's accepted ``changes`` at ``step`` (:func:`record_changes`), then write
    ``cfg`` to ``run_dir/config.yaml`` (redacted). Returns the config's path."""
    record_changes(run_dir, changes, step)
    return save_config(cfg, Path(run_dir) / CONFIG_FILE)
