"""HiPO's hybrid think-on / think-off output contract for ``vlm_reasoning`` (Deng et al., arXiv 2509.23967).

HiPO lets the model decide per question whether to reason: a mode tag and a short justification
come first, then either a reasoning block and the answer (think-on) or the answer alone
(think-off). The paper's exact tags are not public; this template is a design choice of this
library (see ``docs/algorithms.md``, HiPO):

- think-on:  ``<think_on> justification <think> reasoning </think><answer> answer </answer>``
- think-off: ``<think_off> justification <answer> answer </answer>``

The justification is the text between the mode tag and the next ``<`` (so it holds no ``<``)
and must not be blank. Whitespace around the whole completion and between the blocks is
allowed, as in :data:`mmpo.rewards.THINK_ANSWER_RE`.

The reward reads (:func:`parse`): the **mode** (1 think-on, 0 think-off) and the **segment** (the
characters of the mode tag and the justification), which :func:`segment_mask` maps to completion
tokens. HiPO's bias adjustment and mode-aware advantages act on these in the ``hipo`` advantage
estimator; the reward itself is the task's usual accuracy + format, with this contract as format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

ON_TAG = "<think_on>"
OFF_TAG = "<think_off>"

SYSTEM_PROMPT = (
    "You are a careful visual reasoning assistant. First decide whether the question needs step-by-step "
    "reasoning. Start your reply with <think_on> if it does or <think_off> if it does not, followed by one "
    "short sentence that justifies the choice. After <think_on>, reason inside <think> </think> tags, then "
    "give the final answer inside <answer> </answer> tags, i.e. <think_on> justification <think> reasoning "
    "here </think><answer> answer here </answer>. After <think_off>, give the final answer directly, i.e. "
    "<think_off> justification <answer> answer here </answer>."
)

_MODE_TAG = re.compile(r"\s*(<think_on>|<think_off>)")
_ON_RE = re.compile(r"\s*<think_on>([^<]*)<think>.*</think>\s*<answer>.*</answer>\s*", re.S)
_OFF_RE = re.compile(r"\s*<think_off>([^<]*)<answer>.*</answer>\s*", re.S)


@dataclass(frozen=True)
class HipoParse:
    """What a completion says about its mode.

    ``mode``: 1 think-on, 0 think-off (from the leading mode tag; without one, 1 when the text has
    a ``<think>`` block, else 0). ``format_ok``: the whole completion follows the contract.
    ``segment``: ``(start, end)`` characters of the mode tag and its justification (up to the next
    ``<`` or the end of the text); None without a leading mode tag.
    """

    mode: int
    format_ok: bool
    segment: tuple[int, int] | None


def parse(text: str) -> HipoParse:
    """The mode, format and mode/justification span of one completion (module docstring)."""
    m = _MODE_TAG.match(text)
    if m is None:
        return HipoParse(mode=int("<think>" in text), format_ok=False, segment=None)
    on = m.group(1) == ON_TAG
    start, after = m.start(1), m.end(1)
    nxt = text.find("<", after)
    end = len(text) if nxt < 0 else nxt
    full = (_ON_RE if on else _OFF_RE).fullmatch(text)
    ok = full is not None and bool(full.group(1).strip())
    return HipoParse(mode=int(on), format_ok=ok, segment=(start, end))


def hipo_format(completions: Sequence[str]) -> torch.Tensor:
    """1.0 where the completion follows the think-on / think-off contract, else 0.0. Shape [N]."""
    return torch.tensor([float(parse(c).format_ok) for c in completions], dtype=torch.float32)


def modes(completions: Sequence[str]) -> torch.Tensor:
    """The mode of each completion (1 think-on, 0 think-off; see :class:`HipoParse`). ``[N]`` long."""
    return torch.tensor([parse(c).mode for c in completions], dtype=torch.long)


def _first(lo: int, hi: int, pred: Any) -> int:
    """The smallest k in [lo, hi] with ``pred(k)`` (``pred`` monotone; ``hi`` when none is found)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def token_span(ids: Sequence[int], tokenizer: Any, start: int, end: int) -> tuple[int, int]:
    """``(first, stop)``: tokens ``ids[first:stop]`` are those whose text meets characters
    ``[start, end)`` of ``tokenizer.decode(ids, skip_special_tokens=True)``.

    Token k covers characters ``[e(k), e(k + 1))`` with ``e(k) = len(decode(ids[:k]))``; both ends
    are found by bisection on ``e`` (O(log T) decodes), so a long completion costs little.
    """
    n = len(ids)
    if end <= start or n == 0:
        return 0, 0
    cache: dict[int, int] = {}

    def e(k: int) -> int:
        if k not in cache:
            cache[k] = len(tokenizer.decode(list(ids[:k]), skip_special_tokens=True))
        return cache[k]

    first = _first(1, n, lambda k: e(k) > start) - 1
    stop = _first(0, n, lambda k: e(k) >= end)  # e(n) is the whole text, so some k <= n holds
    return max(first, 0), max(stop, first)


def segment_mask(completion_ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """``[N, T]`` bool: the completion tokens of each row's mode tag and justification.

    completion_ids [N, T] and mask [N, T] as in :class:`mmpo.tasks.RolloutView`; each row's valid
    tokens are decoded (special tokens skipped, as the policy decodes completions) and parsed with
    :func:`parse`; a row without a leading mode tag has no segment (all False).
    """
    out = torch.zeros(mask.shape, dtype=torch.bool)
    valid = mask.bool().cpu()
    ids_all = completion_ids.cpu()
    for i in range(mask.shape[0]):
        cols = torch.nonzero(valid[i]).flatten()
        ids = ids_all[i, cols].tolist()
        seg = parse(tokenizer.decode(ids, skip_special_tokens=True)).segment
        if seg is None:
            continue
        first, stop = token_span(ids, tokenizer, *seg)
        out[i, cols[first:stop]] = True
    return out.to(mask.device)


__all__ = [
    "ON_TAG",
    "OFF_TAG",
    "SYSTEM_PROMPT",
    "HipoParse",
    "parse",
    "hipo_format",
    "modes",
    "token_span",
    "segment_mask",
]
