"""HiconAgent's Dynamic Context Sampling (arXiv 2512.01763): how much history a rollout keeps.

Each rollout independently keeps the last k of the H history steps, with
``P(k) ∝ exp(s · w · k)``, ``k ∈ {0..H}``, ``w = min(1, 3 (step - 1) / (S - 1))`` (s = 2, S the
total training steps): uniform at the start, skewed toward the full history after about S / 3.
"""

from __future__ import annotations

import numpy as np


def dcs_weight(step: int, total_steps: int) -> float:
    """``w = min(1, 3 (step - 1) / (S - 1))`` (step counted from 1)."""
    if total_steps <= 1:
        return 1.0
    return min(1.0, max(0.0, 3.0 * (step - 1) / (total_steps - 1)))


def dcs_probs(step: int, total_steps: int, history: int, s: float = 2.0) -> np.ndarray:
    """``P(k)`` for ``k = 0..history`` ``[history + 1]``."""
    w = dcs_weight(step, total_steps)
    logits = np.array([s * w * k for k in range(history + 1)], dtype=np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def sample_history_length(step: int, total_steps: int, history: int, rng: np.random.Generator, s: float = 2.0) -> int:
    """A kept-history length ``k`` drawn from :func:`dcs_probs`."""
    return int(rng.choice(history + 1, p=dcs_probs(step, total_steps, history, s)))


def keep_recent(steps: list, k: int) -> list:
    """The most recent ``k`` history steps (all of them when ``k`` exceeds their number)."""
    return list(steps[-k:]) if k > 0 else []


__all__ = ["dcs_probs", "dcs_weight", "keep_recent", "sample_history_length"]
