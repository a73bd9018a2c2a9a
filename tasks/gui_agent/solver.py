"""A scripted oracle for some MiniWoB++ tasks: it reads the DOM elements and the instruction of a
:class:`~mmpo_tasks.gui_agent.miniwob_env.GuiObservation` and answers with pixel-grounded actions
(``click(x, y)`` at a visible point of the target element, normalised to the screenshot;
``type(text)`` into the focused field), never ``click_element``, so that recorded episodes look
like AndroidControl's (a screenshot, a click point, the target's box).

    solver = ScriptedSolver("enter-text")
    solver.reset()                      # at every episode start
    step = solver.act(obs)              # SolverStep(action, target_box, ref) or None (gives up)

DOM coordinates (``left``, ``top``, ``width``, ``height``) are CSS pixels of the page; MiniWoB's
screenshot is the 160 x 210 task area at device scale 1, so CSS pixels are screenshot pixels
(checked live: clicks at those centres earn the reward). Elements are clipped to the screen;
one lying wholly outside it cannot be clicked.

Every task but ``click-button-sequence`` is solved from the current DOM alone (field values,
checkbox states and the focus flag say how far the episode has got), so a step that misfired is
simply retried; ``click-button-sequence`` remembers the buttons clicked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from mmpo.errors import ConfigError
from mmpo_tasks.gui_agent.actions import Action
from mmpo_tasks.gui_agent.miniwob_env import GuiObservation

Box = tuple[float, float, float, float]
Element = dict[str, Any]

# CSS named colours of click-color's palette (its COLORS list), as RGB in [0, 1]
CSS_COLORS: dict[str, tuple[float, float, float]] = {
    name: (r / 255, g / 255, b / 255)
    for name, (r, g, b) in {
        "red": (255, 0, 0),
        "blue": (0, 0, 255),
        "olive": (128, 128, 0),
        "lime": (0, 255, 0),
        "black": (0, 0, 0),
        "white": (255, 255, 255),
        "grey": (128, 128, 128),
        "gray": (128, 128, 128),
        "purple": (128, 0, 128),
        "orange": (255, 165, 0),
        "yellow": (255, 255, 0),
        "cyan": (0, 255, 255),
        "pink": (255, 192, 203),
        "magenta": (255, 0, 255),
    }.items()
}
ORDINALS = {"1st": 1, "2nd": 2, "3rd": 3}
WIDGET_TAGS = {
    "radio": "input_radio",
    "checkbox": "input_checkbox",
    "text": "input_text",
    "textarea": "textarea",
    "button": "button",
}
GRID = 9  # candidate click points per box side when the centre is covered


class SolverError(ConfigError):
    """The solver cannot be used as asked (an unknown task, a task that needs memory...)."""


@dataclass(frozen=True)
class SolverStep:
    """One oracle step: the action, the target element's box ``(x0, y0, x1, y1)`` normalised to
    the screenshot (for ``type``: the focused field the text goes into) and its DOM ``ref``."""

    action: Action
    target_box: Box
    ref: int


@dataclass
class _Memory:
    """What an episode remembers between steps (only tasks whose DOM does not show progress)."""

    clicked: list[int] = field(default_factory=list)


# -- DOM helpers ---------------------------------------------------------------------------------
def _num(v: Any) -> float:
    """A DOM coordinate: MiniWoB gives 1-element arrays."""
    try:
        return float(v[0])
    except (TypeError, IndexError):
        return float(v)


def _rect(e: Element) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in CSS (= screenshot) pixels."""
    x, y = _num(e["left"]), _num(e["top"])
    return x, y, x + _num(e["width"]), y + _num(e["height"])


def _clip(rect: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    w, h = size
    x0, y0, x1, y1 = max(rect[0], 0.0), max(rect[1], 0.0), min(rect[2], float(w)), min(rect[3], float(h))
    return (x0, y0, x1, y1) if x1 - x0 >= 1 and y1 - y0 >= 1 else None


def _descendants(dom: list[Element], ref: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for e in dom:
        children.setdefault(int(e["parent"]), []).append(int(e["ref"]))
    out, todo = set(), [ref]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _inside(p: tuple[float, float], r: tuple[float, float, float, float]) -> bool:
    return r[0] <= p[0] <= r[2] and r[1] <= p[1] <= r[3]


def _click_point(
    dom: list[Element], target: Element, box: tuple[float, float, float, float]
) -> tuple[float, float] | None:
    """A point of ``box`` (pixels) not covered by an element painted later (a later DOM element
    that is not inside the target: e.g. click-test-2's second button over the first), the
    nearest to the centre; the centre when nothing covers it, None when all is covered."""
    ref = int(target["ref"])
    idx = next(i for i, e in enumerate(dom) if int(e["ref"]) == ref)
    inner = _descendants(dom, ref)
    covers = [
        _rect(e)
        for e in dom[idx + 1 :]
        if int(e["ref"]) not in inner and _num(e["width"]) > 0 and _num(e["height"]) > 0
    ]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    if not any(_inside((cx, cy), r) for r in covers):
        return cx, cy
    margin = 1.0  # stay a pixel inside the border
    xs = [box[0] + margin + (box[2] - box[0] - 2 * margin) * (i + 0.5) / GRID for i in range(GRID)]
    ys = [box[1] + margin + (box[3] - box[1] - 2 * margin) * (j + 0.5) / GRID for j in range(GRID)]
    free = [(x, y) for x in xs for y in ys if not any(_inside((x, y), r) for r in covers)]
    return min(free, key=lambda p: (p[0] - cx) ** 2 + (p[1] - cy) ** 2) if free else None


def _norm_box(box: tuple[float, float, float, float], size: tuple[int, int]) -> Box:
    w, h = size
    return (box[0] / w, box[1] / h, box[2] / w, box[3] / h)


def click(obs: GuiObservation, target: Element) -> SolverStep | None:
    """A click at a visible point of ``target`` (None when it is off-screen or covered)."""
    box = _clip(_rect(target), obs.screen_size)
    if box is None:
        return None
    point = _click_point(obs.dom, target, box)
    if point is None:
        return None
    w, h = obs.screen_size
    return SolverStep(
        Action("click", x=point[0] / w, y=point[1] / h), _norm_box(box, obs.screen_size), int(target["ref"])
    )


def _type(obs: GuiObservation, target: Element, text: str) -> SolverStep | None:
    box = _clip(_rect(target), obs.screen_size)
    if box is None:
        return None
    return SolverStep(Action("type", text=text), _norm_box(box, obs.screen_size), int(target["ref"]))


def _focused(e: Element) -> bool:
    return bool(e["flags"][0])


def _checked(e: Element) -> bool:
    return str(e.get("value", "")) == "True"  # MiniWoB reports a checkbox / radio state as text


def _tag(dom: list[Element], tag: str) -> list[Element]:
    return [e for e in dom if e["tag"] == tag]


def _first(elements: list[Element]) -> Element | None:
    return elements[0] if elements else None


def _quoted(instruction: str) -> str | None:
    """The text between the first and the last double quote."""
    m = re.search(r'"(.*)"', instruction)
    return m.group(1) if m else None


def _fill(obs: GuiObservation, field_: Element, text: str) -> SolverStep | None | bool:
    """The next step to get ``text`` into ``field_``: a click to focus it, then the typing; True
    once it holds the text; None when it holds something else (typing can only append)."""
    value = str(field_.get("value", ""))
    if value == text:
        return True
    if not _focused(field_):
        return click(obs, field_)
    if value == "":
        return _type(obs, field_, text)
    return None


def _fill_then_submit(
    obs: GuiObservation, fields: list[tuple[Element | None, str]], submit: Element | None
) -> SolverStep | None:
    for f, text in fields:
        if f is None:
            return None
        step = _fill(obs, f, text)
        if step is not True:
            return step  # type: ignore[return-value]
    return click(obs, submit) if submit is not None else None


def _by_id(dom: list[Element], id_: str) -> Element | None:
    return next((e for e in dom if e.get("id") == id_), None)


def _label_text(dom: list[Element], control: Element) -> str:
    """The text of the label wrapping a checkbox / radio (its sibling text nodes)."""
    parent = int(control["parent"])
    return " ".join(
        str(e["text"]).strip() for e in dom if int(e["parent"]) == parent and e["ref"] != control["ref"] and e["text"]
    ).strip()


# -- one policy per task -------------------------------------------------------------------------
def _click_test(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    b = _first(_tag(obs.dom, "button"))
    return click(obs, b) if b else None


def _click_test_2(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    m = re.search(r"Click button (\w+)", obs.instruction)
    b = _first([e for e in _tag(obs.dom, "button") if m and e["text"] == m.group(1)])
    return click(obs, b) if b else None


def _click_button(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    # every button with the asked text (case-sensitive) earns the reward
    want = _quoted(obs.instruction)
    for b in _tag(obs.dom, "button"):
        if b["text"] == want and (step := click(obs, b)):
            return step
    return None


def _click_link(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    want = _quoted(obs.instruction)
    for e in obs.dom:
        if "alink" in str(e["classes"]).split() and e["text"] == want and (step := click(obs, e)):
            return step
    return None


def _close_button(dom: list[Element]) -> Element | None:
    return _first([e for e in _tag(dom, "button") if "ui-dialog-titlebar-close" in str(e["classes"]).split()])


def _click_dialog(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    b = _close_button(obs.dom)
    return click(obs, b) if b else None


def _click_dialog_2(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    want = _quoted(obs.instruction)
    if want == "x":
        b = _close_button(obs.dom)
    else:
        b = _first([e for e in _tag(obs.dom, "button") if e["text"] == want])
    return click(obs, b) if b else None


def _click_color(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    m = re.search(r"Click on the (\w+) colored box", obs.instruction)
    if not m or m.group(1).lower() not in CSS_COLORS:
        return None
    rgb = CSS_COLORS[m.group(1).lower()]
    boxes = [e for e in obs.dom if "color" in str(e["classes"]).split()]
    if not boxes:
        return None
    best = min(boxes, key=lambda e: sum((a - b) ** 2 for a, b in zip(e["bg_color"][:3], rgb)))
    if sum((a - b) ** 2 for a, b in zip(best["bg_color"][:3], rgb)) > 0.01:
        return None
    return click(obs, best)


def _click_tab(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    m = re.search(r"Tab #(\d+)", obs.instruction)
    a = _first([e for e in _tag(obs.dom, "a") if m and e["text"] == f"Tab #{m.group(1)}"])
    return click(obs, a) if a else None


def _click_widget(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    tag = WIDGET_TAGS.get(_quoted(obs.instruction) or "")
    for e in _tag(obs.dom, tag or ""):
        if step := click(obs, e):
            return step
    return None


def _focus_text(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    e = _first(_tag(obs.dom, "input_text"))
    return click(obs, e) if e else None


def _focus_text_2(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    m = re.search(r"(1st|2nd|3rd) input", obs.instruction)
    e = _by_id(obs.dom, f"tt{ORDINALS[m.group(1)]}") if m else None
    return click(obs, e) if e else None


def _click_button_sequence(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    names = re.findall(r"button (\w+)", obs.instruction)
    for name in names:
        b = _first([e for e in _tag(obs.dom, "button") if e["text"] == name])
        if b is None:
            return None
        if int(b["ref"]) not in mem.clicked:
            step = click(obs, b)
            if step:
                mem.clicked.append(step.ref)
            return step
    return None


def _submit(dom: list[Element]) -> Element | None:
    return _by_id(dom, "subbtn")


def _enter_text(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    text = _quoted(obs.instruction)
    return _fill_then_submit(obs, [(_by_id(obs.dom, "tt"), text or "")], _submit(obs.dom)) if text else None


def _enter_text_2(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    text = _quoted(obs.instruction)
    if not text:
        return None
    text = text.upper() if "upper case" in obs.instruction else text.lower()
    return _fill_then_submit(obs, [(_by_id(obs.dom, "tt"), text)], _submit(obs.dom))


def _enter_password(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    pw = _quoted(obs.instruction)
    if not pw:
        return None
    return _fill_then_submit(
        obs, [(_by_id(obs.dom, "password"), pw), (_by_id(obs.dom, "verify"), pw)], _submit(obs.dom)
    )


def _login_user(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    m = re.search(r'username "(.*)" and the password "(.*)" into', obs.instruction)
    if not m:
        return None
    fields = [(_by_id(obs.dom, "username"), m.group(1)), (_by_id(obs.dom, "password"), m.group(2))]
    return _fill_then_submit(obs, fields, _submit(obs.dom))


def _click_checkboxes(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    m = re.match(r"Select (.*) and click Submit\.", obs.instruction)
    if not m:
        return None
    wanted = set() if m.group(1) == "nothing" else {s.strip() for s in m.group(1).split(",")}
    for box in _tag(obs.dom, "input_checkbox"):
        if (_label_text(obs.dom, box) in wanted) != _checked(box):
            return click(obs, box)
    s = _submit(obs.dom)
    return click(obs, s) if s else None


def _click_option(obs: GuiObservation, mem: _Memory) -> SolverStep | None:
    m = re.match(r"Select (.*) and click Submit\.", obs.instruction)
    radio = _first([e for e in _tag(obs.dom, "input_radio") if m and _label_text(obs.dom, e) == m.group(1)])
    if radio is None:
        return None
    if not _checked(radio):
        return click(obs, radio)
    s = _submit(obs.dom)
    return click(obs, s) if s else None


Policy = Callable[[GuiObservation, _Memory], "SolverStep | None"]
POLICIES: dict[str, Policy] = {
    "click-test": _click_test,
    "click-test-2": _click_test_2,
    "click-button": _click_button,
    "click-link": _click_link,
    "click-dialog": _click_dialog,
    "click-dialog-2": _click_dialog_2,
    "click-color": _click_color,
    "click-tab": _click_tab,
    "click-widget": _click_widget,
    "focus-text": _focus_text,
    "focus-text-2": _focus_text_2,
    "click-button-sequence": _click_button_sequence,
    "enter-text": _enter_text,
    "enter-text-2": _enter_text_2,
    "enter-password": _enter_password,
    "login-user": _login_user,
    "click-checkboxes": _click_checkboxes,
    "click-option": _click_option,
}
SOLVABLE_TASKS: tuple[str, ...] = tuple(POLICIES)
# tasks whose progress the DOM does not show: only ScriptedSolver (with its memory) solves them
STATEFUL_TASKS: tuple[str, ...] = ("click-button-sequence",)


def check_task(task: str) -> str:
    """``task`` when the solver knows it; SolverError naming it and the solvable tasks otherwise."""
    if task not in POLICIES:
        raise SolverError(f"no scripted solver for MiniWoB task {task!r}; solvable tasks: {', '.join(SOLVABLE_TASKS)}")
    return task


class ScriptedSolver:
    """The oracle of one task, with the memory of the current episode: call :meth:`reset` at every
    episode start and :meth:`act` on every observation."""

    def __init__(self, task: str) -> None:
        self.task = check_task(task)
        self._policy = POLICIES[task]
        self._mem = _Memory()

    def reset(self) -> None:
        """Forget the previous episode."""
        self._mem = _Memory()

    def act(self, obs: GuiObservation) -> SolverStep | None:
        """The next step for ``obs``, or None when the solver cannot find its target (the
        element is missing, off-screen or covered; the instruction does not parse)."""
        return self._policy(obs, self._mem)


def solve_step(task: str, obs: GuiObservation) -> Action | None:
    """The oracle's next action for ``obs`` read from the DOM alone (None when it cannot find its
    target). Use :class:`ScriptedSolver` for the target box too, and for the tasks of
    ``STATEFUL_TASKS`` (SolverError here)."""
    check_task(task)
    if task in STATEFUL_TASKS:
        raise SolverError(f"{task} needs memory of the earlier steps; use ScriptedSolver({task!r}).act(obs)")
    step = POLICIES[task](obs, _Memory())
    return None if step is None else step.action


__all__ = [
    "CSS_COLORS",
    "SOLVABLE_TASKS",
    "STATEFUL_TASKS",
    "ScriptedSolver",
    "SolverError",
    "SolverStep",
    "check_task",
    "click",
    "solve_step",
]
