"""GUI step rewards on constructed actions: format, type, grounding in a box or within a radius,
typed-text matching, and episode success."""

from __future__ import annotations

import pytest

from mmpo_tasks.gui_agent.actions import Action, parse_action
from mmpo_tasks.gui_agent.rewards import GuiRewardConfig, episode_success, step_rewards, text_f1

CFG = GuiRewardConfig()


def test_click_grounding_in_the_box_or_within_the_radius():
    gold = Action("click", x=0.5, y=0.5)
    preds = [Action("click", x=0.55, y=0.52), Action("click", x=0.9, y=0.9), Action("click", x=0.58, y=0.58)]
    r, c = step_rewards(preds, [gold] * 3, [(0.4, 0.4, 0.6, 0.6), (0.4, 0.4, 0.6, 0.6), None], CFG)
    assert c["value"].tolist() == [1, 0, 1]  # the last has no box: distance 0.113 <= 0.14
    _, c2 = step_rewards(
        [preds[2], Action("click", x=0.6, y=0.6)], [gold] * 2, [None, None], GuiRewardConfig(click_radius=0.1)
    )
    assert c2["value"].tolist() == [0, 0]  # 0.113 and 0.141 > 0.1
    assert r.tolist() == pytest.approx([1.0, 0.4, 1.0])


def test_types_text_scroll_and_malformed():
    golds = [
        Action("type", text="New York"),
        Action("type", text="New York"),
        Action("scroll", direction="down"),
        Action("back"),
        Action("click", x=0.2, y=0.2),
        Action("click_element", ref=4),
    ]
    preds = [
        Action("type", text="  new   york "),
        Action("type", text="Boston"),
        Action("scroll", direction="up"),
        Action("back"),
        parse_action("<action>click(2, 2)</action>"),
        Action("click_element", ref=4),
    ]
    r, c = step_rewards(preds, golds, [None] * 6, CFG)
    assert c["format"].tolist() == [1, 1, 1, 1, 0, 1]
    assert c["action_type"].tolist() == [1, 1, 1, 1, 0, 1]
    assert c["value"].tolist() == [1, 0, 0, 1, 0, 1]
    assert r.tolist() == pytest.approx([1.0, 0.4, 0.4, 1.0, 0.0, 1.0])


def test_text_f1_and_episode_success():
    assert text_f1("the red button", "red button") == pytest.approx(0.8)
    assert text_f1("", "") == 1.0 and text_f1("a", "") == 0.0
    assert episode_success([1, 1, 1]) == 1.0 and episode_success([1, 0, 1]) == 0.0 and episode_success([]) == 0.0
