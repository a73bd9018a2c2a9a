"""Prompts for text-to-image RL: a text file (one prompt a line), JSONL (``{"prompt": ..., <meta>}``)
or an inline YAML list of strings / mappings. The other keys of a row travel with the prompt as its
``meta`` (e.g. ``color`` or ``box`` for the verifiable rewards).

Keys are strict: a row key other than ``prompt`` and the keys the task's rewards read (their
``meta_key`` / ``box_key`` / ``color_key`` options, see ``ImageReward.meta_keys``; a reward server
reads them all) is unknown: a ``DataError`` naming the file, the line and the key with the closest
known key, or, with ``unknown_keys`` warn / ignore, reported once / dropped silently
(:mod:`mmpo.data_rows`). An unknown key never reaches the prompt's ``meta``.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpo.data import RecordError
from mmpo.data_rows import KeyCheck, iter_numbered_rows
from mmpo.errors import ConfigError


@dataclass
class Prompt:
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def _row(item: Any, where: str, allowed: Collection[str] | None) -> Prompt:
    if isinstance(item, str):
        text, meta = item, {}
    elif isinstance(item, dict):
        if not isinstance(item.get("prompt"), str):
            raise ConfigError(f"{where}: a prompt row needs a string 'prompt', got {json.dumps(item)[:200]}")
        meta = {k: v for k, v in item.items() if k != "prompt" and (allowed is None or k in allowed)}
        text = item["prompt"]
    else:
        raise ConfigError(f"{where}: a prompt must be a string or a mapping with 'prompt', got {item!r}")
    if not text.strip():
        raise ConfigError(f"{where}: empty prompt")
    return Prompt(text.strip(), meta)


def load_prompts(
    spec: str | list[Any],
    key: str,
    *,
    meta_keys: Collection[str] | None = None,
    unknown_keys: str | KeyCheck = "error",
) -> list[Prompt]:
    """Prompts from ``spec`` (a .txt / .jsonl path or an inline list); errors name ``key``, the file
    and line. ``meta_keys``: the keys a row may have besides ``prompt`` (None: any);
    ``unknown_keys`` (error | warn | ignore): what another key does."""
    keys = KeyCheck.of(unknown_keys)
    allowed = None if meta_keys is None else frozenset({"prompt", *meta_keys})
    layout = "'prompt' and the keys task.rewards read"

    def check(item: Any, file: str | Path, where: str) -> None:
        if allowed is not None and isinstance(item, dict):
            keys.check(item, allowed, file, where, layout=layout)

    if isinstance(spec, list):
        prompts = []
        for i, item in enumerate(spec):
            check(item, key, f"item {i + 1}")
            prompts.append(_row(item, f"{key}[{i}]", allowed))
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"{key}: prompt file '{spec}' does not exist (relative paths are read from the current directory)"
            )
        prompts = []
        if path.suffix == ".jsonl":
            for _, n, item in iter_numbered_rows(path, kind="jsonl"):
                where = f"{key}: {path}:{n}"
                if isinstance(item, RecordError):
                    raise ConfigError(f"{where}: {item}")
                check(item, path, f"line {n}")
                prompts.append(_row(item, where, allowed))
        else:  # plain text: a prompt a line, '#' comments
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    prompts.append(_row(line, f"{key}: {path}:{n}", allowed))
    if not prompts:
        raise ConfigError(f"{key}: no prompts in {spec!r}")
    return prompts


__all__ = ["Prompt", "load_prompts"]
