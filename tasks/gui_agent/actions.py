"""One GUI action space and its strict parser (HiconAgent / ScreenExplorer / MiniWoB).

The model writes one action inside ``<action>...</action>``::

    click(0.42, 0.13)      # x, y normalised to the screenshot (0..1; pixel coordinates are
                           # accepted when the screenshot size is known, and normalised)
    click_element(17)      # a MiniWoB DOM element by its ref
    type("hello world")    # a string literal
    scroll(down)           # up | down | left | right
    back()  home()  enter()  finished()

Anything else - no tag, an unknown verb, wrong arity or types, coordinates outside the screen - is
a *malformed* action: a no-op that is counted (``Action.malformed``) and reported (``error``).
Arguments are parsed as Python literals (``ast.literal_eval``), never evaluated.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL)
CALL_RE = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)
DIRECTIONS = ("up", "down", "left", "right")
NO_ARGS = ("back", "home", "enter", "finished")
KINDS = ("click", "click_element", "type", "scroll", *NO_ARGS, "noop")
MAX_TYPE_CHARS = 512


@dataclass(frozen=True)
class Action:
    """A parsed action. ``x, y`` in [0, 1] for clicks; ``text`` for type; ``direction`` for
    scroll; ``ref`` for click_element. ``kind == "noop"`` with ``malformed`` and ``error`` for an
    output that is not a valid action."""

    kind: str
    x: float | None = None
    y: float | None = None
    text: str | None = None
    direction: str | None = None
    ref: int | None = None
    malformed: bool = False
    error: str = ""

    def to_text(self) -> str:
        """The canonical action text (what a history step shows the model)."""
        if self.kind == "click":
            return f"click({self.x:.3f}, {self.y:.3f})"
        if self.kind == "click_element":
            return f"click_element({self.ref})"
        if self.kind == "type":
            return f"type({self.text!r})"
        if self.kind == "scroll":
            return f"scroll({self.direction})"
        return f"{self.kind}()"


def _noop(error: str) -> Action:
    return Action("noop", malformed=True, error=error)


def _args(body: str) -> list[Any]:
    """The comma-separated arguments as literals; bare words (``down``) stay strings."""
    body = body.strip()
    if not body:
        return []
    if re.fullmatch(r"[A-Za-z_]+", body):
        return [body]
    value = ast.literal_eval(f"({body},)")
    return list(value)


def parse_action(text: str, *, screen_size: tuple[int, int] | None = None) -> Action:
    """The action in the last ``<action>...</action>`` of ``text`` (see the module docstring).

    ``screen_size`` ``(width, height)`` lets pixel coordinates be normalised; without it,
    coordinates must already lie in [0, 1].
    """
    found = ACTION_RE.findall(text)
    if not found:
        return _noop("no <action>...</action>")
    m = CALL_RE.match(found[-1])
    if not m:
        return _noop(f"not a call: {found[-1].strip()[:60]!r}")
    verb, body = m.group(1), m.group(2)
    if verb not in KINDS or verb == "noop":
        return _noop(f"unknown action {verb!r}; valid: {', '.join(k for k in KINDS if k != 'noop')}")
    try:
        args = _args(body)
    except (ValueError, SyntaxError):
        return _noop(f"{verb}: arguments are not literals: {body.strip()[:60]!r}")
    if verb in NO_ARGS:
        return Action(verb) if not args else _noop(f"{verb}() takes no arguments")
    if verb == "click":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            return _noop("click(x, y) needs two numbers")
        x, y = float(args[0]), float(args[1])
        if (x > 1 or y > 1) and screen_size is not None:
            x, y = x / screen_size[0], y / screen_size[1]
        if not (0 <= x <= 1 and 0 <= y <= 1):
            return _noop(f"click({args[0]}, {args[1]}) is outside the screen")
        return Action("click", x=x, y=y)
    if verb == "click_element":
        if len(args) != 1 or not isinstance(args[0], int) or isinstance(args[0], bool) or args[0] < 0:
            return _noop("click_element(ref) needs one non-negative integer")
        return Action("click_element", ref=int(args[0]))
    if verb == "type":
        if len(args) != 1 or not isinstance(args[0], str):
            return _noop('type("text") needs one string')
        if len(args[0]) > MAX_TYPE_CHARS:
            return _noop(f"type: text longer than {MAX_TYPE_CHARS} characters")
        return Action("type", text=args[0])
    # scroll
    if len(args) != 1 or not isinstance(args[0], str) or args[0].strip("'\"") not in DIRECTIONS:
        return _noop(f"scroll(direction) needs one of {', '.join(DIRECTIONS)}")
    return Action("scroll", direction=args[0].strip("'\""))


__all__ = ["Action", "DIRECTIONS", "KINDS", "parse_action"]
