"""GUI episode JSONL (round trip, per-episode skips) and the AndroidControl / GUI-Odyssey / AITW
converters of data_prep/gui_to_jsonl.py (coordinate normalisation, scroll directions, CLI)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmpo.errors import DataError
from mmpo_tasks.gui_agent.actions import Action
from mmpo_tasks.gui_agent.episodes import GuiEpisode, GuiStep, load_episodes, save_episodes

SCRIPT = Path(__file__).resolve().parents[2] / "data_prep" / "gui_to_jsonl.py"


@pytest.fixture(scope="module")
def conv() -> dict[str, Any]:
    return runpy.run_path(str(SCRIPT))


def _png(path: Path, size: tuple[int, int] = (100, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _step(shot: str = "img/a.png", action: str = "click(0.5, 0.25)", **kw: Any) -> dict[str, Any]:
    return {"screenshot": shot, "action": action, "target_box": None, "screen_size": None, **kw}


def _by_id(episodes: list[GuiEpisode]) -> dict[str, GuiEpisode]:
    return {e.id: e for e in episodes}


# load / save --------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    a, b = _png(tmp_path / "img" / "a.png"), _png(tmp_path / "img" / "sub" / "b.png")
    eps = [
        GuiEpisode(
            "e1",
            "open settings",
            [
                GuiStep(str(a), Action("click", x=0.125, y=0.3333333), (0.1, 0.2, 0.3, 0.4), (100, 200)),
                GuiStep(str(b), Action("type", text='say "hi", it\'s me'), None, None),
                GuiStep(str(b), Action("scroll", direction="left")),
                GuiStep(str(a), Action("back")),
                GuiStep(str(a), Action("finished")),
            ],
            {"source": "test", "n": 1},
        )
    ]
    out = tmp_path / "eps.jsonl"
    save_episodes(eps, out)
    assert not list(tmp_path.glob(".eps.jsonl.tmp*"))
    rec = json.loads(out.read_text().splitlines()[0])
    assert [s["screenshot"] for s in rec["steps"]][:2] == ["img/a.png", "img/sub/b.png"]
    assert rec["steps"][0] == {
        "screenshot": "img/a.png",
        "action": "click(0.125, 0.333333)",
        "target_box": [0.1, 0.2, 0.3, 0.4],
        "screen_size": [100, 200],
    }
    loaded, skipped = load_episodes(out)
    assert skipped == []
    [ep] = loaded
    assert (ep.id, ep.instruction, ep.meta) == ("e1", "open settings", {"source": "test", "n": 1})
    assert [s.action.kind for s in ep.steps] == ["click", "type", "scroll", "back", "finished"]
    assert ep.steps[0].action.y == pytest.approx(0.333333)
    assert ep.steps[1].action.text == 'say "hi", it\'s me'
    assert ep.steps[2].action.direction == "left"
    assert ep.steps[0].target_box == (0.1, 0.2, 0.3, 0.4) and ep.steps[0].screen_size == (100, 200)
    assert Path(ep.steps[1].screenshot) == b
    save_episodes(loaded, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


def test_save_refuses_noop_and_outside_screenshots(tmp_path):
    a = _png(tmp_path / "d" / "a.png")
    with pytest.raises(DataError, match="no-op"):
        save_episodes(
            [GuiEpisode("x", "i", [GuiStep(str(a), Action("noop", malformed=True, error="bad"))])],
            tmp_path / "d" / "o.jsonl",
        )
    with pytest.raises(DataError, match="outside the output folder"):
        save_episodes([GuiEpisode("x", "i", [GuiStep(str(a), Action("home"))])], tmp_path / "d" / "sub" / "o.jsonl")


def test_bad_episodes_are_skipped_with_reasons(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path.parent / f"{tmp_path.name}_outside.png")
    rows = [
        {"id": "ok", "instruction": "go", "steps": [_step(), _step(action="type('x')", target_box=[0, 0, 1, 1])]},
        {"id": "missing", "instruction": "go", "steps": [_step(), _step("img/nope.png")]},
        {"id": "malformed", "instruction": "go", "steps": [_step(action="click the button")]},
        {"id": "outside", "instruction": "go", "steps": [_step(action="click(1.5, 0.2)")]},
        {"id": "box", "instruction": "go", "steps": [_step(target_box=[0.5, 0.1, 0.2, 0.3])]},
        {"id": "box5", "instruction": "go", "steps": [_step(target_box=[0.1, 0.1, 0.2, 1.2])]},
        {"id": "escape", "instruction": "go", "steps": [_step(f"../{tmp_path.name}_outside.png")]},
        {"id": "absolute", "instruction": "go", "steps": [_step(str(tmp_path / "img" / "a.png"))]},
        {"id": "ok", "instruction": "again", "steps": [_step()]},
        {"id": "nosteps", "instruction": "go", "steps": []},
    ]
    path = _jsonl(tmp_path / "eps.jsonl", rows)
    with open(path, "a") as f:
        f.write("\n{not json\n")
    episodes, skipped = load_episodes(path)
    assert [e.id for e in episodes] == ["ok"]
    assert episodes[0].steps[1].target_box == (0.0, 0.0, 1.0, 1.0)
    errors = {s["id"]: s for s in skipped}
    assert [s["line"] for s in skipped] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    assert "line 2: key 'steps[1].screenshot': file not found" in errors["missing"]["error"]
    assert str(path) in errors["missing"]["error"]
    assert "key 'steps[0].action'" in errors["malformed"]["error"] and "not a call" in errors["malformed"]["error"]
    assert "outside the screen" in errors["outside"]["error"]
    assert "key 'steps[0].target_box'" in errors["box"]["error"] and "x0 <= x1" in errors["box"]["error"]
    assert "[0, 1]" in errors["box5"]["error"]
    assert "leaves the file's folder" in errors["escape"]["error"]
    assert "absolute path" in errors["absolute"]["error"]
    assert "repeats an earlier" in skipped[7]["error"]
    assert "key 'steps'" in errors["nosteps"]["error"]
    assert skipped[-1]["id"] is None and "not valid JSON" in skipped[-1]["error"]


def test_pixel_clicks_are_normalised_with_the_screen_size(tmp_path):
    _png(tmp_path / "img" / "a.png")
    path = _jsonl(
        tmp_path / "e.jsonl",
        [{"id": 3, "instruction": "go", "steps": [_step(action="click(50, 50)", screen_size=[100, 200])]}],
    )
    [ep], _ = load_episodes(path)
    assert ep.id == "3" and (ep.steps[0].action.x, ep.steps[0].action.y) == (0.5, 0.25)


def test_nothing_valid_or_unreadable_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_episodes(tmp_path / "none.jsonl")
    path = _jsonl(tmp_path / "e.jsonl", [{"id": "a", "instruction": "go", "steps": [_step("img/none.png")]}])
    with pytest.raises(DataError, match="no valid episode.*line 1: key 'steps\\[0\\].screenshot'"):
        load_episodes(path)


# converters ---------------------------------------------------------------------------------------


def test_androidcontrol(tmp_path, conv):
    root = tmp_path / "shots"
    for k in range(5):
        _png(root / f"ep1_{k}.png", (1080, 2400))
    ep1 = {
        "episode_id": 101,
        "goal": "turn on wifi",
        "step_instructions": ["open settings", "tap wifi"],
        "screenshots": [f"ep1_{k}.png" for k in range(5)],
        "actions": [
            {"action_type": "open_app", "app_name": "Settings"},
            {"action_type": "click", "x": 540, "y": 1200},
            json.dumps({"action_type": "input_text", "text": "wifi"}),
            {"action_type": "scroll", "direction": "down"},
        ],
    }
    ep2 = {
        "episode_id": 102,
        "goal": "x",
        "screenshots": ["ep1_0.png"],
        "actions": [{"action_type": "long_press", "x": 1, "y": 1}],
    }
    ep3 = {"episode_id": 103, "goal": "x", "screenshots": ["gone.png"], "actions": [{"action_type": "navigate_back"}]}
    ep4 = {
        "episode_id": 104,
        "goal": "x",
        "screenshots": ["ep1_0.png"],
        "actions": [{"action_type": "click", "x": 2000, "y": 5}],
    }
    src = _jsonl(tmp_path / "ac.jsonl", [ep1, ep2, ep3, ep4])
    out = tmp_path / "out.jsonl"
    stats = conv["convert_androidcontrol"](src, root, out)
    assert stats["written"] == 1 and [s["id"] for s in stats["skipped"]] == [102, 103, 104]
    assert "long_press" in stats["skipped"][0]["error"] and "file not found" in stats["skipped"][1]["error"]
    assert "outside the screen" in stats["skipped"][2]["error"]
    [ep], skipped = load_episodes(out)
    assert skipped == [] and ep.id == "101" and ep.instruction == "turn on wifi"
    assert [s.action for s in ep.steps] == [
        Action("click", x=0.5, y=0.5),
        Action("type", text="wifi"),
        Action("scroll", direction="down"),
        Action("finished"),
    ]
    assert [Path(s.screenshot).name for s in ep.steps] == ["ep1_1.png", "ep1_2.png", "ep1_3.png", "ep1_4.png"]
    assert ep.steps[0].screen_size == (1080, 2400)
    assert ep.meta["dropped_steps"] == 1 and ep.meta["source"] == "androidcontrol"
    assert json.loads(out.read_text())["steps"][0]["screenshot"] == "shots/ep1_1.png"


def test_guiodyssey(tmp_path, conv):
    root = tmp_path / "screenshots"
    for k in range(6):
        _png(root / f"s{k}.png", (400, 800))
    steps = [
        {"screenshot": "s0.png", "action": "CLICK", "info": [[250, 750]]},
        {"screenshot": "s1.png", "action": "TEXT", "info": "hello"},
        {"screenshot": "s2.png", "action": "SCROLL", "info": [[500, 800], [500, 200]]},  # finger up
        {"screenshot": "s3.png", "action": "SCROLL", "info": [[800, 500], [100, 520]]},  # finger left
        {"screenshot": "s4.png", "action": "PRESS_HOME", "info": ""},
        {"screenshot": "s5.png", "action": "COMPLETE", "info": ""},
    ]
    good = {"episode_id": "od1", "instruction": "say hello", "steps": steps}
    bad = {
        "episode_id": "od2",
        "instruction": "x",
        "steps": [{"screenshot": "s0.png", "action": "INCOMPLETE", "info": ""}],
    }
    src = tmp_path / "od.json"
    src.write_text(json.dumps([good, bad]))
    stats = conv["convert_guiodyssey"](src, root, tmp_path / "out.jsonl")
    assert stats["written"] == 1 and "INCOMPLETE" in stats["skipped"][0]["error"]
    [ep], _ = load_episodes(tmp_path / "out.jsonl")
    assert [s.action for s in ep.steps] == [
        Action("click", x=0.25, y=0.75),
        Action("type", text="hello"),
        Action("scroll", direction="down"),
        Action("scroll", direction="right"),
        Action("home"),
        Action("finished"),
    ]
    assert ep.steps[0].screen_size == (400, 800)


def test_aitw(tmp_path, conv):
    root = tmp_path / "aitw"
    for k in range(6):
        _png(root / f"e/{k}.png", (540, 1170))
    rows = [  # shuffled: the converter orders by step_id
        {
            "episode_id": "E",
            "goal_info": "search",
            "image_path": "e/2.png",
            "step_id": 2,
            "result_action_type": 3,
            "result_touch_yx": [-1, -1],
            "result_lift_yx": [-1, -1],
            "result_action_text": "weather",
        },
        {
            "episode_id": "E",
            "goal_info": "search",
            "image_path": "e/0.png",
            "step_id": 0,
            "result_action_type": 4,
            "result_touch_yx": [0.8, 0.2],
            "result_lift_yx": [0.81, 0.21],
            "result_action_text": "",
        },
        {
            "episode_id": "E",
            "goal_info": "search",
            "image_path": "e/1.png",
            "step_id": 1,
            "result_action_type": 4,
            "result_touch_yx": "[0.7, 0.5]",
            "result_lift_yx": "[0.2, 0.5]",
            "result_action_text": "",
        },  # finger up
        {
            "episode_id": "E",
            "goal_info": "search",
            "image_path": "e/3.png",
            "step_id": 3,
            "result_action_type": 7,
            "result_touch_yx": [-1, -1],
            "result_lift_yx": [-1, -1],
            "result_action_text": "",
        },
        {
            "episode_id": "E",
            "goal_info": "search",
            "image_path": "e/4.png",
            "step_id": 4,
            "result_action_type": 4,
            "result_touch_yx": [0.5, 0.1],
            "result_lift_yx": [0.52, 0.9],
            "result_action_text": "",
        },  # finger right
        {
            "episode_id": "E",
            "goal_info": "search",
            "image_path": "e/5.png",
            "step_id": 5,
            "result_action_type": 10,
            "result_touch_yx": [-1, -1],
            "result_lift_yx": [-1, -1],
            "result_action_text": "",
        },
        {
            "episode_id": "F",
            "goal_info": "x",
            "image_path": "e/0.png",
            "step_id": 0,
            "result_action_type": 11,
            "result_touch_yx": [-1, -1],
            "result_lift_yx": [-1, -1],
            "result_action_text": "",
        },
    ]
    src = _jsonl(tmp_path / "aitw.jsonl", rows)
    stats = conv["convert_aitw"](src, root, tmp_path / "out.jsonl")
    assert stats["written"] == 1 and stats["skipped"][0]["id"] == "F" and "11" in stats["skipped"][0]["error"]
    [ep], _ = load_episodes(tmp_path / "out.jsonl")
    assert [s.action for s in ep.steps] == [
        Action("click", x=0.2, y=0.8),
        Action("scroll", direction="down"),
        Action("type", text="weather"),
        Action("enter"),
        Action("scroll", direction="left"),
        Action("finished"),
    ]
    assert [Path(s.screenshot).name for s in ep.steps] == [f"{k}.png" for k in range(6)]
    assert ep.meta["rows"] == [2, 3, 1, 4, 5, 6]


def test_swipe_direction(conv):
    d = conv["swipe_direction"]
    assert (d(0.5, 0.8, 0.5, 0.2), d(0.5, 0.2, 0.5, 0.8), d(0.9, 0.5, 0.1, 0.5), d(0.1, 0.5, 0.9, 0.5)) == (
        "down",
        "up",
        "right",
        "left",
    )
    assert d(0.5, 0.5, 0.6, 0.4) == "down"  # a tie counts as vertical


def test_image_root_outside_the_output_folder_is_refused(tmp_path, conv):
    _png(tmp_path / "shots" / "a.png")
    src = _jsonl(
        tmp_path / "od.jsonl",
        [{"episode_id": "a", "instruction": "x", "steps": [{"screenshot": "a.png", "action": "COMPLETE"}]}],
    )
    with pytest.raises(DataError, match="not inside the output file's folder"):
        conv["convert_guiodyssey"](src, tmp_path / "shots", tmp_path / "elsewhere" / "out.jsonl")


def test_cli(tmp_path, conv, capsys):
    _png(tmp_path / "shots" / "a.png")
    src = _jsonl(
        tmp_path / "od.jsonl",
        [
            {
                "episode_id": "a",
                "instruction": "x",
                "steps": [{"screenshot": "a.png", "action": "CLICK", "info": [[10, 20]]}],
            }
        ],
    )
    out = tmp_path / "out.jsonl"
    assert conv["main"](["guiodyssey", str(src), "--image-root", str(tmp_path / "shots"), "--out", str(out)]) == 0
    assert "1 episode(s) written" in capsys.readouterr().out
    [ep], _ = load_episodes(out)
    assert (ep.steps[0].action.x, ep.steps[0].action.y) == (0.01, 0.02)
    assert conv["main"](["aitw", str(tmp_path / "none.jsonl"), "--image-root", str(tmp_path), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
