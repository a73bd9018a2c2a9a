"""Judges of wrong answers (Spectral PO, arXiv 2505.11595): reward, numeric and local-model judges."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmpo.errors import ConfigError, UnknownNameError
from mmpo.rewards.judge import DEFAULT_QUESTION, JUDGES, LocalModelJudge, build_judge, final_number
from mmpo.tasks import build_task
from mmpo.tiny import save_tiny


def nan_list(t: torch.Tensor) -> list:
    return [None if math.isnan(v) else v for v in t.tolist()]


def test_registry_names():
    assert JUDGES.names() == ["local_model", "numeric", "reward"]
    with pytest.raises(UnknownNameError, match="numeric"):
        build_judge("numerik")
    with pytest.raises(ConfigError, match="expected a judge name"):
        build_judge(None)
    with pytest.raises(ConfigError, match="expected a judge name"):
        build_judge({"floor": 1.0})
    assert build_judge("numeric").floor == 1.0


# -- reward ------------------------------------------------------------------------------------


def test_reward_judge_with_a_callable_maps_to_unit_range():
    def fn(prompts, completions, references):
        return [float(c) for c in completions]  # raises on a non-number

    judge = build_judge({"name": "reward", "component": fn, "low": -1.0, "high": 3.0})
    got = judge.score(["p"] * 6, ["-1", "0", "1", "3", "7", "oops"], [None] * 6)
    assert got.dtype == torch.float32
    # (v + 1) / 4, clamped; "oops" fails alone and is NaN
    assert nan_list(got) == [0.0, 0.25, 0.5, 1.0, 1.0, None]


def test_reward_judge_non_finite_values_are_nan():
    judge = build_judge(
        {"name": "reward", "component": lambda p, c, r: torch.tensor([0.5, float("inf"), float("nan")])}
    )
    assert nan_list(judge.score(["p"] * 3, ["a", "b", "c"], ["r"] * 3)) == [0.5, None, None]


def test_reward_judge_reads_a_task_component():
    task = build_task("synthetic_vqa", {"num_train": 10, "format_weight": 0.5}, seed=0)
    s = task.train_sample(0)
    right = s.meta["options"][s.meta["letters"].index(s.answer)]
    wrong = next(o for o in s.meta["options"] if o != right)
    judge = build_judge({"name": "reward", "component": "format"}, task)
    got = judge.score(["q"] * 3, [right, wrong, "xyz"], [s.answer] * 3, samples=[s] * 3)
    assert got.tolist() == [1.0, 1.0, 0.0]  # format: an option was chosen, right or wrong
    total = build_judge({"name": "reward", "component": "accuracy"}, task)
    assert total.score(["q"] * 2, [right, wrong], [None, None], samples=[s, s]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="samples"):
        judge.score(["q"], [right], [None])


def test_reward_judge_options_are_checked():
    task = build_task("synthetic_vqa", {"num_train": 10}, seed=0)
    with pytest.raises(ConfigError, match=r"'component' = 'acuracy'.*Did you mean 'accuracy'"):
        build_judge({"name": "reward", "component": "acuracy"}, task)
    with pytest.raises(ConfigError, match=r"'component' = 'accuracy'.*no task"):
        build_judge({"name": "reward", "component": "accuracy"})
    with pytest.raises(ConfigError, match=r"'high' = 0\.0"):
        build_judge({"name": "reward", "component": len, "high": 0.0})
    with pytest.raises(ConfigError, match=r"'component' is required"):
        build_judge({"name": "reward"})
    with pytest.raises(ConfigError, match=r"unknown option 'hihg'.*Did you mean 'high'"):
        build_judge({"name": "reward", "component": len, "hihg": 2})


# -- numeric ------------------------------------------------------------------------------------


def test_numeric_judge_hand_values():
    judge = build_judge("numeric")
    completions = [
        "<think>..</think><answer>12</answer>",  # y = 10: 1 / (1 + 2/10)
        "1",  # y = 0.5, floor 1: 1 / (1 + 0.5)
        "so \\boxed{3/4}",  # exact
        "The answer is 7 apples",  # last number 7, y = 7
        "<answer>4</answer>",  # y = -4: 1 / (1 + 8/4)
        "<answer>1000</answer>",  # y = "1,000"
        "no idea",  # no number: judged 0
        "5",  # reference None: not judged
        "5",  # reference without a number: not judged
    ]
    refs = ["10", "0.5", "0.75", "7", "-4", "1,000", "3", None, "liver"]
    got = judge.score(["q"] * len(refs), completions, refs)
    want = [1 / 1.2, 1 / 1.5, 1.0, 1.0, 1 / 3, 1.0, 0.0, None, None]
    for g, w in zip(nan_list(got), want):
        assert (g is None and w is None) or g == pytest.approx(w, rel=1e-6)


def test_numeric_judge_floor_and_errors():
    # y = 0.5 with floor 0.25: 1 / (1 + 0.5 / 0.5)
    assert build_judge({"name": "numeric", "floor": 0.25}).score(["q"], ["1"], ["0.5"]).tolist() == [0.5]
    with pytest.raises(ConfigError, match=r"'floor' = 0"):
        build_judge({"name": "numeric", "floor": 0})
    with pytest.raises(ConfigError, match=r"'floor' = 'x'"):
        build_judge({"name": "numeric", "floor": "x"})
    with pytest.raises(ValueError, match="differ"):
        build_judge("numeric").score(["q"], ["1", "2"], ["1", "2"])


def test_final_number():
    assert final_number("<answer>seven</answer>") == 7.0
    assert final_number("<answer>45%</answer>") == 45.0
    assert final_number("x = 3, then 1,250.5 total") == 1250.5
    assert final_number("<answer>none</answer> 4") is None  # the answer block decides
    assert final_number(None) is None


# -- local_model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny("qwen2", tmp_path_factory.mktemp("judge") / "qwen2", seed=3)


def _by_hand(folder, prompt: str, completion: str, reference: str | None) -> float:
    """softmax over the logits of 'Yes' and 'No' after the chat-formatted judge question."""
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ref = "" if reference is None else f"Reference answer: {reference}\n\n"
    user = f"Question:\n{prompt}\n\n{ref}Response:\n{completion}\n\n{DEFAULT_QUESTION}"
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    y, n = tok.encode("Yes", add_special_tokens=False)[0], tok.encode("No", add_special_tokens=False)[0]
    ly, ln = float(logits[y]), float(logits[n])
    return math.exp(ly) / (math.exp(ly) + math.exp(ln))


def test_local_model_judge_scores(tiny_folder):
    judge = build_judge({"name": "local_model", "model": str(tiny_folder), "batch_size": 4})
    prompts = ["What colour is it?", "How many shapes are there in the image?", "What colour is it?", "Which?"]
    completions = ["<think>red</think><answer>A</answer>", "I count two.", "<think>red</think><answer>A</answer>", ""]
    refs = ["B", None, "B", "C"]
    got = judge.score(prompts, completions, refs)
    assert got.shape == (4,) and got.dtype == torch.float32
    assert torch.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()
    assert got[0] == pytest.approx(float(got[2]), abs=1e-6)  # identical inputs, one batch
    assert got[0] != pytest.approx(float(got[1]), abs=1e-6)  # and different ones differ
    for i in (0, 1):  # padded batch == the hand computation on the single row
        assert float(got[i]) == pytest.approx(_by_hand(tiny_folder, prompts[i], completions[i], refs[i]), abs=1e-5)
    # batch size does not change the scores
    one = build_judge({"name": "local_model", "model": str(tiny_folder), "batch_size": 1}).score(
        prompts, completions, refs
    )
    torch.testing.assert_close(one, got, atol=1e-5, rtol=0)


def test_local_model_judge_bad_rows_are_nan(tiny_folder):
    judge = LocalModelJudge(model=str(tiny_folder), max_length=16)
    got = judge.score(["q", "q", "q"], ["fine", None, "also fine"], [None, None, 3])  # type: ignore[list-item]
    assert math.isnan(float(got[1])) and torch.isfinite(got[[0, 2]]).all()
    # max_length keeps the last tokens: the question stays, so long and short texts share the tail
    assert judge.score(["q"], ["x " * 200], [None]).isfinite().all()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"batch_size": 0}, r"'batch_size' = 0"),
        ({"dtype": "fp8"}, r"'dtype' = 'fp8'"),
        ({"yes": "Yes", "no": "Yes"}, r"'no' = 'Yes'.*same token"),
        ({"template": "{prompt} only"}, r"'template'.*\{completion\}"),
        ({"template": "{completion} {oops}"}, r"'template'.*placeholders"),
        ({"question": ""}, r"'question' = ''"),
        ({"modle": "x"}, r"unknown option 'modle'.*Did you mean 'model'"),
    ],
)
def test_local_model_judge_options(tiny_folder, options, match):
    opts = {"model": str(tiny_folder), **options}
    with pytest.raises(ConfigError, match=match):
        build_judge({"name": "local_model", **opts})


def test_local_model_judge_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"'model' = '.*nowhere'"):
        build_judge({"name": "local_model", "model": str(tmp_path / "nowhere")})
