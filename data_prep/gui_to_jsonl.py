"""Convert AndroidControl, GUI-Odyssey or Android-in-the-Wild episodes into the GUI episode JSONL.

    python data_prep/gui_to_jsonl.py androidcontrol episodes.jsonl --image-root IMAGES --out OUT.jsonl
    python data_prep/gui_to_jsonl.py guiodyssey     annotations.json --image-root IMAGES --out OUT.jsonl
    python data_prep/gui_to_jsonl.py aitw           rows.parquet   --image-root IMAGES --out OUT.jsonl

Output: one episode a line, read back with ``mmpo_tasks.gui_agent.episodes.load_episodes``:
``{"id", "instruction", "steps": [{"screenshot" (relative to the output file's folder), "action",
"target_box": null, "screen_size": [w, h]}], "meta": {"source", ...}}``. Screenshot paths are
relative to ``--image-root``; every screenshot must exist and is opened (header only) for its size.
Since the layout keeps screenshots inside the output file's folder, ``--out`` must lie in the image
root or a folder above it. An episode that cannot be converted is skipped as a whole and reported
(``{"row", "id", "error"}``, rows counted from 1); the output is written to a temporary file, then
renamed into place. SRC is a .json list, a .jsonl file or a .parquet file of records.

Assumed layouts. They are written from memory of the public datasets (nothing is downloaded
here); check them against your copy:

- **AndroidControl** (google-research/android_control, after unpacking the TFRecords with the
  screenshots saved as files): one record an episode, ``{"episode_id", "goal": str, "screenshots":
  [image paths], "actions": [dicts or JSON strings], "step_instructions": [str] (optional, kept in
  meta)}``. Action dicts: ``{"action_type": "click", "x": px, "y": px}`` (pixels of that step's
  screenshot, normalised by its size read from the image), ``{"action_type": "input_text", "text"}``,
  ``{"action_type": "scroll", "direction": "up|down|left|right"}`` (taken as it is: AndroidControl
  / AndroidWorld name the direction the view moves over the content), ``navigate_back``,
  ``navigate_home``. ``open_app`` and ``wait`` have no counterpart in our action space and are not
  mapped to a no-op or to ``finished`` (which would end the episode): the step is dropped with its
  screenshot (an ``open_app`` is nearly always the first step, so the episode starts on the opened
  app); the count is kept in ``meta["dropped_steps"]``. ``long_press`` (and any other type) skips
  the episode. There are as many screenshots as actions, or one more: that last screenshot (the
  state after the last action) becomes a ``finished()`` step, since the episodes are successful
  demonstrations.
- **GUI-Odyssey** (OpenGVLab/GUI-Odyssey, ``annotations/*.json``, a file or a list of them):
  ``{"episode_id", "instruction" (or ``task_info.instruction``), "steps" (or "step_info"):
  [{"screenshot": path, "action": ..., "info": ...}]}`` with coordinates on a 0..1000 grid
  (divided by 1000). ``CLICK`` ``info [[x, y]]`` -> click; ``TEXT`` ``info "text"`` -> type;
  ``SCROLL`` ``info`` a direction word or ``[[x0, y0], [x1, y1]]`` (a swipe, mapped as below) ->
  scroll; ``PRESS_BACK`` / ``PRESS_HOME`` -> back / home; ``COMPLETE`` -> finished;
  ``INCOMPLETE``, ``LONG_PRESS``, ``PRESS_RECENT`` and others skip the episode.
- **AITW** (google-research/android_in_the_wild, the TFRecord features as rows, screenshots saved
  as files): ``{"episode_id", "goal_info", "image_path", "step_id", "result_action_type",
  "result_touch_yx", "result_lift_yx", "result_action_text"}``, grouped by episode and ordered by
  ``step_id``. The yx points are ``[y, x]`` normalised (lists or their JSON text). Action codes:
  4 dual-point gesture (a click at the touch point ``(x, y)`` when touch and lift are at most
  0.04 apart (Euclidean, normalised; as AITW's action matching), else a scroll), 3 type (the
  ``result_action_text``), 5 back, 6 home, 7 enter, 10 task complete -> finished; any other code
  (11 task impossible, ...) skips the episode. ``goal_info`` of the first row is the instruction.

Swipe -> scroll direction: the dominant axis of the finger's movement (|dx| vs |dy|; a tie
counts as vertical), and the scroll direction is *opposite* to the finger (AndroidWorld's
convention, the one AndroidControl's directions use): a finger moving up (lift above touch)
reveals content further down, ``scroll(down)``; a finger moving left is ``scroll(right)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from mmpo.data import RecordError, print_conversion_summary, read_records
from mmpo.errors import DataError, MMPOError
from mmpo_tasks.gui_agent.actions import Action
from mmpo_tasks.gui_agent.episodes import GuiEpisode, GuiStep, check_relative, save_episodes

SWIPE_THRESHOLD = 0.04
ODYSSEY_GRID = 1000.0
AITW_CODES = {3: "type", 4: "dual_point", 5: "back", 6: "home", 7: "enter", 10: "finished"}


class _Skip(Exception):
    """An episode that cannot be converted (the message says why)."""


def _num(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Skip(f"key '{key}': must be a number, got {value!r:.60}")
    return float(value)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Skip(f"key '{key}': must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _norm(x: float, y: float, key: str) -> tuple[float, float]:
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise _Skip(f"key '{key}': point ({x:.4g}, {y:.4g}) lies outside the screen")
    return x, y


def swipe_direction(x0: float, y0: float, x1: float, y1: float) -> str:
    """The scroll direction of a finger swipe from ``(x0, y0)`` to ``(x1, y1)`` (see the module
    docstring: dominant axis, opposite to the finger)."""
    dx, dy = x1 - x0, y1 - y0
    if abs(dx) > abs(dy):
        return "right" if dx < 0 else "left"
    return "down" if dy < 0 else "up"


class _Screens:
    """Screenshot paths under the image root: checked, sized (PIL header), each file once."""

    def __init__(self, root: Path, out_dir: Path) -> None:
        self.root, self.out_dir, self.sizes = root, out_dir, {}

    def get(self, ref: Any, key: str) -> tuple[str, tuple[int, int]]:
        if not isinstance(ref, str) or not ref.strip():
            raise _Skip(f"key '{key}': must be an image path, got {ref!r:.60}")
        path = self.root / ref.strip()
        rel = Path(os.path.relpath(path.absolute(), self.out_dir.absolute())).as_posix()
        try:
            check_relative(rel)
        except ValueError:
            raise _Skip(f"key '{key}': {path} is outside the output file's folder {self.out_dir}") from None
        if rel not in self.sizes:
            if not path.is_file():
                raise _Skip(f"key '{key}': file not found: {path}")
            try:
                from PIL import Image

                with Image.open(path) as im:
                    self.sizes[rel] = (int(im.size[0]), int(im.size[1]))
            except Exception as e:  # PIL raises several types for a bad image
                raise _Skip(f"key '{key}': cannot read image {path}: {e}") from None
        return str(path), self.sizes[rel]


def _convert(
    src: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    out_jsonl: str | os.PathLike[str],
    source: str,
    episodes: Callable[[list[Any], _Screens], Iterable[tuple[int, Any, Callable[[], GuiEpisode]]]],
) -> dict[str, Any]:
    src_p, root, out = Path(src), Path(image_root), Path(out_jsonl)
    if not root.is_dir():
        raise DataError(f"{root}: image root folder not found")
    try:
        check_relative(Path(os.path.relpath(root.resolve(), out.parent.resolve())).as_posix())
    except ValueError:
        raise DataError(
            f"--image-root {root} is not inside the output file's folder {out.parent}; the layout keeps "
            "screenshots inside it (write --out into the image root or a folder above it)"
        ) from None
    records = read_records(src_p, allow_object=True)
    screens = _Screens(root, out.parent)
    done, skipped, ids = [], [], set()
    for n, rid, make in episodes(records, screens):
        try:
            ep = make()
            if ep.id in ids:
                raise _Skip(f"key 'id': {ep.id!r} repeats an earlier episode's id")
        except _Skip as e:
            skipped.append({"row": n, "id": rid, "error": f"{src_p}: row {n}: {e}"})
            continue
        ep.meta.setdefault("source", source)
        ids.add(ep.id)
        done.append(ep)
    if not done:
        first = f"; first: {skipped[0]['error']}" if skipped else ""
        raise DataError(f"{src_p}: no episode could be converted ({len(records)} record(s) read){first}")
    save_episodes(done, out)
    return {"out": str(out), "written": len(done), "skipped": skipped}


def _per_record(
    records: list[Any], make: Callable[[int, dict[str, Any]], GuiEpisode], id_key: str
) -> Iterable[tuple[int, Any, Callable[[], GuiEpisode]]]:
    for n, rec in enumerate(records, 1):

        def build(n: int = n, rec: Any = rec) -> GuiEpisode:
            if isinstance(rec, RecordError):
                raise _Skip(str(rec))
            if not isinstance(rec, dict):
                raise _Skip(f"expected an object, got {type(rec).__name__}")
            return make(n, rec)

        yield n, rec.get(id_key) if isinstance(rec, dict) else None, build


def _episode_id(rec: dict[str, Any], key: str, fallback: str) -> str:
    rid = rec.get(key)
    ok = (isinstance(rid, str) and rid.strip()) or (isinstance(rid, int) and not isinstance(rid, bool))
    return str(rid).strip() if ok else fallback


# AndroidControl ---------------------------------------------------------------------------------


def _androidcontrol_action(a: Any, size: tuple[int, int], key: str) -> Action | None:
    """The action, or None for a step that is dropped (open_app, wait)."""
    if isinstance(a, str):
        try:
            a = json.loads(a)
        except json.JSONDecodeError:
            raise _Skip(f"key '{key}': not valid JSON: {a!r:.60}") from None
    if not isinstance(a, dict):
        raise _Skip(f"key '{key}': must be an object, got {type(a).__name__}")
    kind = a.get("action_type")
    if kind == "click":
        x, y = _num(a.get("x"), f"{key}.x"), _num(a.get("y"), f"{key}.y")
        return Action("click", *_norm(x / size[0], y / size[1], key))
    if kind == "input_text":
        text = a.get("text")
        if not isinstance(text, str):
            raise _Skip(f"key '{key}.text': must be a string, got {text!r:.60}")
        return Action("type", text=text)
    if kind == "scroll":
        d = a.get("direction")
        if d not in ("up", "down", "left", "right"):
            raise _Skip(f"key '{key}.direction': must be up, down, left or right, got {d!r:.60}")
        return Action("scroll", direction=d)
    if kind in ("navigate_back", "navigate_home"):
        return Action("back" if kind == "navigate_back" else "home")
    if kind in ("open_app", "wait"):
        return None
    raise _Skip(f"key '{key}.action_type': {kind!r:.60} is not supported")


def convert_androidcontrol(
    src: str | os.PathLike[str], image_root: str | os.PathLike[str], out_jsonl: str | os.PathLike[str]
) -> dict[str, Any]:
    """Convert AndroidControl episodes (layout: module docstring). Returns ``{"out", "written",
    "skipped": [{"row", "id", "error"}]}``; DataError when SRC is unreadable or nothing converts."""

    def make(n: int, rec: dict[str, Any], screens: _Screens) -> GuiEpisode:
        goal = _text(rec.get("goal"), "goal")
        shots, actions = rec.get("screenshots"), rec.get("actions")
        if not isinstance(shots, list) or not isinstance(actions, list) or not actions:
            raise _Skip("keys 'screenshots', 'actions': must be lists (actions not empty)")
        if len(shots) not in (len(actions), len(actions) + 1):
            raise _Skip(f"keys 'screenshots', 'actions': {len(shots)} screenshots for {len(actions)} actions")
        steps, dropped = [], 0
        for k, shot in enumerate(shots):
            path, size = screens.get(shot, f"screenshots[{k}]")
            action = (
                _androidcontrol_action(actions[k], size, f"actions[{k}]") if k < len(actions) else Action("finished")
            )
            if action is None:
                dropped += 1
                continue
            steps.append(GuiStep(path, action, None, size))
        if not steps:
            raise _Skip("no step left after dropping open_app / wait")
        meta: dict[str, Any] = {"source": "androidcontrol", "dropped_steps": dropped}
        if isinstance(rec.get("step_instructions"), list):
            meta["step_instructions"] = rec["step_instructions"]
        return GuiEpisode(_episode_id(rec, "episode_id", f"androidcontrol_{n - 1:06d}"), goal, steps, meta)

    return _convert(
        src,
        image_root,
        out_jsonl,
        "androidcontrol",
        lambda recs, screens: _per_record(recs, lambda n, r: make(n, r, screens), "episode_id"),
    )


# GUI-Odyssey ------------------------------------------------------------------------------------


def _point(value: Any, key: str) -> tuple[float, float]:
    """``[x, y]`` (or ``[[x, y]]``) on the 0..1000 grid, normalised."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list) or len(value) != 2:
        raise _Skip(f"key '{key}': must be [[x, y]], got {value!r:.60}")
    return _norm(_num(value[0], key) / ODYSSEY_GRID, _num(value[1], key) / ODYSSEY_GRID, key)


def _odyssey_action(step: dict[str, Any], key: str) -> Action:
    kind, info = step.get("action"), step.get("info")
    if kind == "CLICK":
        return Action("click", *_point(info, f"{key}.info"))
    if kind == "TEXT":
        if not isinstance(info, str):
            raise _Skip(f"key '{key}.info': TEXT needs a string, got {info!r:.60}")
        return Action("type", text=info)
    if kind == "SCROLL":
        if isinstance(info, str) and info.strip().lower() in ("up", "down", "left", "right"):
            return Action("scroll", direction=info.strip().lower())
        if isinstance(info, list) and len(info) == 2:
            (x0, y0), (x1, y1) = _point(info[0], f"{key}.info[0]"), _point(info[1], f"{key}.info[1]")
            if (x0, y0) == (x1, y1):
                raise _Skip(f"key '{key}.info': SCROLL start and end are the same point")
            return Action("scroll", direction=swipe_direction(x0, y0, x1, y1))
        raise _Skip(f"key '{key}.info': SCROLL needs a direction or [[x0, y0], [x1, y1]], got {info!r:.60}")
    simple = {"PRESS_BACK": "back", "PRESS_HOME": "home", "COMPLETE": "finished"}
    if kind in simple:
        return Action(simple[kind])
    raise _Skip(f"key '{key}.action': {kind!r:.60} is not supported")


def convert_guiodyssey(
    src: str | os.PathLike[str], image_root: str | os.PathLike[str], out_jsonl: str | os.PathLike[str]
) -> dict[str, Any]:
    """Convert GUI-Odyssey episodes (layout: module docstring). Returns like
    :func:`convert_androidcontrol`."""

    def make(n: int, rec: dict[str, Any], screens: _Screens) -> GuiEpisode:
        task_info = rec.get("task_info") if isinstance(rec.get("task_info"), dict) else {}
        instruction = _text(rec.get("instruction", task_info.get("instruction")), "instruction")
        raw = rec.get("steps", rec.get("step_info"))
        if not isinstance(raw, list) or not raw:
            raise _Skip(f"key 'steps': must be a non-empty list, got {raw!r:.60}")
        steps = []
        for k, s in enumerate(raw):
            if not isinstance(s, dict):
                raise _Skip(f"key 'steps[{k}]': must be an object")
            path, size = screens.get(s.get("screenshot"), f"steps[{k}].screenshot")
            steps.append(GuiStep(path, _odyssey_action(s, f"steps[{k}]"), None, size))
        return GuiEpisode(
            _episode_id(rec, "episode_id", f"guiodyssey_{n - 1:06d}"), instruction, steps, {"source": "guiodyssey"}
        )

    return _convert(
        src,
        image_root,
        out_jsonl,
        "guiodyssey",
        lambda recs, screens: _per_record(recs, lambda n, r: make(n, r, screens), "episode_id"),
    )


# AITW -------------------------------------------------------------------------------------------


def _yx(value: Any, key: str) -> tuple[float, float]:
    """A ``[y, x]`` point (list or JSON text) as normalised ``(x, y)``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Skip(f"key '{key}': not a [y, x] point: {value!r:.60}") from None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Skip(f"key '{key}': must be [y, x], got {value!r:.60}")
    y, x = _num(value[0], key), _num(value[1], key)
    return _norm(x, y, key)


def _aitw_action(row: dict[str, Any]) -> Action:
    code = row.get("result_action_type")
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code)
    kind = AITW_CODES.get(code) if isinstance(code, int) and not isinstance(code, bool) else None
    if kind is None:
        raise _Skip(f"key 'result_action_type': {code!r:.60} is not supported")
    if kind == "dual_point":
        x0, y0 = _yx(row.get("result_touch_yx"), "result_touch_yx")
        x1, y1 = _yx(row.get("result_lift_yx"), "result_lift_yx")
        if math.hypot(x1 - x0, y1 - y0) <= SWIPE_THRESHOLD:
            return Action("click", x=x0, y=y0)
        return Action("scroll", direction=swipe_direction(x0, y0, x1, y1))
    if kind == "type":
        text = row.get("result_action_text")
        if not isinstance(text, str):
            raise _Skip(f"key 'result_action_text': must be a string, got {text!r:.60}")
        return Action("type", text=text)
    return Action(kind)


def convert_aitw(
    src: str | os.PathLike[str], image_root: str | os.PathLike[str], out_jsonl: str | os.PathLike[str]
) -> dict[str, Any]:
    """Convert AITW step rows, grouped into episodes (layout: module docstring). Returns like
    :func:`convert_androidcontrol`; ``row`` is the episode's first row."""

    def episodes(records: list[Any], screens: _Screens) -> Iterable[tuple[int, Any, Callable[[], GuiEpisode]]]:
        groups: dict[str, list[tuple[int, Any]]] = {}
        for n, rec in enumerate(records, 1):
            eid = rec.get("episode_id") if isinstance(rec, dict) else None
            ok = (isinstance(eid, str) and eid.strip()) or (isinstance(eid, int) and not isinstance(eid, bool))
            groups.setdefault(str(eid).strip() if ok else f"\0row{n}", []).append((n, rec))
        for eid, rows in groups.items():

            def build(eid: str = eid, rows: list[tuple[int, Any]] = rows) -> GuiEpisode:
                n0, first = rows[0]
                if isinstance(first, RecordError):
                    raise _Skip(str(first))
                if eid.startswith("\0"):
                    raise _Skip(
                        f"key 'episode_id': must be a string or an integer, got "
                        f"{first.get('episode_id') if isinstance(first, dict) else first!r:.60}"
                    )
                ordered = []
                for n, row in rows:
                    sid = row.get("step_id")
                    if isinstance(sid, bool) or not isinstance(sid, int):
                        raise _Skip(f"row {n}: key 'step_id': must be an integer, got {sid!r:.60}")
                    ordered.append((sid, n, row))
                ordered.sort(key=lambda t: t[0])
                sids = [t[0] for t in ordered]
                if len(set(sids)) != len(sids):
                    raise _Skip("key 'step_id': repeated within the episode")
                instruction = _text(ordered[0][2].get("goal_info"), "goal_info")
                steps = []
                for sid, n, row in ordered:
                    try:
                        path, size = screens.get(row.get("image_path"), "image_path")
                        steps.append(GuiStep(path, _aitw_action(row), None, size))
                    except _Skip as e:
                        raise _Skip(f"row {n} (step_id {sid}): {e}") from None
                return GuiEpisode(eid, instruction, steps, {"source": "aitw", "rows": [t[1] for t in ordered]})

            yield rows[0][0], None if eid.startswith("\0") else eid, build

    return _convert(src, image_root, out_jsonl, "aitw", episodes)


CONVERTERS = {"androidcontrol": convert_androidcontrol, "guiodyssey": convert_guiodyssey, "aitw": convert_aitw}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("layout", choices=sorted(CONVERTERS), help="layout of SRC")
    p.add_argument("src", help="episodes / rows as .json, .jsonl or .parquet")
    p.add_argument("--image-root", required=True, help="folder the screenshot paths are relative to")
    p.add_argument("--out", required=True, help="output .jsonl (inside the image root or a folder above it)")
    a = p.parse_args(argv)
    try:
        stats = CONVERTERS[a.layout](a.src, a.image_root, a.out)
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_conversion_summary(stats, "episode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
