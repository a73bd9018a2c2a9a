"""Open-ended answers: normalization, yes/no, numbers with tolerance, exact match."""

import pytest

from mmpo.rewards import normalize_answer, open_answer_accuracy, open_answer_match, parse_number


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The Nucleus.", "nucleus"),
        ("  an   H&E   stain ", "h e stain"),
        ("well-differentiated", "well differentiated"),
        ("A cat, a dog!", "cat dog"),
        ("Theory", "theory"),  # 'the' only as a whole word
        ("«Mitosis»", "mitosis"),  # unicode punctuation
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("42", (42.0, False)),
        ("-3.5", (-3.5, False)),
        (".5", (0.5, False)),
        ("1,000", (1000.0, False)),
        ("1,234,567.25", (1234567.25, False)),
        ("45%", (45.0, True)),
        ("12.5 %", (12.5, True)),
        ("3/4", (0.75, False)),
        ("-1 / 8", (-0.125, False)),
        ("\\frac{3}{4}", (0.75, False)),
        ("$7$", (7.0, False)),
        ("\\boxed{12}", (12.0, False)),
        ("1e-3", (0.001, False)),
        ("7.", (7.0, False)),
        ("Seven", (7.0, False)),
        ("3 cells", None),
        ("1,00", None),  # not a thousands grouping
        ("3/0", None),
        ("abc", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    got = parse_number(text)
    if expected is None:
        assert got is None
    else:
        assert got[1] == expected[1] and got[0] == pytest.approx(expected[0])


@pytest.mark.parametrize(
    "pred,answer,ok",
    [
        ("Yes.", "yes", True),
        ("YES", "Yes", True),
        ("yes, there is necrosis", "yes", True),
        ("No, it is benign", "no", True),
        ("no", "yes", False),
        ("yes or no", "yes", False),  # hedging is not an answer
        ("y", "yes", False),  # single letters are not booleans
        ("true", "yes", False),
        ("There is no tumour", "no", False),  # the boolean must come first
        (None, "yes", False),
        ("1000", "1,000", True),
        ("0.75", "3/4", True),
        ("3/4", "0.75", True),
        ("45%", "0.45", True),  # a percentage matches its fraction ...
        ("45", "45%", True),  # ... and its number
        ("0.46", "45%", False),
        ("three", "3", True),
        ("3 cells", "3", False),  # a number answer needs a number prediction
        ("2.0000001", "2", True),  # within abs_tol 1e-6
        ("2.01", "2", False),
        ("The Nucleus", "nucleus.", True),
        ("nuclei", "nucleus", False),
        ("squamous cell carcinoma", "Squamous-cell carcinoma", True),
    ],
)
def test_open_answer_match(pred, answer, ok):
    assert open_answer_match(pred, answer) is ok


def test_relative_tolerance():
    # |10.4 - 10| = 0.4 <= 0.05 * 10.4 = 0.52 (isclose uses the larger magnitude)
    assert open_answer_match("10.4", "10", rel_tol=0.05)
    assert not open_answer_match("10.6", "10", rel_tol=0.05)  # 0.6 > 0.53
    assert not open_answer_match("10.4", "10")


def test_accuracy_vector():
    out = open_answer_accuracy(["yes", "4", None, "cat"], ["yes", "5", "no", "the cat"])
    assert out.shape == (4,) and out.dtype.is_floating_point
    assert out.tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        open_answer_accuracy(["a", "b"], ["a"])
