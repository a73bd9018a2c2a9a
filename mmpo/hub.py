"""Hugging Face Hub ids as model paths, read from the local cache only (nothing is downloaded).

``model.path: org/name`` names a model that ``hf download org/name`` put into the local cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``). It resolves to the
cached snapshot folder (``models--org--name/snapshots/<commit>/``, the commit named by
``refs/main``) through huggingface_hub's own cache lookup with ``local_files_only=True``, so it
works the same with ``HF_HUB_OFFLINE=1``. A model that is not in the cache is a ConfigError that
names the download command. A path that exists locally always wins over a Hub id.

This module imports no torch (the config loader uses it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmpo.errors import ConfigError

#: ``org/name``: exactly one slash, each part starting with a letter or digit (Hub repo id rules)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(value: str) -> bool:
    """True when ``value`` has the shape of a Hub model id ``org/name`` (``..`` never is)."""
    return bool(_HUB_ID.match(value)) and ".." not in value and not value.endswith((".", "-"))


def hub_cache_dir() -> Path:
    """The Hub cache folder as huggingface_hub computes it, read from the environment now
    (so a changed ``HF_HOME`` counts): ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        home = str(Path(xdg) / "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def missing_message(repo_id: str, what: str = "model.path") -> str:
    """The error text for a Hub id that is not in the local cache: where it looked and the command."""
    hint = " (HF_HUB_OFFLINE is set: run it where the network is reachable)" if _offline() else ""
    return (
        f"{what} names {repo_id!r}, which is not a local path (relative paths are read from the current "
        f"directory {os.getcwd()}), and as a Hugging Face Hub id it is not in the local cache {hub_cache_dir()} "
        f"(set by HF_HOME / HF_HUB_CACHE). mmpo never downloads at run time: fetch it once with "
        f"`hf download {repo_id}`{hint}, or give a local save_pretrained folder or 'tiny:<kind>' (an "
        "offline random tiny model)."
    )


def cached_snapshot(repo_id: str, what: str = "model.path") -> Path:
    """The local snapshot folder of Hub model ``repo_id`` (``refs/main``'s commit), found by
    ``huggingface_hub.snapshot_download(..., local_files_only=True)`` in :func:`hub_cache_dir`.

    Raises ConfigError naming ``hf download <repo_id>`` when the cache does not hold it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True, cache_dir=str(hub_cache_dir()))
    except LocalEntryNotFoundError:
        raise ConfigError(missing_message(repo_id, what)) from None
    return Path(folder)


def local_model_folder(path: str, what: str = "model.path") -> Path:
    """``path`` as a local folder: itself when it exists or is no Hub id, else the cached
    snapshot of the Hub id (:func:`cached_snapshot`; ConfigError when absent)."""
    folder = Path(path).expanduser()
    if folder.exists() or not is_hub_id(path):
        return folder
    return cached_snapshot(path, what)
