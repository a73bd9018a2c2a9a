"""vlm_reasoning task: config, splits, messages through the tiny VLM's encode, rewards, eval metrics."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
from PIL import Image

from mmpo.config import from_dict
from mmpo.errors import ConfigError
from mmpo.tasks import Sample
from mmpo_tasks.vlm_reasoning.task import VLMReasoningTask
from mmpo_tasks.vlm_reasoning.templates import SYSTEM_PROMPTS


def make_task(options: dict, seed: int = 0) -> VLMReasoningTask:
    return VLMReasoningTask(from_dict(VLMReasoningTask.Config, options, where="task"), seed=seed)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    Image.new("RGB", (100, 60), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (300, 300), (0, 255, 0)).save(tmp_path / "b.png")
    for k in range(4):
        Image.new("RGB", (80, 80), (k * 60, 0, 0)).save(tmp_path / f"f{k}.png")
    return write_rows(
        tmp_path / "d.jsonl",
        [
            {
                "id": "two",
                "images": ["a.png", "b.png"],
                "question": "Compare <image> and <image>. Which is red?",
                "options": ["first", "second"],
                "answer": "A",
                "meta": {"qtype": "colour"},
            },
            {
                "id": "vid",
                "video": [f"f{k}.png" for k in range(4)],
                "question": "Does it get brighter?",
                "answer": "yes",
                "meta": {"qtype": "video"},
            },
            {
                "id": "num",
                "images": ["b.png"],
                "question": "How many squares?",
                "answer": "1,000",
                "meta": {"qtype": "count"},
            },
            {
                "id": "mc4",
                "images": ["a.png"],
                "question": "Stain?",
                "options": ["H&E", "IHC", "PAS", "Giemsa"],
                "answer": "C",
                "meta": {"qtype": "colour"},
            },
        ],
    )


@pytest.mark.skipif(
    not any(ep.name == "vlm_reasoning" for ep in importlib.metadata.entry_points(group="mmpo.tasks")),
    reason="the entry point is in pyproject.toml; run `pip install -e .` to register it",
)
def test_registered_through_entry_points(data):
    from mmpo.tasks import build_task

    task = build_task("vlm_reasoning", {"train_file": str(data), "eval_file": str(data)})
    assert isinstance(task, VLMReasoningTask) and task.num_train() == 4


def test_config_errors(data):
    with pytest.raises(ConfigError, match="task.min_pixels' \\(5000\\) must be <= max_pixels \\(4000\\)"):
        make_task({"train_file": str(data), "min_pixels": 5000, "max_pixels": 4000})
    with pytest.raises(ConfigError, match="task.template' must be one of 'think', 'concise', 'plain'"):
        make_task({"train_file": str(data), "template": "cot"})
    with pytest.raises(ConfigError, match="task.train_file' names a path that does not exist"):
        make_task({"train_file": str(data.parent / "missing.jsonl")})
    with pytest.raises(ConfigError, match="task.video_max_frames' must be >= 2"):
        make_task({"train_file": str(data), "video_max_frames": 1})


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
    f = write_rows(tmp_path / "many.jsonl", [{"id": f"r{k}", "question": f"q{k}", "answer": str(k)} for k in range(40)])
    a = make_task({"train_file": str(f), "eval_fraction": 0.25}, seed=0)
    b = make_task({"train_file": str(f), "eval_fraction": 0.25}, seed=7)
    ev_a = {s.id for s in a.eval_samples(100)}
    assert len(ev_a) == 10 and a.num_train() == 30  # round(0.25 * 40)
    assert ev_a == {s.id for s in b.eval_samples(100)}  # independent of the seed
    assert not ev_a & {a.train_sample(i).id for i in range(a.num_train())}
    # independent of the row order too
    lines = f.read_text().splitlines()
    g = tmp_path / "reversed.jsonl"
    g.write_text("\n".join(reversed(lines)) + "\n")
    c = make_task({"train_file": str(g), "eval_fraction": 0.25})
    assert {s.id for s in c.eval_samples(100)} == ev_a
    assert [s.id for s in a.eval_samples(3)] == [s.id for s in a.eval_samples(100)][:3]
    assert a.train_sample(30).id == a.train_sample(0).id  # the index cycles


def test_messages_follow_the_template(data):
    task = make_task({"train_file": str(data), "eval_file": str(data), "template": "concise"})
    s = task.train_sample(0)
    assert s.messages[0] == {"role": "system", "content": SYSTEM_PROMPTS["concise"]}
    parts = s.messages[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]  # at the placeholders
    assert parts[-1]["text"] == ". Which is red?\nA. first\nB. second\nAnswer with the letter of the correct option."
    assert all(
        p["min_pixels"] == 28 * 28 * 4 and p["max_pixels"] == 28 * 28 * 16 for p in parts if p["type"] == "image"
    )
    assert s.answer == "A" and s.meta["letters"] == ["A", "B"] and s.meta["options"] == ["first", "second"]
    assert s.meta["answer_type"] == "choice" and s.meta["qtype"] == "colour"
    custom = make_task({"train_file": str(data), "eval_file": str(data), "system_prompt": "Be right."})
    assert custom.train_sample(2).messages[0]["content"] == "Be right."
    open_parts = custom.train_sample(2).messages[1]["content"]
    assert [p["type"] for p in open_parts] == ["image", "text"]
    assert open_parts[1]["text"] == "How many squares?\nAnswer with a single word, number or short phrase."


@pytest.fixture(scope="module")
def policy():
    from mmpo.models import load_model
    from mmpo.policies.causal_lm import CausalLMPolicy

    model, processor, info = load_model("tiny:qwen2_vl")
    return CausalLMPolicy.from_info(model, processor, info)


def test_two_images_encode_within_max_pixels(data, policy):
    task = make_task({"train_file": str(data), "eval_file": str(data)})
    enc = policy.encode(task.train_sample(0).messages)
    grid = enc["image_grid_thw"]
    assert grid.shape == (2, 3)
    # 100x60 -> (round(60/28), round(100/28)) * 28 = 56x112 = 6272 px within [3136, 12544]: 4x8 patches of 14 px
    assert grid[0].tolist() == [1, 4, 8]
    for t, h, w in grid.tolist():
        assert t == 1 and h % 2 == 0 and w % 2 == 0
        assert 28 * 28 * 4 <= h * w * 14 * 14 <= 28 * 28 * 16
    assert enc["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == pad).sum()) == int(grid.prod(-1).sum()) // 4  # 2x2 merge
    # a larger budget gives the 300x300 image more patches
    big = make_task({"train_file": str(data), "eval_file": str(data), "max_pixels": 28 * 28 * 64})
    grid_big = policy.encode(big.train_sample(0).messages)["image_grid_thw"]
    assert 28 * 28 * 16 < int(grid_big[1, 1] * grid_big[1, 2]) * 14 * 14 <= 28 * 28 * 64


def test_video_of_four_frames_encodes(data, policy):
    task = make_task({"train_file": str(data), "eval_file": str(data)})
    sample = task.train_sample(1)
    part = sample.messages[1]["content"][0]
    assert part["type"] == "video" and len(part["video"]) == 4 and part["max_pixels"] == 28 * 28 * 16
    enc = policy.encode(sample.messages)
    grid = enc["video_grid_thw"]
    assert grid.shape == (1, 3) and "image_grid_thw" not in enc
    t, h, w = grid[0].tolist()
    assert t == 4 // 2  # temporal patches of 2 frames
    assert 28 * 28 * 4 <= h * w * 14 * 14 <= 28 * 28 * 16
    assert enc["pixel_values_videos"].shape[0] == t * h * w
    # video_max_frames thins the frames (evenly spread)
    two = make_task({"train_file": str(data), "eval_file": str(data), "video_max_frames": 2})
    assert len(two.train_sample(1).messages[1]["content"][0]["video"]) == 2


def test_reward_on_hand_written_completions(data):
    task = make_task({"train_file": str(data), "eval_file": str(data), "format_weight": 0.5})
    mc, vid, num, mc4 = (task.train_sample(i) for i in range(4))
    cases = [
        # (sample, completion, accuracy, format)
        (mc, "<think>the first is red</think><answer>A</answer>", 1.0, 1.0),
        (mc, "<think>x</think><answer>(A) first</answer>", 1.0, 1.0),
        (mc, "<think>x</think>\n<answer> first </answer>", 1.0, 1.0),  # the option text counts too
        (mc, "<think>x</think><answer>B</answer>", 0.0, 1.0),
        (mc, "A", 0.0, 0.0),  # no answer block: no accuracy
        (mc, "<answer>A</answer>", 1.0, 0.0),  # right, but no think block
        (vid, "<think>brighter</think><answer>Yes.</answer>", 1.0, 1.0),
        (vid, "<think>x</think><answer>no</answer> extra", 0.0, 0.0),
        (num, "<think>many</think><answer>1000</answer>", 1.0, 1.0),
        (num, "<think>many</think><answer>999</answer>", 0.0, 1.0),
        (mc4, "<think>pink</think><answer>PAS</answer>", 1.0, 1.0),
    ]
    out = task.reward([c[0] for c in cases], [c[1] for c in cases])
    acc = [c[2] for c in cases]
    fmt = [c[3] for c in cases]
    assert out.components["accuracy"].tolist() == acc
    assert out.components["format"].tolist() == fmt
    assert out.rewards.tolist() == pytest.approx([a + 0.5 * f for a, f in zip(acc, fmt)])
    assert out.components["answer_found"].tolist() == [0.0 if c[1] == "A" else 1.0 for c in cases]


def test_plain_template_rewards_answer_only(data):
    task = make_task({"train_file": str(data), "eval_file": str(data), "template": "plain"})
    s = task.train_sample(2)
    out = task.reward([s, s], ["<answer>1,000</answer>", "<think>x</think><answer>1000</answer>"])
    assert out.components["format"].tolist() == [1.0, 0.0]
    assert out.rewards.tolist() == [2.0, 1.0]


def test_relative_tolerance_for_numbers(data):
    task = make_task({"train_file": str(data), "eval_file": str(data), "rel_tol": 0.01})
    s = task.train_sample(2)  # answer 1,000
    out = task.reward([s, s], ["<answer>1009</answer>", "<answer>1011</answer>"])
    assert out.components["accuracy"].tolist() == [1.0, 0.0]  # |9| <= 10.09, |11| > 10.11


def test_eval_metrics(data):
    task = make_task({"train_file": str(data), "eval_file": str(data)})
    samples = [task.train_sample(i) for i in range(4)]  # two, vid, num, mc4
    completions = [
        "<think>x</think><answer>A</answer>",  # right (colour)
        "<think>x</think><answer>no</answer>",  # wrong (video)
        "<answer>1000</answer>",  # right, bad format (count)
        "<think>x</think><answer>D</answer>",  # wrong (colour)
    ]
    m = task.eval_metrics(samples, completions)
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["format"] == pytest.approx(3 / 4)
    assert m["reward"] == pytest.approx((2 + 3) / 4)
    assert m["chance"] == pytest.approx((1 / 2 + 0 + 0 + 1 / 4) / 4)
    assert m["accuracy/colour"] == pytest.approx(1 / 2)
    assert m["accuracy/video"] == 0.0 and m["accuracy/count"] == 1.0


def test_skip_bad_rows_option(tmp_path):
    f = write_rows(
        tmp_path / "d.jsonl", [{"question": "q1", "answer": "a"}, {"question": "q2"}, {"question": "q3", "answer": "c"}]
    )
    from mmpo.errors import DataError

    with pytest.raises(DataError, match=r"d\.jsonl: line 2: field 'answer': missing or empty"):
        make_task({"train_file": str(f), "eval_file": str(f)})
    task = make_task({"train_file": str(f), "eval_file": str(f), "skip_bad_rows": True, "max_rows": 1})
    assert task.num_train() == 1 and task.train_sample(0).id == "d-0"


def test_offline_pathology_demo_when_no_train_file():
    task = make_task({"max_rows": 8})
    assert task.num_train() == 8 and len(task.eval_rows) == 8
    s = task.train_sample(0)
    assert isinstance(s, Sample) and s.meta["letters"] and s.answer in s.meta["letters"]
    assert any(p["type"] == "image" for p in s.messages[1]["content"])


def test_unreadable_image_names_row_and_path(tmp_path):
    from mmpo.errors import DataError

    (tmp_path / "fake.png").write_bytes(b"not a png")
    f = write_rows(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "images": ["fake.png"]}])
    with pytest.raises(DataError, match=rf"{f}: line 1: field 'images\[0\]': not a readable image \(.*fake\.png\)"):
        make_task({"train_file": str(f), "eval_file": str(f)})  # found at load (mmpo.media_check)
    Image.new("RGB", (8, 8)).save(tmp_path / "fake.png")
    task = make_task({"train_file": str(f), "eval_file": str(f)})
    (tmp_path / "fake.png").write_bytes(b"not a png")  # damaged after loading: found when drawn
    with pytest.raises(DataError, match=rf"{f}: line 1: field 'images\[0\]': image .*fake\.png cannot be read"):
        task.train_sample(0)
