"""HiPO think-on / think-off in vlm_reasoning (arXiv 2509.23967): template, parsing, reward, row_info."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpo.config import from_dict
from mmpo.errors import ConfigError
from mmpo.tasks import RolloutView
from mmpo.tiny import build_tokenizer
from mmpo_tasks.vlm_reasoning import hipo
from mmpo_tasks.vlm_reasoning.task import VLMReasoningTask


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def data(tmp_path) -> Path:
    Image.new("RGB", (64, 64), (0, 0, 200)).save(tmp_path / "a.png")
    rows = [
        {"id": "mc", "image": "a.png", "question": "Colour?", "options": ["red", "blue"], "answer": "B"},
        {"id": "open", "image": "a.png", "question": "How many?", "answer": "3"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make(data: Path, **options) -> VLMReasoningTask:
    opts = {"train_file": str(data), "eval_file": str(data), **options}
    return VLMReasoningTask(from_dict(VLMReasoningTask.Config, opts, where="task"))


# -- options --------------------------------------------------------------------------------------


def test_disabled_by_default(data):
    task = make(data)
    assert task.config.hipo.enabled is False
    assert task.row_info_keys == () and task.required_advantage is None
    assert "<think_on>" not in task.train_sample(0).messages[0]["content"]


def test_enabled_sets_template_row_info_and_advantage(data):
    task = make(data, hipo={"enabled": True})
    assert task.row_info_keys == ("mode", "segment_mask")
    assert task.required_advantage == "hipo"
    assert task.train_sample(0).messages[0] == {"role": "system", "content": hipo.SYSTEM_PROMPT}
    # a user system prompt still replaces it
    assert make(data, hipo={"enabled": True}, system_prompt="S").train_sample(0).messages[0]["content"] == "S"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"hipo": {"enabled": True}, "template": "plain"}, r"task\.hipo\.enabled.*'plain'"),
        ({"hipo": {"enabled": True}, "ares": {"enabled": True}}, r"task\.hipo\.enabled.*ares\.enabled"),
        ({"hipo": {"enabled": True, "omega": 0.1}}, r"task\.hipo\.omega"),
        ({"hipo": {"enabled": "yes"}}, r"task\.hipo\.enabled"),
    ],
)
def test_bad_options_are_config_errors(data, options, match):
    with pytest.raises(ConfigError, match=match):
        make(data, **options)


# -- parsing --------------------------------------------------------------------------------------

ON = "<think_on> Needs counting. <think>one two three</think><answer>3</answer>"
OFF = " \n<think_off>Easy.<answer>B</answer>"


@pytest.mark.parametrize(
    "text, mode, ok, segment",
    [
        (ON, 1, True, (0, 27)),
        (OFF, 0, True, (2, 18)),
        ("<think_on> j <think>x</think>\n<answer>B</answer>\n", 1, True, (0, 13)),
        # a justification is required
        ("<think_on><think>x</think><answer>B</answer>", 1, False, (0, 10)),
        ("<think_off>   <answer>B</answer>", 0, False, (0, 14)),
        # the wrong body for the mode
        ("<think_on> hard <answer>B</answer>", 1, False, (0, 16)),
        ("<think_off> easy <think>x</think><answer>B</answer>", 0, False, (0, 17)),
        # text after the answer; a tag that is not first
        ("<think_off> easy <answer>B</answer> more", 0, False, (0, 17)),
        ("x <think_on> j <think>x</think><answer>B</answer>", 1, False, None),
        # no mode tag: the mode follows the reasoning block, the format fails
        ("<think>x</think><answer>B</answer>", 1, False, None),
        ("<answer>B</answer>", 0, False, None),
        ("", 0, False, None),
        # a justification that runs to the end of the text
        ("<think_on> no tags at all", 1, False, (0, 25)),
    ],
)
def test_parse(text, mode, ok, segment):
    p = hipo.parse(text)
    assert (p.mode, p.format_ok, p.segment) == (mode, ok, segment)
    if segment is not None:
        assert text[segment[0] :].startswith(("<think_on>", "<think_off>"))


def test_reward_uses_the_hipo_format_and_logs_the_mode(data):
    task = make(data, hipo={"enabled": True}, format_weight=0.5)
    s = task.train_sample(0)  # answer B
    texts = [
        "<think_on> Compare colours. <think>it is blue</think><answer>B</answer>",
        "<think_off> Visible at a glance. <answer>B</answer>",
        "<think_off> Visible at a glance. <answer>A</answer>",
        "<think>it is blue</think><answer>B</answer>",  # no mode tag: right answer, format fails
    ]
    out = task.reward([s] * 4, texts)
    assert out.components["accuracy"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert out.components["format"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert out.components["think_on"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out.rewards.tolist() == [1.5, 1.5, 0.5, 1.0]  # no bias term: that is the advantage's
    assert out.row_info == {}


# -- token segments ---------------------------------------------------------------------------------


def _view(tok, texts: list[str], eos: bool = True) -> RolloutView:
    rows = [tok.encode(t, add_special_tokens=False) + ([tok.eos_token_id] if eos else []) for t in texts]
    width = max(len(r) for r in rows) + 2
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return RolloutView(ids, mask, torch.zeros(len(rows), dtype=torch.long), tokenizer=tok)


def _expected(tok, ids: list[int], stop_tag: str, start_char: str = "<") -> list[int]:
    """Hand rule for the tiny tokenizer (tags are single added tokens): from the first token holding
    ``<`` up to the ``stop_tag`` token."""
    texts = tok.convert_ids_to_tokens(ids)
    first = next(k for k, t in enumerate(texts) if start_char in t)
    stop = ids.index(tok.convert_tokens_to_ids(stop_tag))
    return list(range(first, stop))


def test_segment_mask_on_the_tiny_tokenizer(data, tok):
    task = make(data, hipo={"enabled": True})
    texts = [ON, OFF, "<think>x</think><answer>B</answer>", "<think_off> a b c <answer>3</answer>"]
    view = _view(tok, texts)
    s = task.train_sample(0)
    out = task.reward_with_rollout([s] * 4, texts, view)
    assert out.row_info["mode"].dtype == torch.long and out.row_info["mode"].tolist() == [1, 0, 1, 0]
    seg = out.row_info["segment_mask"]
    assert seg.dtype == torch.bool and seg.shape == view.mask.shape
    assert not (seg & ~view.mask).any()  # only completion tokens
    for i, stop_tag in ((0, "<think>"), (1, "<answer>"), (3, "<answer>")):
        ids = view.completion_ids[i][view.mask[i]].tolist()
        assert torch.nonzero(seg[i]).flatten().tolist() == _expected(tok, ids, stop_tag)
    assert not seg[2].any()  # no mode tag, no segment
    # the segment decodes to the mode tag and the justification
    assert tok.decode(view.completion_ids[0][seg[0]].tolist()) == "<think_on> Needs counting. "
    assert tok.decode(view.completion_ids[1][seg[1]].tolist()) == "<think_off>Easy."


def test_segment_mask_with_gaps_in_the_mask(tok):
    """A masked-out column inside a row (multi-turn layout) is skipped, positions map back."""
    ids = tok.encode(OFF, add_special_tokens=False)
    full = torch.tensor([ids[:3] + [tok.pad_token_id] + ids[3:]])
    mask = torch.ones_like(full, dtype=torch.bool)
    mask[0, 3] = False
    seg = hipo.segment_mask(full, mask, tok)
    want = [k if k < 3 else k + 1 for k in _expected(tok, ids, "<answer>")]
    assert torch.nonzero(seg[0]).flatten().tolist() == want


def test_token_span_includes_a_token_that_straddles_the_end(tok):
    text = "<think_on> Needs counting."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    k = pieces.index("Ġcount")  # " count": characters 16..22
    end = text.index("count") + 2  # ends inside " count"
    assert hipo.token_span(ids, tok, 0, end) == (0, k + 1)
    assert hipo.token_span(ids, tok, text.index("count"), end) == (k, k + 1)
    assert hipo.token_span(ids, tok, 0, len(text)) == (0, len(ids))
    assert hipo.token_span(ids, tok, 3, 3) == (0, 0)


def test_rollout_without_tokenizer_is_refused(data, tok):
    task = make(data, hipo={"enabled": True})
    view = _view(tok, [ON])
    view.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        task.reward_with_rollout([task.train_sample(0)], [ON], view)
