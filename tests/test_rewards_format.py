"""The <think>/<answer> output contract: full-string format rewards and answer extraction."""

import pytest

from mmpo.rewards import answer_only_format, extract_answer_tag, think_answer_format


@pytest.mark.parametrize(
    "text,ok",
    [
        ("<think>x</think><answer>B</answer>", 1.0),
        ("  <think>\nstep 1\nstep 2\n</think>\n\n<answer> B </answer>\n", 1.0),  # whitespace around/between
        ("<think></think><answer></answer>", 1.0),  # empty blocks still follow the contract
        ("<answer>B</answer>", 0.0),  # no think block
        ("<think>x</think>", 0.0),  # no answer block
        ("So: <think>x</think><answer>B</answer>", 0.0),  # text before
        ("<think>x</think> so <answer>B</answer>", 0.0),  # text between
        ("<think>x</think><answer>B</answer> done", 0.0),  # text after
        ("<answer>B</answer><think>x</think>", 0.0),  # wrong order
        ("<THINK>x</THINK><ANSWER>B</ANSWER>", 0.0),  # tags are exact
    ],
)
def test_think_answer_format(text, ok):
    assert think_answer_format([text]).tolist() == [ok]


def test_format_rewards_are_float_vectors():
    out = think_answer_format(["<think>a</think><answer>b</answer>", "b", ""])
    assert out.dtype.is_floating_point and out.shape == (3,)
    assert out.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "text,ok",
    [
        ("<answer>yes</answer>", 1.0),
        (" \n<answer>\n3/4\n</answer>  ", 1.0),
        ("<think>x</think><answer>B</answer>", 0.0),
        ("yes", 0.0),
        ("<answer>yes</answer> because", 0.0),
    ],
)
def test_answer_only_format(text, ok):
    assert answer_only_format([text]).tolist() == [ok]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>maybe <answer>A</answer>?</think><answer> C </answer>", "C"),  # the LAST block
        ("<answer>first</answer> and <answer>second</answer>", "second"),
        ("<Answer>mixed case</ANSWER>", "mixed case"),
        ("<answer>\n multi\nline \n</answer>", "multi\nline"),
        ("<answer></answer>", ""),  # an empty block is found (not None)
        ("<answer>unclosed", None),
        ("no tags at all", None),
        ("<answer>a<answer>b</answer>", "b"),  # the innermost block of an unclosed outer one
    ],
)
def test_extract_answer_tag(text, expected):
    assert extract_answer_tag(text) == expected
