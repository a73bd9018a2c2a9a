"""Data built on first use: a cache folder named by what built it, written once, atomically.

A recipe that needs generated data (BabyAI-bot demonstrations, MiniWoB++ solver episodes) and is
given no file builds it here the first time and reuses it afterwards:

    <cache>/data/<name>-<12 hex digits of the SHA-256 of the build settings>/

``<cache>`` is ``$MMPO_CACHE``, else ``$XDG_CACHE_HOME/mmpo``, else ``~/.cache/mmpo``. The folder
is built as a hidden sibling and renamed into place only when the build finished, with
``built.json`` (the settings) inside: an interrupted build leaves no folder that passes as
complete, and of two processes building at once the first rename wins and the other's copy is
dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

#: written last into a built folder: the settings it was built with
BUILT_FILE = "built.json"


def cache_root() -> Path:
    """``$MMPO_CACHE``, else ``$XDG_CACHE_HOME/mmpo``, else ``~/.cache/mmpo``."""
    if os.environ.get("MMPO_CACHE"):
        return Path(os.environ["MMPO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mmpo"


def settings_digest(settings: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``settings`` as sorted JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_folder(name: str, settings: dict[str, Any]) -> Path:
    """Where the data ``name`` built with ``settings`` lives (it may not exist yet)."""
    return cache_root() / "data" / f"{name}-{settings_digest(settings)}"


def is_built(folder: Path) -> bool:
    """Whether ``folder`` is a finished build (its ``built.json`` is there)."""
    return (folder / BUILT_FILE).is_file()


def build_once(name: str, settings: dict[str, Any], build: Callable[[Path], Any], what: str) -> Path:
    """The folder of data ``name`` built with ``settings``, built the first time.

    ``build(out)`` must create the folder ``out`` (which does not exist yet; its parent does) and
    fill it. Before building, one line goes to stderr: ``building <what> into <folder> — once;
    cached``. Returns the finished folder."""
    final = data_folder(name, settings)
    if is_built(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    tqdm.write(f"building {what} into {final} — once; cached", file=sys.stderr)  # above a bar, not through it
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        if not tmp.is_dir():
            raise RuntimeError(f"building {what}: the builder wrote no folder {tmp}")
        (tmp / BUILT_FILE).write_text(json.dumps({"name": name, "settings": settings, "time": time.time()}, indent=1))
        if final.exists() and not is_built(final):  # not ours and unfinished (written by hand?): replace it
            aside = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its folder
            if not is_built(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = ["BUILT_FILE", "build_once", "cache_root", "data_folder", "is_built", "settings_digest"]
