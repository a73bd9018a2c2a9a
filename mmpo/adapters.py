"""The layout of a peft LoRA adapter folder (``adapter_config.json`` and an optional ``merged/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmpo.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
#: Sub-folder of an adapter folder that holds the merged ``save_pretrained`` model.
MERGED_DIR = "merged"


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """``folder/adapter_config.json`` as a dict; ConfigError naming the file when unreadable."""
    file = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"LoRA adapter config '{file}' cannot be read: {e}") from None


__all__ = ["ADAPTER_CONFIG", "MERGED_DIR", "read_adapter_config"]
