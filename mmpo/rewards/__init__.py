"""Reusable rewards (each returns a float tensor [N]); task plugins combine and log them."""

from mmpo.rewards.choice import choice_accuracy, choice_format, extract_choice
from mmpo.rewards.combine import weighted_sum
from mmpo.rewards.format import (
    ANSWER_ONLY_RE,
    THINK_ANSWER_RE,
    answer_only_format,
    extract_answer_tag,
    think_answer_format,
)
from mmpo.rewards.open_answer import normalize_answer, open_answer_accuracy, open_answer_match, parse_number

__all__ = [
    "choice_accuracy",
    "choice_format",
    "extract_choice",
    "weighted_sum",
    "THINK_ANSWER_RE",
    "ANSWER_ONLY_RE",
    "think_answer_format",
    "answer_only_format",
    "extract_answer_tag",
    "normalize_answer",
    "parse_number",
    "open_answer_match",
    "open_answer_accuracy",
]
