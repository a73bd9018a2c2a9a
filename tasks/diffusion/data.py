"""Prompts for text-to-image RL: a text file (one prompt a line), JSONL (``{"prompt": ..., <meta>}``)
or an inline YAML list of strings / mappings. Extra keys of a row travel with the prompt as its
``meta`` (e.g. ``color`` or ``box`` for the verifiable rewards)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpo.errors import ConfigError


@dataclass
class Prompt:
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def _row(item: Any, where: str) -> Prompt:
    if isinstance(item, str):
        text, meta = item, {}
    elif isinstance(item, dict):
        if not isinstance(item.get("prompt"), str):
            raise ConfigError(f"{where}: a prompt row needs a string 'prompt', got {json.dumps(item)[:200]}")
        meta = {k: v for k, v in item.items() if k != "prompt"}
        text = item["prompt"]
    else:
        raise ConfigError(f"{where}: a prompt must be a string or a mapping with 'prompt', got {item!r}")
    if not text.strip():
        raise ConfigError(f"{where}: empty prompt")
    return Prompt(text.strip(), meta)


def load_prompts(spec: str | list[Any], key: str) -> list[Prompt]:
    """Prompts from ``spec`` (a .txt / .jsonl path or an inline list); errors name ``key``, the file and line."""
    if isinstance(spec, list):
        prompts = [_row(item, f"{key}[{i}]") for i, item in enumerate(spec)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"{key}: prompt file '{spec}' does not exist (relative paths are read from the current directory)"
            )
        prompts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
                continue
            where = f"{key}: {path}:{n}"
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            else:
                item = line
            prompts.append(_row(item, where))
    if not prompts:
        raise ConfigError(f"{key}: no prompts in {spec!r}")
    return prompts


__all__ = ["Prompt", "load_prompts"]
