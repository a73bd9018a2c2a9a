"""GUI episodes (an instruction and its screenshot/action steps) and their JSONL layout.

One episode a line::

    {"id": str | int, "instruction": str,
     "steps": [{"screenshot": "rel/path.png", "action": "click(0.5, 0.25)",
                "target_box": [x0, y0, x1, y1] | null, "screen_size": [w, h] | null}, ...],
     "meta": {...}}                                          # optional

``screenshot`` is relative to the JSONL file's folder; absolute paths, paths with a ``..``
part and paths whose resolved target (symlinks followed) lies outside the folder are refused
(:func:`mmpo.paths.contained_path`). ``action`` is one action of
:mod:`mmpo_tasks.gui_agent.actions` written without its ``<action>`` tag (coordinates normalised to
[0, 1]; pixel coordinates are normalised when ``screen_size`` is given). ``target_box`` is the
normalised box of the target element (4 numbers in [0, 1], ``x0 <= x1``, ``y0 <= y1``);
``screen_size`` is ``[width, height]`` in pixels.

Keys are strict: an episode key other than :data:`EPISODE_KEYS` or a step key other than
:data:`STEP_KEYS` (``meta`` is free-form) raises ``DataError`` naming the file, the line and the
key (with the closest known key); ``unknown_keys`` warn / ignore reports it once / says nothing
(:mod:`mmpo.data_rows`).

A bad episode (a missing or unreadable screenshot: each is opened and its header decoded at load,
:mod:`mmpo.media_check`; a malformed action, a bad box or size, a path escape, a
repeated id...) does not stop the load: it is skipped and recorded as ``{"line": n, "id": ...,
"error": "<file>: line <n>: key '<k>': <why>", "reason": ...}`` (lines counted from 1; ``reason``:
the short reason a task's summary line counts). ``DataError`` is raised only when the file cannot
be read, a key is unknown or no episode is valid.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpo.data import RecordError
from mmpo.data_rows import KeyCheck, iter_numbered_rows, skip_reason
from mmpo.errors import DataError
from mmpo.media_check import MediaError, check_image
from mmpo.paths import PathRefused, contained_path
from mmpo_tasks.gui_agent.actions import Action, parse_action

Box = tuple[float, float, float, float]
EPISODE_KEYS = ("id", "instruction", "steps", "meta")
STEP_KEYS = ("screenshot", "action", "target_box", "screen_size")


@dataclass
class GuiStep:
    """One step: the screenshot seen (a path; after :func:`load_episodes`, the JSONL folder joined
    with the stored relative path), the action taken, the target element's normalised box
    ``(x0, y0, x1, y1)`` if known, and the screen ``(width, height)`` in pixels if known."""

    screenshot: str
    action: Action
    target_box: Box | None = None
    screen_size: tuple[int, int] | None = None


@dataclass
class GuiEpisode:
    """An instruction and the steps that carry it out."""

    id: str
    instruction: str
    steps: list[GuiStep]
    meta: dict[str, Any] = field(default_factory=dict)


class _RowError(Exception):
    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"key '{key}': {why}")
        self.key, self.why = key, why


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_relative(ref: str) -> str:
    """``ref`` as a POSIX relative path; ValueError when it is absolute or has a ``..`` part."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"must be a non-empty relative path, got {_show(ref)}")
    ref = ref.strip()
    if ref.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", ref) or Path(ref).is_absolute():
        raise ValueError(f"{_show(ref)} is an absolute path; paths must be relative to the file's folder")
    if ".." in re.split(r"[\\/]+", ref):
        raise ValueError(f"{_show(ref)} leaves the file's folder ('..')")
    return ref


def check_box(value: Any) -> Box:
    """A normalised box ``(x0, y0, x1, y1)``; ValueError saying why it is not one."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_num(v) for v in value):
        raise ValueError(f"must be [x0, y0, x1, y1] (4 numbers), got {_show(value)}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise ValueError(f"{_show(value)}: coordinates must lie in [0, 1]")
    if x0 > x1 or y0 > y1:
        raise ValueError(f"{_show(value)}: needs x0 <= x1 and y0 <= y1")
    return (x0, y0, x1, y1)


def _size(value: Any) -> tuple[int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"must be [width, height] (2 positive integers), got {_show(value)}")
    return (int(value[0]), int(value[1]))


def action_text(action: Action) -> str:
    """The stored text of ``action`` (like ``Action.to_text`` with clicks kept to 6 decimals);
    DataError for a no-op / malformed action, which the layout cannot hold."""
    if action.kind == "noop" or action.malformed:
        raise DataError(f"a no-op / malformed action cannot be saved ({action.error or action.kind})")
    if action.kind == "click":
        return f"click({round(float(action.x), 6)!r}, {round(float(action.y), 6)!r})"
    return action.to_text()


def _step(rec: Any, k: int, folder: Path) -> GuiStep:
    key = f"steps[{k}]"
    if not isinstance(rec, dict):
        raise _RowError(key, f"must be an object, got {type(rec).__name__}")
    try:
        size = None if rec.get("screen_size") is None else _size(rec["screen_size"])
    except ValueError as e:
        raise _RowError(f"{key}.screen_size", str(e)) from None
    try:
        ref = check_relative(rec.get("screenshot"))
    except ValueError as e:
        raise _RowError(f"{key}.screenshot", str(e)) from None
    shot = folder / ref
    try:
        target = contained_path(folder, ref)  # symlinks followed: a link out of the folder is refused
    except PathRefused as e:
        raise _RowError(f"{key}.screenshot", e.why) from None
    if not target.is_file():
        raise _RowError(f"{key}.screenshot", f"file not found: {shot}")
    try:
        check_image(target)  # header decoded now, not when the step is drawn (mmpo.media_check)
    except MediaError as e:
        raise _RowError(f"{key}.screenshot", e.naming(shot)) from None
    text = rec.get("action")
    if not isinstance(text, str) or not text.strip():
        raise _RowError(f"{key}.action", f"must be an action string, got {_show(text)}")
    action = parse_action(f"<action>{text}</action>", screen_size=size)
    if action.malformed:
        raise _RowError(f"{key}.action", f"{_show(text)}: {action.error}")
    try:
        box = None if rec.get("target_box") is None else check_box(rec["target_box"])
    except ValueError as e:
        raise _RowError(f"{key}.target_box", str(e)) from None
    return GuiStep(screenshot=str(shot), action=action, target_box=box, screen_size=size)


def _episode(rec: Any, folder: Path) -> GuiEpisode:
    if not isinstance(rec, dict):
        raise _RowError("(line)", f"must be a JSON object, got {type(rec).__name__}")
    rid = rec.get("id")
    if not (isinstance(rid, str) and rid.strip()) and not (isinstance(rid, int) and not isinstance(rid, bool)):
        raise _RowError("id", f"must be a non-empty string or an integer, got {_show(rid)}")
    instruction = rec.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _RowError("instruction", f"must be a non-empty string, got {_show(instruction)}")
    steps = rec.get("steps")
    if not isinstance(steps, list) or not steps:
        raise _RowError("steps", f"must be a non-empty list of steps, got {_show(steps)}")
    meta = rec.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _RowError("meta", f"must be an object, got {type(meta).__name__}")
    return GuiEpisode(
        id=str(rid).strip(),
        instruction=instruction.strip(),
        steps=[_step(s, k, folder) for k, s in enumerate(steps)],
        meta=dict(meta),
    )


def check_episode_keys(rec: dict[str, Any], keys: KeyCheck, file: Path, where: str) -> None:
    """Check an episode record's keys and its steps' keys (:data:`EPISODE_KEYS`, :data:`STEP_KEYS`)."""
    keys.check(rec, EPISODE_KEYS, file, where, layout="GUI episode")
    if isinstance(rec.get("steps"), list):
        for k, step in enumerate(rec["steps"]):
            if isinstance(step, dict):
                keys.check(step, STEP_KEYS, file, where, f"steps[{k}]", "GUI step")


def load_episodes(
    path: str | os.PathLike[str], *, unknown_keys: str | KeyCheck = "error"
) -> tuple[list[GuiEpisode], list[dict[str, Any]]]:
    """The valid episodes of a JSONL file (layout: module docstring) and the skipped ones as
    ``{"line", "id", "error", "reason"}``. DataError when the file cannot be read, a key is unknown
    (``unknown_keys``: error | warn | ignore, or a :class:`~mmpo.data_rows.KeyCheck`) or no
    episode is valid."""
    path = Path(path)
    keys = KeyCheck.of(unknown_keys)
    if not path.is_file():
        raise DataError(f"{path}: episode file not found")
    folder = path.parent
    episodes: list[GuiEpisode] = []
    skipped: list[dict[str, Any]] = []
    ids: set[str] = set()
    for _, n, rec in iter_numbered_rows(path, kind="jsonl"):
        rid = None
        try:
            if isinstance(rec, RecordError):
                raise _RowError("(line)", str(rec))
            if isinstance(rec, dict):
                rid = rec.get("id")
                check_episode_keys(rec, keys, path, f"line {n}")
            ep = _episode(rec, folder)
            if ep.id in ids:
                raise _RowError("id", f"{ep.id!r} repeats an earlier episode's id")
        except _RowError as e:
            skipped.append(
                {"line": n, "id": rid, "error": f"{path}: line {n}: {e}", "reason": skip_reason(e.key, e.why)}
            )
            continue
        ids.add(ep.id)
        episodes.append(ep)
    if not episodes:
        first = f"; first: {skipped[0]['error']}" if skipped else ""
        raise DataError(f"{path}: no valid episode ({len(skipped)} skipped){first}")
    return episodes, skipped


def _stored_path(screenshot: str, folder: Path, where: str) -> str:
    rel = os.path.relpath(Path(screenshot).absolute(), folder.absolute())
    rel = Path(rel).as_posix()
    try:
        return check_relative(rel)
    except ValueError:
        raise DataError(
            f"{where}: screenshot {screenshot} is outside the output folder {folder}; "
            "the layout keeps screenshots inside the JSONL file's folder"
        ) from None


def episode_record(ep: GuiEpisode, folder: Path) -> dict[str, Any]:
    """The JSON object of ``ep`` with screenshot paths relative to ``folder``."""
    steps = []
    for k, s in enumerate(ep.steps):
        where = f"episode {ep.id!r} step {k}"
        try:
            text = action_text(s.action)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        steps.append(
            {
                "screenshot": _stored_path(s.screenshot, folder, where),
                "action": text,
                "target_box": None if s.target_box is None else [float(v) for v in s.target_box],
                "screen_size": None if s.screen_size is None else [int(v) for v in s.screen_size],
            }
        )
    return {"id": ep.id, "instruction": ep.instruction, "steps": steps, "meta": ep.meta}


def save_episodes(episodes: list[GuiEpisode], path: str | os.PathLike[str]) -> None:
    """Write ``episodes`` as JSONL (layout: module docstring): a temporary file, then renamed into
    place. Screenshot paths (relative ones taken from the working directory) are stored relative
    to ``path``'s folder; DataError when one lies outside it or an action is a no-op."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(episode_record(ep, path.parent), ensure_ascii=False) for ep in episodes]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = [
    "GuiEpisode",
    "GuiStep",
    "EPISODE_KEYS",
    "STEP_KEYS",
    "action_text",
    "check_box",
    "check_episode_keys",
    "check_relative",
    "episode_record",
    "load_episodes",
    "save_episodes",
]
