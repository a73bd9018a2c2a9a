"""Reward layers of ``tool_qa``, each a separate function returning a dict (for logging):
TAPO's format gate and answer scorer (arXiv 2510.07038, ``tool_dapo.compute_score``) and
RL-Factory's search-environment reward and tool step rewards (arXiv 2509.06980). See
``docs/plugins/tool_qa.md``.

1. :func:`format_gate`: every ``<tag>...</tag>`` block must use an allowed tag, the last block
   must be ``<answer>`` and only whitespace may follow it. ``strict`` (our default) also allows
   only whitespace before and between blocks; ``strict=False`` is TAPO's unanchored scan (stray
   text between blocks tolerated).
2. :func:`score_answer`: the predicted answer against the ground truths (max over them), after
   lower-casing, mapping number words (one ... twelve) to digits and removing thousands
   separators; by ``source``: ``default`` exact match, ``nq`` (1 if a ground truth is a
   substring of the prediction, else 1 - d/L when that ratio d/L < 0.5, d the Levenshtein
   distance and L the longer length, else 0), ``calculator`` (|pred - gt| < 1e-3), ``complex``
   (relative error < 5 % after keeping digits, sign and dot). Correct means score > 0.9.
3. :func:`search_env_reward`: RL-Factory's reward with f = ``format_weight``: a = +f if
   ``<answer>`` tags are present and strictly alternate, else -f; u = -f when the ``<tool_call>``
   tags are well formed and there are more than ``max_calls`` of them, else 0; s = a + u; the
   reward is 1 + 0.5 s when the answer is correct, s when it is wrong, -f + 0.5 s without one.
4. :func:`tool_step_rewards`: RL-Factory's process reward summed over the tool turns: -0.05 for a
   turn whose call could not be parsed, else 0.1 (n - 2 failed) / n for its n calls.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from mmpo.errors import ConfigError

TAPO_TAGS = ("think", "response", "answer", "search", "code")
#: the tags of the Qwen tool protocol (RL-Factory): observations are separate chat turns
QWEN_TAGS = ("think", "tool_call", "answer")
SOURCES = ("default", "nq", "calculator", "complex")
_BLOCK = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>(.*?)</\1>", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER_TAG = re.compile(r"</?answer>")
_NUMBER_WORDS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())
}
_NUMBER_WORD_RE = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
ANSWER_CHARS = 100  # TAPO scores the last 100 characters of the answer


def format_gate(text: str, *, tags: Sequence[str] = TAPO_TAGS, strict: bool = True) -> dict[str, object]:
    """Layer 1. ``{"valid": bool, "reason": str, "answer": str | None, "<tag>_count": int ...}``;
    ``answer`` is the last 100 characters of the final ``<answer>`` block (None when invalid)."""
    counts = {f"{t}_count": 0 for t in tags}
    blocks = list(_BLOCK.finditer(text))

    def bad(reason: str) -> dict[str, object]:
        return {"valid": False, "reason": reason, "answer": None, **counts}

    if not blocks:
        return bad("no <tag>...</tag> block")
    pos = 0
    for m in blocks:
        if m.group(1) not in tags:
            return bad(f"unknown tag <{m.group(1)}>")
        counts[f"{m.group(1)}_count"] += 1
        if strict and text[pos : m.start()].strip():
            return bad("text outside the blocks")
        pos = m.end()
    if blocks[-1].group(1) != "answer":
        return bad("the last block is not <answer>")
    if text[blocks[-1].end() :].strip():
        return bad("text after the answer")
    return {"valid": True, "reason": "", "answer": blocks[-1].group(2).strip()[-ANSWER_CHARS:], **counts}


def normalize_answer(text: str) -> str:
    """Lower case, number words (zero ... twelve) as digits, thousands separators removed,
    whitespace collapsed, a final period dropped."""
    s = " ".join(str(text).lower().split())
    s = _NUMBER_WORD_RE.sub(lambda m: _NUMBER_WORDS[m.group(1)], s)
    s = _THOUSANDS.sub("", s)
    return s.rstrip(".").strip()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _number(s: str) -> float | None:
    try:
        x = float(s)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _score_one(pred: str, gt: str, source: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gt)
    if source == "default":
        return float(p == g)
    if source == "nq":
        if g and g in p:
            return 1.0
        longest = max(len(p), len(g))
        if longest == 0:
            return 1.0
        ratio = levenshtein(p, g) / longest
        return 1.0 - ratio if ratio < 0.5 else 0.0
    if source == "calculator":
        x, y = _number(p), _number(g)
        return float(x is not None and y is not None and abs(x - y) < 1e-3)
    # complex: keep digits, sign and dot, then a relative error below 5 %
    x, y = _number(re.sub(r"[^0-9.\-]", "", p)), _number(re.sub(r"[^0-9.\-]", "", g))
    if x is None or y is None:
        return 0.0
    return float(abs(x - y) <= 0.05 * abs(y)) if y != 0 else float(x == 0)


def score_answer(pred: str | None, ground_truths: str | Sequence[str], source: str = "default") -> dict[str, object]:
    """Layer 2. ``{"score": float in [0, 1], "correct": score > 0.9}``; a None prediction scores 0."""
    if source not in SOURCES:
        raise ConfigError(f"answer source must be one of {list(SOURCES)}; got {source!r}")
    gts = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    score = 0.0 if pred is None or not gts else max(_score_one(pred, g, source) for g in gts)
    return {"score": score, "correct": score > 0.9}


def last_answer(text: str) -> str | None:
    """The last ``<answer>`` content once ``<think>`` blocks are removed, stripped (RL-Factory)."""
    found = re.findall(r"<answer>(.*?)</answer>", _THINK.sub("", text), re.DOTALL)
    return found[-1].strip() if found else None


def answer_tags_alternate(text: str) -> bool:
    """``<answer>`` / ``</answer>`` present, opening first and strictly alternating."""
    marks = _ANSWER_TAG.findall(text)
    if not marks or len(marks) % 2:
        return False
    return all(m == ("<answer>" if i % 2 == 0 else "</answer>") for i, m in enumerate(marks))


def search_env_reward(text: str, correct: bool, *, format_weight: float = 0.1, max_calls: int = 2) -> dict[str, float]:
    """Layer 3 (RL-Factory's search environment). ``correct``: whether the answer is right
    (layer 2). Returns ``reward``, ``answer_term`` (a), ``overuse_term`` (u), ``has_answer``."""
    f = format_weight
    a = f if answer_tags_alternate(text) else -f
    opens, closes = text.count("<tool_call>"), text.count("</tool_call>")
    u = -f if opens == closes and opens > max_calls else 0.0
    s = a + u
    has = last_answer(text) is not None
    reward = (1.0 + 0.5 * s if correct else s) if has else -f + 0.5 * s
    return {"reward": reward, "answer_term": a, "overuse_term": u, "has_answer": float(has)}


def tool_step_rewards(turns: Sequence[tuple[int, int, bool]]) -> dict[str, float]:
    """Layer 4 (RL-Factory's process reward), summed. ``turns``: per tool turn ``(calls, failed,
    malformed)``. Returns ``step_reward`` (the sum) and ``validity`` (share of the turns' calls
    that ran without error, malformed turns counting as one failed call; 1 without any)."""
    total, good, n = 0.0, 0, 0
    for calls, failed, malformed in turns:
        if malformed:
            total -= 0.05
            n += 1
        elif calls:
            total += 0.1 * (calls - 2 * failed) / calls
            good += calls - failed
            n += calls
    return {"step_reward": total, "validity": good / n if n else 1.0}


__all__ = [
    "QWEN_TAGS",
    "SOURCES",
    "TAPO_TAGS",
    "answer_tags_alternate",
    "format_gate",
    "last_answer",
    "levenshtein",
    "normalize_answer",
    "score_answer",
    "search_env_reward",
    "tool_step_rewards",
]
