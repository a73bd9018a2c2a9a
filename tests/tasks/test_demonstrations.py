"""Task demonstrations (SRFT arXiv 2506.19767, DR-IRL arXiv 2503.18991): a correct completion per
prompt whose reward is the task's maximum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmpo.config import from_dict
from mmpo.tasks import RewardOutput, Sample, TokenTask, build_task
from mmpo_tasks.vlm_reasoning.task import VLMReasoningTask


class _Bare(TokenTask):
    name = "bare"

    def num_train(self) -> int:
        return 1

    def train_sample(self, index: int) -> Sample:
        return Sample(id="0", messages=[])

    def eval_samples(self, n: int) -> list[Sample]:
        return []

    def reward(self, samples, completions) -> RewardOutput:
        raise NotImplementedError


def test_base_task_gives_none():
    task = _Bare(None)
    assert task.gives_demonstrations is False
    assert task.demonstration(task.train_sample(0)) is None
    assert task.required_advantage is None


# -- synthetic_vqa ------------------------------------------------------------------------------


@pytest.mark.parametrize("answer_with", ["option", "letter"])
def test_synthetic_vqa_demonstration_earns_the_maximum(answer_with):
    task = build_task("synthetic_vqa", {"num_train": 30, "answer_with": answer_with, "format_weight": 0.3}, seed=1)
    assert task.gives_demonstrations is True
    samples = [task.train_sample(i) for i in range(12)]  # 4 of each question type
    demos = [task.demonstration(s) for s in samples]
    out = task.reward(samples, demos)
    assert out.components["accuracy"].tolist() == [1.0] * 12
    assert out.components["format"].tolist() == [1.0] * 12
    assert out.rewards.tolist() == pytest.approx([1.3] * 12)
    s = samples[0]
    right = s.meta["options"][s.meta["letters"].index(s.answer)]
    assert demos[0] == (s.answer if answer_with == "letter" else right)
    # another question's demonstration is not always right for this one
    shifted = task.reward(samples, demos[1:] + demos[:1]).components["accuracy"]
    assert shifted.sum() < 12


# -- vlm_reasoning --------------------------------------------------------------------------------

ROWS = [
    # multiple choice with an R1-style worked solution (answer taken from it)
    {
        "id": "r1",
        "image": "a.png",
        "question": "Which stain is it?",
        "options": ["H&E", "IHC", "PAS"],
        "answer": "<think>Magenta glycogen granules mean PAS.</think><answer>C</answer>",
    },
    # open numeric answer with a \\boxed solution
    {"id": "box", "image": "a.png", "question": "How many nuclei?", "answer": "12", "solution": "Count: \\boxed{12}"},
    # yes/no, no solution
    {"id": "yn", "image": "a.png", "question": "Is there necrosis?", "answer": "yes"},
    # multiple choice, plain-text solution, answer as option text
    {
        "id": "txt",
        "image": "a.png",
        "question": "Colour?",
        "options": ["red", "blue"],
        "answer": "blue",
        "solution": "The cells are stained blue. <answer>B</answer>",
    },
    # open text answer
    {"id": "open", "image": "a.png", "question": "Which organ?", "answer": "the liver"},
]


@pytest.fixture
def data(tmp_path) -> Path:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def make(data: Path, **options) -> VLMReasoningTask:
    opts = {"train_file": str(data), "eval_file": str(data), **options}
    return VLMReasoningTask(from_dict(VLMReasoningTask.Config, opts, where="task"))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"template": "concise"},
        {"template": "plain"},
        {"template": "direct"},
        {"hipo": {"enabled": True}},
        {"accuracy_weight": 2.0, "format_weight": 0.5},
    ],
)
def test_vlm_demonstration_earns_the_maximum(data, options):
    task = make(data, **options)
    assert task.gives_demonstrations is True
    samples = [task.train_sample(i) for i in range(len(ROWS))]
    demos = [task.demonstration(s) for s in samples]
    assert all(isinstance(d, str) for d in demos)
    out = task.reward(samples, demos)
    c = task.config
    assert out.components["accuracy"].tolist() == [1.0] * len(ROWS)
    assert out.components["format"].tolist() == [1.0] * len(ROWS)
    assert out.rewards.tolist() == pytest.approx([c.accuracy_weight + c.format_weight] * len(ROWS))


def test_vlm_demonstration_texts(data):
    task = make(data)
    by_id = {task.train_sample(i).id: task.train_sample(i) for i in range(len(ROWS))}
    # the <think> content of an R1-style solution, the letter as the answer
    assert task.demonstration(by_id["r1"]) == "<think>\nMagenta glycogen granules mean PAS.\n</think><answer>C</answer>"
    assert task.demonstration(by_id["box"]) == "<think>\nCount: \\boxed{12}\n</think><answer>12</answer>"
    # answer blocks of a prose solution are removed from the reasoning
    assert task.demonstration(by_id["txt"]) == "<think>\nThe cells are stained blue.\n</think><answer>B</answer>"
    assert task.demonstration(by_id["yn"]) == "<think>\n\n</think><answer>yes</answer>"
    direct = make(data, template="direct")
    assert direct.demonstration(by_id["r1"]) == "PAS"  # the option's text, as the direct prompt asks
    assert direct.demonstration(by_id["open"]) == "the liver"
    assert make(data, template="plain").demonstration(by_id["box"]) == "<answer>12</answer>"


def test_vlm_hipo_demonstration_picks_the_mode(data):
    task = make(data, hipo={"enabled": True})
    by_id = {task.train_sample(i).id: task.train_sample(i) for i in range(len(ROWS))}
    on = task.demonstration(by_id["r1"])
    assert on.startswith("<think_on> ") and "<think>\nMagenta glycogen granules mean PAS.\n</think>" in on
    off = task.demonstration(by_id["yn"])
    assert off.startswith("<think_off> ") and off.endswith("<answer>yes</answer>") and "<think>" not in off


def test_vlm_no_demonstration_when_it_cannot_earn_the_maximum(data):
    task = make(data)
    s = task.train_sample(0)
    bad = Sample(id="x", messages=s.messages, answer="a </answer> b", meta={**s.meta, "letters": [], "options": None})
    assert task.demonstration(bad) is None
