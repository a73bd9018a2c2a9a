"""Output-contract rewards: ``<think>...</think><answer>...</answer>`` (R1 convention) and its variants.

The contract follows DeepSeek-R1 / Patho-R1: the whole completion (surrounding whitespace
allowed) is a ``<think>`` block followed by an ``<answer>`` block. Tags are matched exactly
(lower case), as the model is prompted to write them.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

# Full-string match (use with ``fullmatch``): think block, optional whitespace, answer block.
THINK_ANSWER_RE = re.compile(r"\s*<think>.*</think>\s*<answer>.*</answer>\s*", re.S)
# The plain template's contract: nothing but an answer block.
ANSWER_ONLY_RE = re.compile(r"\s*<answer>.*</answer>\s*", re.S)
# One answer block with no other opening <answer> inside it (so the innermost one is taken).
_ANSWER_BLOCK = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.S | re.I)


def _match_all(pattern: re.Pattern[str], completions: Sequence[str]) -> torch.Tensor:
    return torch.tensor([float(pattern.fullmatch(c) is not None) for c in completions], dtype=torch.float32)


def think_answer_format(completions: Sequence[str]) -> torch.Tensor:
    """1.0 where the whole completion is ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0.

    Surrounding whitespace and whitespace between the blocks are allowed; any other text
    before, between or after the blocks fails. Returns a float32 tensor ``[N]``.
    """
    return _match_all(THINK_ANSWER_RE, completions)


def answer_only_format(completions: Sequence[str]) -> torch.Tensor:
    """1.0 where the whole completion is one ``<answer>...</answer>`` block (whitespace around allowed).

    The contract of the ``plain`` (answer-only) template. Returns a float32 tensor ``[N]``.
    """
    return _match_all(ANSWER_ONLY_RE, completions)


def extract_answer_tag(text: str) -> str | None:
    """The stripped content of the LAST ``<answer>...</answer>`` block of ``text``, or None.

    Tags are matched case-insensitively; an empty block gives ``""`` (not None).
    """
    found = _ANSWER_BLOCK.findall(text)
    return found[-1].strip() if found else None


__all__ = ["THINK_ANSWER_RE", "ANSWER_ONLY_RE", "think_answer_format", "answer_only_format", "extract_answer_tag"]
