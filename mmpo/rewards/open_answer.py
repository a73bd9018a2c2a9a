"""Open-ended answer accuracy: yes/no, numbers with tolerance, otherwise normalized exact match.

Rules of :func:`open_answer_match` (the reference answer decides which rule applies):

1. **yes/no** — the reference normalizes to ``yes`` or ``no``. The prediction counts as that
   boolean when its first normalized word is ``yes`` / ``no`` and the other word does not occur
   in it: ``"Yes."``, ``"yes, there is necrosis"`` and ``"NO"`` are booleans, ``"yes or no"`` is
   not. ``"y"``/``"n"`` and ``"true"``/``"false"`` are NOT read as booleans (a single letter is
   easily an option letter or a variable; true/false then fall to rule 3).
2. **numbers** — the reference parses as a number (:func:`parse_number`: integers, decimals,
   ``"1,000"``, ``"1e-3"``, percentages ``"45%"``, fractions ``"3/4"`` and ``\\frac{3}{4}``,
   the words zero..twenty, optionally inside ``$...$`` or ``\\boxed{...}``, a trailing full stop
   ignored). The prediction must parse too; they match when
   ``math.isclose(p, a, rel_tol=rel_tol, abs_tol=abs_tol)``. A percentage also matches its
   fraction (``"45%"`` equals ``"0.45"`` and ``"45"``).
3. otherwise, **normalized exact match** (:func:`normalize_answer` of both sides equal).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from typing import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
# sign, mantissa (with thousands commas, or plain, or .5), exponent, percent
_DECIMAL = re.compile(r"([-+]?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+]?\d+))?\s*(%?)")
_FRACTION = re.compile(r"([-+]?)(\d+)\s*/\s*(\d+)")
_LATEX_FRACTION = re.compile(r"([-+]?)\\d?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}")
_BOXED = re.compile(r"\\boxed\{(.*)\}", re.S)


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lower-case, punctuation to spaces, drop a/an/the, collapse spaces.

    Punctuation becomes a space (SQuAD deletes it) so that ``"well-differentiated"`` equals
    ``"well differentiated"``. ``"The H&E stain."`` -> ``"h e stain"``.
    """
    text = "".join(" " if _is_punct(ch) else ch for ch in str(text).lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _unwrap(text: str) -> str:
    text = str(text).strip()
    boxed = _BOXED.fullmatch(text)
    if boxed:
        text = boxed.group(1).strip()
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$").strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def parse_number(text: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` when the whole of ``text`` is one number, else None.

    ``"1,000"`` -> (1000.0, False); ``"45%"`` -> (45.0, True); ``"3/4"`` -> (0.75, False);
    ``"seven"`` -> (7.0, False); ``"3 cells"`` -> None.
    """
    s = _unwrap(text)
    m = _DECIMAL.fullmatch(s)
    if m:
        sign, mantissa, exponent, percent = m.groups()
        value = float(mantissa.replace(",", "")) * (10.0 ** int(exponent) if exponent else 1.0)
        return (-value if sign == "-" else value), bool(percent)
    m = _FRACTION.fullmatch(s) or _LATEX_FRACTION.fullmatch(s)
    if m and int(m.group(3)) != 0:
        value = int(m.group(2)) / int(m.group(3))
        return (-value if m.group(1) == "-" else value), False
    word = normalize_answer(s)
    if word in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[word]), False
    return None


def _yes_no(normalized: str) -> bool | None:
    words = normalized.split()
    if not words or words[0] not in ("yes", "no"):
        return None
    other = "no" if words[0] == "yes" else "yes"
    return None if other in words else words[0] == "yes"


def open_answer_match(prediction: str | None, answer: str, *, rel_tol: float = 0.0, abs_tol: float = 1e-6) -> bool:
    """Whether ``prediction`` answers like ``answer`` (rules in the module docstring). None never matches."""
    if prediction is None:
        return False
    norm_a, norm_p = normalize_answer(answer), normalize_answer(prediction)
    if norm_a in ("yes", "no"):
        return _yes_no(norm_p) == (norm_a == "yes")
    num_a = parse_number(answer)
    if num_a is not None:
        num_p = parse_number(prediction)
        if num_p is None:
            return False
        cands_a = [num_a[0]] + ([num_a[0] / 100.0] if num_a[1] else [])
        cands_p = [num_p[0]] + ([num_p[0] / 100.0] if num_p[1] else [])
        return any(math.isclose(p, a, rel_tol=rel_tol, abs_tol=abs_tol) for p in cands_p for a in cands_a)
    return norm_p == norm_a


def open_answer_accuracy(
    predictions: Sequence[str | None], answers: Sequence[str], *, rel_tol: float = 0.0, abs_tol: float = 1e-6
) -> torch.Tensor:
    """1.0 where ``predictions[i]`` matches ``answers[i]`` (see :func:`open_answer_match`), else 0.0.

    ``predictions`` are extracted answers (e.g. the ``<answer>`` content; None = no answer).
    Returns a float32 tensor ``[N]``.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"open_answer_accuracy: {len(predictions)} predictions but {len(answers)} answers")
    return torch.tensor(
        [float(open_answer_match(p, a, rel_tol=rel_tol, abs_tol=abs_tol)) for p, a in zip(predictions, answers)],
        dtype=torch.float32,
    )


__all__ = ["normalize_answer", "parse_number", "open_answer_match", "open_answer_accuracy"]
