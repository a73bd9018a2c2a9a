"""Multiple-choice extraction, accuracy and format rewards."""

import pytest
import torch

from mmpo.rewards import choice_accuracy, choice_format, extract_choice

L = ["A", "B", "C", "D"]
O = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("B", "B"),
        (" B.", "B"),
        ("(C)", "C"),
        ("The answer is D", "D"),
        ("answer: a", "A"),
        ("<think>maybe A</think><answer>C</answer>", "C"),
        ("a cat", None),  # the article is not option A
        ("", None),
    ],
)
def test_letters(text, expected):
    assert extract_choice(text, L) == expected


@pytest.mark.parametrize(
    "text,expected",
    [(" blue", "C"), ("Yellow.", "D"), ("I think it is green, not red", "B"), ("purple", None)],
)
def test_option_texts(text, expected):
    assert extract_choice(text, L, O) == expected


def test_accept_limits_the_form():
    assert extract_choice("B", L, O, accept="option") is None
    assert extract_choice("blue", L, O, accept="letter") is None
    assert extract_choice("blue", L, O, accept="option") == "C"


def test_accuracy_and_format():
    comps = [" red", "blue blue", "purple", "A"]
    acc = choice_accuracy(comps, ["A", "C", "A", "A"], [L] * 4, [O] * 4, accept="option")
    assert torch.equal(acc, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    fmt = choice_format(comps, [L] * 4, [O] * 4, accept="option")
    assert torch.equal(fmt, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    exact = choice_format(comps, [L] * 4, [O] * 4, accept="option", exact=True)
    assert torch.equal(exact, torch.tensor([1.0, 0.0, 0.0, 0.0]))
