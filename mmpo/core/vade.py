"""VADE: per-sample Beta difficulty estimates and Thompson prompt selection (Hu et al., arXiv 2511.18902).

Each training sample ``i`` carries a Beta(a_i, b_i) posterior of the probability that one
rollout of it succeeds, and the step ``t_i`` of its last update. After the rewards of step ``t``
are known, a sample rolled out with ``k`` successes out of ``G`` is updated by
:func:`observe`; before a step's prompts are drawn, every candidate's posterior is decayed
toward the prior for the steps since its update (:func:`slow_decay`, on a copy), a success
probability is drawn from it (Thompson sampling) and scored by how likely its group is to
disagree (:func:`thompson_scores`); the top-B scores are trained (:func:`select_top`).

The paper states the structure (Beta posteriors, Thompson sampling for information gain, a
two-scale prior decay); the exact update, decay and score formulas and every constant are
[UNVERIFIED] design choices following the standard Beta-Bernoulli bandit (docs/algorithms.md):

- fast decay at each observation: ``a <- a0 + gamma_f * (a - a0)`` (b likewise), then
  ``a <- a + k``, ``b <- b + (G - k)``; continuous rewards in [0, 1] count as ``k = sum r``;
- slow decay with the steps since the last update: ``a <- a0 + gamma_s^(t - t_i) * (a - a0)``;
- score ``variance``: ``theta * (1 - theta)``; ``nondegenerate``: ``1 - theta^G - (1 - theta)^G``.

Pure tensor code: no I/O, no model; the sampler built on it is
:class:`mmpo.rollout.prompt_samplers.VadeSampler`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

#: the scores :func:`thompson_scores` knows
SCORES = ("variance", "nondegenerate")


class BetaPosteriors:
    """Beta(a_i, b_i) and the step t_i of the last update, for ``size`` samples.

    ``a [size]``, ``b [size]`` float64 (start at the prior ``a0``, ``b0``), ``t [size]`` long
    (start at 0). :meth:`state_dict` is plain JSON holding only the samples ever updated, so a
    checkpoint grows with what was trained, not with the dataset; floats round-trip exactly.
    """

    def __init__(self, size: int, *, a0: float = 1.0, b0: float = 1.0) -> None:
        if size < 0:
            raise ValueError(f"BetaPosteriors needs size >= 0, got {size}")
        if not (a0 > 0 and b0 > 0):
            raise ValueError(f"the Beta prior needs a0 > 0 and b0 > 0, got a0={a0}, b0={b0}")
        self.size = int(size)
        self._reset(a0, b0)

    def _reset(self, a0: float, b0: float) -> None:
        """Every sample at the prior Beta(a0, b0), never updated."""
        self.a0 = float(a0)
        self.b0 = float(b0)
        self.a = torch.full((self.size,), self.a0, dtype=torch.float64)
        self.b = torch.full((self.size,), self.b0, dtype=torch.float64)
        self.t = torch.zeros(self.size, dtype=torch.long)
        #: samples updated at least once (the entries :meth:`state_dict` writes)
        self.seen = torch.zeros(self.size, dtype=torch.bool)

    def mean(self) -> Tensor:
        """Posterior means ``a / (a + b)`` ``[size]`` (not decayed)."""
        return self.a / (self.a + self.b)

    def state_dict(self) -> dict[str, Any]:
        idx = torch.nonzero(self.seen).flatten()
        return {
            "size": self.size,
            "a0": self.a0,
            "b0": self.b0,
            "index": idx.tolist(),
            "a": self.a[idx].tolist(),
            "b": self.b[idx].tolist(),
            "t": self.t[idx].tolist(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if int(d["size"]) != self.size:
            raise ValueError(f"BetaPosteriors of {d['size']} samples cannot load into one of {self.size}")
        self._reset(float(d["a0"]), float(d["b0"]))
        idx = torch.tensor(d["index"], dtype=torch.long)
        self.a[idx] = torch.tensor(d["a"], dtype=torch.float64)
        self.b[idx] = torch.tensor(d["b"], dtype=torch.float64)
        self.t[idx] = torch.tensor(d["t"], dtype=torch.long)
        self.seen[idx] = True


def slow_decay(a: Any, b: Any, dt: Any, gamma_s: float, a0: float, b0: float) -> tuple[Any, Any]:
    """Shrink Beta(a, b) toward the prior Beta(a0, b0) over ``dt`` steps:
    ``a0 + gamma_s^dt * (a - a0)`` and ``b0 + gamma_s^dt * (b - b0)``.

    ``a``, ``b``, ``dt``: floats or tensors of one shape (``dt >= 0``). Returns ``(a, b)``.
    """
    if isinstance(dt, Tensor):
        w = torch.pow(torch.as_tensor(float(gamma_s), dtype=torch.float64), dt.to(torch.float64))
    else:
        w = float(gamma_s) ** dt
    return a0 + w * (a - a0), b0 + w * (b - b0)


def observe(
    state: BetaPosteriors,
    indices: Sequence[int] | Tensor,
    successes: Sequence[float] | Tensor,
    counts: Sequence[float] | Tensor,
    step: int,
    gamma_f: float,
    gamma_s: float,
) -> None:
    """Update ``state`` in place with ``successes[j]`` (k) out of ``counts[j]`` (G) of sample
    ``indices[j]`` at ``step`` (arXiv 2511.18902; docs/algorithms.md):

    0. slow decay over ``step - t_i`` steps (:func:`slow_decay`; a step before ``t_i`` decays 0 steps);
    1. fast decay ``a <- a0 + gamma_f (a - a0)``, ``b <- b0 + gamma_f (b - b0)``;
    2. ``a <- a + k``, ``b <- b + (G - k)``; 3. ``t_i <- step``.

    A sample with ``G = 0`` is left as it is. ``k`` outside ``[0, G]``, a negative or non-finite
    count, or an index outside the state raises ValueError before anything changes. A sample
    listed twice is updated twice, in order. ``indices``, ``successes``, ``counts``: ``[n]``.
    """
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    k = torch.as_tensor(successes, dtype=torch.float64).flatten()
    g = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if not (len(idx) == len(k) == len(g)):
        raise ValueError(f"observe needs one k and one G per index, got {len(idx)} indices, {len(k)} k, {len(g)} G")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= state.size):
        raise ValueError(f"observe: sample indices must lie in [0, {state.size}), got {idx.tolist()}")
    if not (torch.isfinite(k).all() and torch.isfinite(g).all()) or bool((g < 0).any()):
        raise ValueError(f"observe: counts must be finite and >= 0, got k={k.tolist()}, G={g.tolist()}")
    bad = (k < 0) | (k > g)
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        raise ValueError(f"observe: k={float(k[j])} successes out of G={float(g[j])} for sample {int(idx[j])}")
    a0, b0 = state.a0, state.b0
    for i, ki, gi in zip(idx.tolist(), k.tolist(), g.tolist()):
        if gi == 0:
            continue
        a, b = slow_decay(float(state.a[i]), float(state.b[i]), max(0, step - int(state.t[i])), gamma_s, a0, b0)
        a, b = a0 + gamma_f * (a - a0), b0 + gamma_f * (b - b0)
        state.a[i], state.b[i] = a + ki, b + (gi - ki)
        state.t[i] = int(step)
        state.seen[i] = True


def sample_beta(a: Tensor, b: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """theta ~ Beta(a, b) elementwise as ``X / (X + Y)`` with ``X ~ Gamma(a)``, ``Y ~ Gamma(b)``
    drawn from ``generator`` (so a saved generator state replays the draws); where both gammas
    underflow to 0 the mean ``a / (a + b)`` stands in. ``a``, ``b``: ``[n]`` > 0 -> ``[n]`` float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    x = torch._standard_gamma(a, generator=generator)
    y = torch._standard_gamma(b, generator=generator)
    s = x + y
    return torch.where(s > 0, x / s.clamp(min=torch.finfo(torch.float64).tiny), a / (a + b))


def thompson_scores(
    a: Tensor,
    b: Tensor,
    generator: torch.Generator | None = None,
    score: str = "variance",
    G: int | None = None,
    thompson: bool = True,
) -> Tensor:
    """Scores ``[n]`` of candidates with posteriors ``a [n]``, ``b [n]`` (already decayed to the
    current step): theta drawn from Beta(a, b) (``thompson=False``: the posterior mean, a
    deterministic test mode), then ``variance``: ``theta (1 - theta)`` (the Bernoulli reward
    variance, largest at 0.5) or ``nondegenerate``: ``1 - theta^G - (1 - theta)^G`` (the
    probability that G rollouts disagree; needs ``G >= 1``). float64."""
    if score not in SCORES:
        raise ValueError(f"score={score!r}: use one of {', '.join(SCORES)}")
    a, b = a.to(torch.float64), b.to(torch.float64)
    theta = sample_beta(a, b, generator) if thompson else a / (a + b)
    if score == "variance":
        return theta * (1 - theta)
    if G is None or G < 1:
        raise ValueError(f"score='nondegenerate' needs the group size G >= 1, got {G}")
    return 1 - theta**G - (1 - theta) ** G


def select_top(scores: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """The ``k`` candidates with the highest ``scores [n]`` (all ``n`` when ``k >= n``), best
    first, ties broken by the smaller candidate index. ``candidates [n]`` long (default
    ``arange(n)``): the sample index of each score. Returns ``[min(k, n)]`` long."""
    cand = torch.arange(len(scores)) if candidates is None else torch.as_tensor(candidates, dtype=torch.long)
    if len(cand) != len(scores):
        raise ValueError(f"select_top: {len(scores)} scores for {len(cand)} candidates")
    by_index = torch.argsort(cand, stable=True)
    order = torch.argsort(scores[by_index], descending=True, stable=True)
    return cand[by_index[order[: max(0, int(k))]]]


__all__ = ["SCORES", "BetaPosteriors", "observe", "sample_beta", "select_top", "slow_decay", "thompson_scores"]
