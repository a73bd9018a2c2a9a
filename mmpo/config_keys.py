"""Dotted config keys (``trainer.lr``, ``task.rewards``) checked against a config schema: what
``resume.allow_changes`` may name (see :mod:`mmpo.run_folder`). Imports no config module, so
:mod:`mmpo.config` can use it at load."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from mmpo.core.registry import did_you_mean

#: keys a checkpoint's optimizer / LR-scheduler state carries (restored on resume, so a new value
#: would not take effect): refused in ``resume.allow_changes``
RESTORED_FROM_CHECKPOINT = ("trainer.lr", "trainer.weight_decay", "trainer.adam_betas")


def covers(prefix: str, key: str) -> bool:
    """Whether dotted ``key`` is ``prefix`` or lies below it."""
    return key == prefix or key.startswith(prefix + ".")


def allowed_change_problem(schema: type, key: Any) -> str | None:
    """Why ``key`` may not be named in ``resume.allow_changes`` of a ``schema`` config (None: it
    may): not a dotted key of the schema (free-form mappings such as task options and
    ``*_options`` accept any key below them), or a key restored from the checkpoint."""
    parts = key.split(".") if isinstance(key, str) else []
    if not parts or any(not p for p in parts):
        return f"must be a dotted config key like trainer.max_steps, got {key!r}"
    if any(covers(key, k) or covers(k, key) for k in RESTORED_FROM_CHECKPOINT):
        return (
            f"{key!r} cannot change on resume: the checkpoint's optimizer state restores "
            f"{', '.join(RESTORED_FROM_CHECKPOINT)}; start a new output_dir (warm-start from model.path) instead"
        )
    tp: Any = schema
    for depth, part in enumerate(parts):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) in (dict, list):
                return None  # a free-form mapping or a list: any key below
            return f"{key!r} is not a config key ('{'.'.join(parts[:depth])}' has no keys below it)"
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        if part in fields and not fields[part].metadata.get("extra"):
            tp = typing.get_type_hints(tp)[part]
            continue
        if any(f.metadata.get("extra") for f in fields.values()):
            return None  # task options: any name
        valid = sorted(n for n, f in fields.items() if not f.metadata.get("extra"))
        scope = ".".join(parts[:depth]) or "the top level"
        return f"{key!r} is not a config key.{did_you_mean(part, valid)} Valid keys in {scope}: {', '.join(valid)}."
    return None
