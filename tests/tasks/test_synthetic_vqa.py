"""The quickstart task: rendering, questions, held-out split, rewards."""

import numpy as np
import pytest

from mmpo.errors import ConfigError, UnknownNameError
from mmpo.tasks import TASKS, build_task
from mmpo_tasks.synthetic_vqa.data import COLOURS, Scene, render


def test_registered_through_entry_points():
    assert "synthetic_vqa" in TASKS.names()
    with pytest.raises(UnknownNameError, match="synthetic_vqa"):
        TASKS.get("synthetic_vqaa")


def test_render_draws_the_scene():
    scene = Scene("red", "square", (0, 3), (20, 20), ((2, 2), (2, 2)))
    img = np.asarray(render(scene, 56))
    # the square of cell 0 starts at (2, 2); cell 3 at (30, 30); cells 1 and 2 are background
    assert tuple(img[10, 10]) == COLOURS["red"]
    assert tuple(img[40, 40]) == COLOURS["red"]
    assert tuple(img[10, 40]) == (30, 30, 30)
    assert tuple(img[40, 10]) == (30, 30, 30)


def test_answers_match_the_scene_and_eval_is_held_out():
    task = build_task("synthetic_vqa", {"num_train": 50}, seed=3)
    for i in range(12):
        s = task.train_sample(i)
        q = s.meta["qtype"]
        assert q == ("colour", "shape", "count")[i % 3]
        assert s.answer in s.meta["letters"]
        img = s.messages[0]["content"][0]["image"]
        assert img.size == (56, 56)
    train_keys = {task._make("train", i)[1] for i in range(50)}
    for s in task.eval_samples(20):
        assert s.id.startswith("eval-")
    assert all(task._make("eval", int(s.id.split("-")[1]))[1] not in train_keys for s in task.eval_samples(20))


def test_reward_counts_only_the_requested_form():
    task = build_task("synthetic_vqa", {"num_train": 10, "format_weight": 0.5}, seed=0)
    s = task.train_sample(0)  # a colour question
    right = s.meta["options"][s.meta["letters"].index(s.answer)]
    wrong = next(o for o in s.meta["options"] if o != right)
    out = task.reward([s, s, s, s], [f" {right}", wrong, s.answer, "xyz"])
    assert out.rewards.tolist() == [1.5, 0.5, 0.0, 0.0]
    assert out.components["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_eval_metrics_report_chance():
    task = build_task("synthetic_vqa", {"num_train": 10}, seed=0)
    ev = task.eval_samples(9)
    m = task.eval_metrics(ev, ["x"] * 9)
    # 3 colour (1/4), 3 shape (1/3), 3 count (1/4) questions
    assert m["chance"] == pytest.approx((3 / 4 + 3 / 3 + 3 / 4) / 9)
    assert m["accuracy"] == 0.0


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="num_trian"):
        build_task("synthetic_vqa", {"num_trian": 5})
    with pytest.raises(ConfigError, match="question_types"):
        build_task("synthetic_vqa", {"question_types": ["size"]})
