"""The GUI action parser (valid actions, normalisation, every malformed kind as a counted no-op)
and HiconAgent's Dynamic Context Sampling schedule against its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmpo_tasks.gui_agent.actions import Action, parse_action
from mmpo_tasks.gui_agent.history import dcs_probs, dcs_weight, keep_recent, sample_history_length


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>the button</think><action>click(0.42, 0.13)</action>", Action("click", x=0.42, y=0.13)),
        ("<action> click( 1 , 0 ) </action>", Action("click", x=1.0, y=0.0)),
        ('<action>type("hello, world")</action>', Action("type", text="hello, world")),
        ("<action>type('it''s')</action>", Action("type", text="its")),  # adjacent literals concatenate, as in Python
        ("<action>scroll(down)</action>", Action("scroll", direction="down")),
        ('<action>scroll("left")</action>', Action("scroll", direction="left")),
        ("<action>back()</action>", Action("back")),
        ("<action>finished()</action>", Action("finished")),
        ("<action>click_element(17)</action>", Action("click_element", ref=17)),
        ("<action>back()</action> then <action>enter()</action>", Action("enter")),  # the last one counts
    ],
)
def test_valid_actions(text, expected):
    assert parse_action(text) == expected


def test_pixel_coordinates_are_normalised_with_the_screen_size():
    a = parse_action("<action>click(640, 180)</action>", screen_size=(1280, 720))
    assert (a.kind, a.x, a.y) == ("click", 0.5, 0.25)
    assert parse_action("<action>click(640, 180)</action>").malformed  # no size: must be 0..1
    assert parse_action("<action>click(1400, 180)</action>", screen_size=(1280, 720)).malformed


@pytest.mark.parametrize(
    "text, msg",
    [
        ("I would click the button", "no <action>"),
        ("<action>click the button</action>", "not a call"),
        ("<action>rm(1)</action>", "unknown action 'rm'"),
        ("<action>noop()</action>", "unknown action 'noop'"),
        ("<action>click(0.5)</action>", "two numbers"),
        ("<action>click(True, 0.5)</action>", "two numbers"),
        ("<action>click(-0.1, 0.5)</action>", "outside the screen"),
        ("<action>click(__import__('os'), 1)</action>", "not literals"),
        ("<action>type(42)</action>", "one string"),
        ('<action>type("' + "x" * 600 + '")</action>', "longer than 512"),
        ("<action>scroll(sideways)</action>", "scroll(direction)"),
        ("<action>back(1)</action>", "takes no arguments"),
        ("<action>click_element(-3)</action>", "non-negative integer"),
    ],
)
def test_malformed_actions_are_counted_no_ops(text, msg):
    a = parse_action(text)
    assert a.kind == "noop" and a.malformed and msg in a.error


def test_canonical_text_round_trips():
    for a in (
        Action("click", x=0.25, y=0.5),
        Action("type", text='say "hi"'),
        Action("scroll", direction="up"),
        Action("home"),
        Action("click_element", ref=3),
    ):
        assert parse_action(f"<action>{a.to_text()}</action>") == a


def test_dcs_schedule_matches_the_formula():
    S, H = 414, 4
    assert dcs_weight(1, S) == 0.0 and dcs_weight(S, S) == 1.0
    assert dcs_weight(139, S) == pytest.approx(min(1, 3 * 138 / 413))
    assert np.allclose(dcs_probs(1, S, H), np.full(H + 1, 1 / (H + 1)))  # uniform at the start
    p = dcs_probs(300, S, H)  # w = 1 after ~S/3: P(k) ∝ exp(2k)
    ref = np.exp(2.0 * np.arange(H + 1))
    assert np.allclose(p, ref / ref.sum())
    mid = dcs_probs(70, S, H)
    w = 3 * 69 / 413
    assert mid[H] / mid[0] == pytest.approx(math.exp(2 * w * H))
    assert all(np.diff(mid) > 0)


def test_dcs_sampling_frequencies_and_kept_steps():
    rng = np.random.default_rng(0)
    draws = [sample_history_length(414, 414, 3, rng) for _ in range(4000)]
    freq = np.bincount(draws, minlength=4) / 4000
    assert np.allclose(freq, dcs_probs(414, 414, 3), atol=0.03)
    steps = ["s1", "s2", "s3", "s4"]
    assert keep_recent(steps, 2) == ["s3", "s4"] and keep_recent(steps, 0) == [] and keep_recent(steps, 9) == steps
