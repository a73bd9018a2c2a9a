"""Demonstrations for the VLA task: read the folder written by ``data_prep/babyai_demos.py``.

Layout: ``demos.jsonl`` (one step a line: ``{"episode", "seed", "t", "image", "instruction",
"action", "action_name"}``, the image a PNG path relative to the folder), ``meta.json`` (the
``EnvSpec`` as ``env``, ``seeds``, ...) and ``frames/*.png``. Image paths must stay inside the
folder: absolute paths and ``..`` are refused, and no file outside the folder is opened.

A bad file raises ``DataError`` naming the file (and, for ``demos.jsonl``, the line counted from 1).
A ``demos.jsonl`` key other than those above is unknown: a ``DataError`` naming the line and the key
(with the closest known key), or, with ``unknown_keys`` warn / ignore, reported once / ignored
(:mod:`mmpo.data_rows`). ``meta.json`` is the generator's manifest and is not checked key by key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from mmpo.data import RecordError
from mmpo.data_rows import KeyCheck, LoadSummary, iter_numbered_rows
from mmpo.errors import DataError
from mmpo.paths import PathRefused, contained_path

GENERATE_HINT = "python data_prep/babyai_demos.py --out {folder}"
_KEYS: dict[str, type] = {
    "episode": int,
    "seed": int,
    "t": int,
    "image": str,
    "instruction": str,
    "action": int,
    "action_name": str,
}


@dataclass
class DemoStep:
    """One demonstrated step: the image ``[H, W, 3]`` uint8 the demonstrator acted on, the
    instruction, and its env action (id and MiniGrid name)."""

    episode: int
    seed: int
    t: int
    image: np.ndarray
    instruction: str
    action: int
    action_name: str


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (regenerate the folder with `{GENERATE_HINT.format(folder=folder)}`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _read_rows(path: Path, keys: KeyCheck) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of each non-blank line, every key checked (unknown ones by ``keys``)."""
    if not path.is_file():
        raise DataError(f"{path}: not found (regenerate the folder with `{GENERATE_HINT.format(folder=path.parent)}`)")
    rows = []
    for _, lineno, row in iter_numbered_rows(path, kind="jsonl"):
        if isinstance(row, RecordError):
            raise DataError(f"{path}: line {lineno}: {row}")
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
        keys.check(row, _KEYS, path, f"line {lineno}", layout="demonstration step")
        for key, kind in _KEYS.items():
            if key not in row:
                raise DataError(f"{path}: line {lineno}: missing key '{key}'")
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise DataError(f"{path}: line {lineno}: key '{key}' must be {kind.__name__}, got {value!r}")
        rows.append((lineno, row))
    return rows


def _image_path(folder: Path, entry: str, where: str) -> Path:
    """The file of a relative image entry, refused when it could leave ``folder``."""
    if (
        not entry
        or PurePosixPath(entry).is_absolute()
        or PureWindowsPath(entry).is_absolute()
        or PureWindowsPath(entry).drive
    ):
        raise DataError(f"{where}: key 'image': {entry!r} must be a path relative to the demonstration folder")
    if ".." in PurePosixPath(entry.replace("\\", "/")).parts:
        raise DataError(f"{where}: key 'image': {entry!r} leaves the demonstration folder ('..' is refused)")
    if not (folder / entry).exists():
        return folder.resolve() / entry  # reported as not found when loaded; nothing is opened
    try:
        return contained_path(folder, entry)  # symlinks followed: a link out of the folder is refused
    except PathRefused as e:
        raise DataError(f"{where}: key 'image': {e.why}") from None


def _load_image(path: Path, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{where}: cannot read image {path}: {e}") from e
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise DataError(f"{where}: image {path} has shape {image.shape}, not [H, W, 3]")
    return image


def load_demos(
    folder: str | Path,
    max_episodes: int = 0,
    *,
    unknown_keys: str | KeyCheck = "error",
    summary: LoadSummary | None = None,
) -> tuple[list[DemoStep], dict[str, Any]]:
    """The steps of ``folder`` (the first ``max_episodes`` episodes in file order when > 0) and its
    meta. ``unknown_keys``: what a step key not in the layout does (error | warn | ignore);
    ``summary``, when given, gets the steps used (split ``sft``) and those left out by ``max_episodes``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"{folder}: demonstration folder not found; generate it with `{GENERATE_HINT.format(folder=folder)}`"
        )
    if max_episodes < 0:
        raise DataError(f"max_episodes must be >= 0, got {max_episodes}")
    meta = _read_meta(folder)
    path = folder / "demos.jsonl"
    rows = _read_rows(path, KeyCheck.of(unknown_keys))
    if not rows:
        raise DataError(f"{path}: no steps")
    chosen: set[int] = set()
    steps = []
    for lineno, row in rows:
        episode = row["episode"]
        if episode not in chosen:
            if max_episodes and len(chosen) >= max_episodes:
                continue
            chosen.add(episode)
        where = f"{path}: line {lineno}"
        image = _load_image(_image_path(folder, row["image"], where), where)
        steps.append(
            DemoStep(
                episode=episode,
                seed=row["seed"],
                t=row["t"],
                image=image,
                instruction=row["instruction"],
                action=row["action"],
                action_name=row["action_name"],
            )
        )
    if summary is not None:
        summary.splits["sft"] = len(steps)
        if len(rows) > len(steps):
            summary.skip(f"beyond max_episodes={max_episodes}", len(rows) - len(steps))
    return steps, meta


def demo_seeds(meta: dict[str, Any]) -> list[int]:
    """The environment seeds of the demonstrations (to keep them out of the evaluation seeds)."""
    seeds = meta.get("seeds") if isinstance(meta, dict) else None
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise DataError(f"meta.json: 'seeds' must be a list of integers, got {seeds!r}")
    return [int(s) for s in seeds]


__all__ = ["DemoStep", "demo_seeds", "load_demos"]
