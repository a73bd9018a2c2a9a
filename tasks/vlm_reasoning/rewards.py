"""Rewards of ``vlm_reasoning``: R = accuracy_weight * accuracy + format_weight * format.

Components (each a float tensor ``[N]``, all logged as ``reward/<name>``):

- ``accuracy``: the content of the last ``<answer>...</answer>`` is right. Multiple choice: the
  option chosen there (the letter, ``"(B)"``, ``"B. text"`` or the option's text, read by
  :func:`mmpo.rewards.extract_choice`) is the key. Open answers: :func:`open_answer_accuracy`
  (yes/no, numbers with ``rel_tol``, else normalized exact match). No answer block -> 0.
- ``format``: the output contract of the template (``think_answer_format`` for ``think`` and
  ``concise``, ``answer_only_format`` for ``plain``; for ``direct``, whose answer is the whole
  completion, an option is named (multiple choice) or the answer is non-empty (open)).
- ``answer_found``: an answer block with some content exists (weight 0: logged only).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mmpo.rewards import (
    answer_only_format,
    extract_answer_tag,
    extract_choice,
    open_answer_match,
    think_answer_format,
    weighted_sum,
)
from mmpo.tasks import RewardOutput, Sample


def _answer_text(text: str, template: str) -> str | None:
    """The answer part of a completion: the whole text for ``direct``, else the last answer block."""
    if template == "direct":
        return text.strip() or None
    return extract_answer_tag(text)


def format_reward(samples: Sequence[Sample], completions: Sequence[str], template: str) -> torch.Tensor:
    """The template's output contract, 1.0 / 0.0 per completion. Shape [N]."""
    if template == "direct":
        out = []
        for sample, text in zip(samples, completions):
            letters = sample.meta.get("letters") or []
            if letters:
                out.append(float(extract_choice(text, letters, sample.meta.get("options"), accept="both") is not None))
            else:
                out.append(float(bool(text.strip())))
        return torch.tensor(out, dtype=torch.float32)
    return answer_only_format(completions) if template == "plain" else think_answer_format(completions)


def parsed_answer(sample: Sample, completion: str, template: str = "think") -> str | None:
    """What ``completion`` answers: the letter of the chosen option (multiple choice) or the
    answer text (open); None when it gives none."""
    pred = _answer_text(completion, template)
    letters = sample.meta.get("letters") or []
    if pred is None or not letters:
        return pred
    return extract_choice(pred, letters, sample.meta.get("options"), accept="both")


def accuracy_reward(
    samples: Sequence[Sample], completions: Sequence[str], *, rel_tol: float = 0.0, template: str = "think"
) -> torch.Tensor:
    """1.0 where the answer of ``completions[i]`` answers ``samples[i]`` (see module docstring). Shape [N]."""
    out = []
    for sample, text in zip(samples, completions):
        pred = parsed_answer(sample, text, template)
        if pred is None:
            ok = False
        elif sample.meta.get("letters"):
            ok = pred == sample.answer
        else:
            ok = open_answer_match(pred, str(sample.answer), rel_tol=rel_tol)
        out.append(float(ok))
    return torch.tensor(out, dtype=torch.float32)


def answer_found(completions: Sequence[str], template: str = "think") -> torch.Tensor:
    """1.0 where a non-empty answer (``<answer>`` block, or the text for ``direct``) exists. Shape [N]."""
    return torch.tensor([float(bool(_answer_text(c, template))) for c in completions], dtype=torch.float32)


def score(
    samples: Sequence[Sample],
    completions: Sequence[str],
    *,
    template: str = "think",
    accuracy_weight: float = 1.0,
    format_weight: float = 1.0,
    rel_tol: float = 0.0,
) -> RewardOutput:
    """Total reward ``[N]`` and its components ``accuracy``, ``format``, ``answer_found``."""
    if len(samples) != len(completions):
        raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
    components = {
        "accuracy": accuracy_reward(samples, completions, rel_tol=rel_tol, template=template),
        "format": format_reward(samples, completions, template),
        "answer_found": answer_found(completions, template),
    }
    return weighted_sum(components, {"accuracy": accuracy_weight, "format": format_weight})


__all__ = ["format_reward", "accuracy_reward", "answer_found", "parsed_answer", "score"]
