"""Advantage estimators that keep state across steps: ``dcpo_sas`` and ``rank_ema``.

Both take ``state=`` (an instance of ``fn.state_cls``; ``None`` makes a fresh state used for
that call only) and update it in place. States serialise with ``state_dict()`` to plain JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, group_index
from mmpo.core.advantages import ADVANTAGES
from mmpo.errors import UnknownNameError


# --------------------------------------------------------------------------- dcpo_sas
@dataclass
class RunningStat:
    """Count, mean and sum of squared deviations (Chan/Welford) of one prompt's rewards."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    visits: int = 0

    def merge(self, values: list[float]) -> None:
        """Add a batch of rewards (parallel-variance merge) and count one visit."""
        nb = len(values)
        if nb:
            mb = sum(values) / nb
            m2b = sum((v - mb) ** 2 for v in values)
            n = self.n + nb
            delta = mb - self.mean
            self.m2 = self.m2 + m2b + delta * delta * self.n * nb / n
            self.mean = self.mean + delta * nb / n
            self.n = n
        self.visits += 1

    @property
    def std(self) -> float:
        """Unbiased std (n-1); 0 for fewer than two rewards."""
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@dataclass
class DCPOState:
    """Per-prompt cumulative reward statistics for ``dcpo_sas``, keyed by prompt key."""

    stats: dict[str, RunningStat] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: {"n": s.n, "mean": s.mean, "m2": s.m2, "visits": s.visits} for k, s in self.stats.items()}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.stats = {
            str(k): RunningStat(int(v["n"]), float(v["mean"]), float(v["m2"]), int(v["visits"]))
            for k, v in d.get("stats", {}).items()
        }


@ADVANTAGES.register("dcpo_sas")
def dcpo_sas(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    state: DCPOState | None = None,
    prompt_keys: list[str] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """DCPO smooth advantage standardization (paper §3, App. A.7).

    For each group (prompt key k, visit number i counting this one): ``mu_new, sigma_new`` are the
    group's mean and unbiased std; the prompt's cumulative ``mu_total, sigma_total`` (unbiased,
    over every reward seen for k, this group included) are merged into ``state``.
    ``A_new = (R - mu_new)/(sigma_new + eps)``, ``A_total = (R - mu_total)/(sigma_total + eps)``,
    ``SA_new = ((i-1)/i) A_new + (1/i) A_total``, ``SA_total = (1/i) A_new + ((i-1)/i) A_total``;
    the result per sample is whichever of SA_new / SA_total has the smaller absolute value (ties:
    SA_new). At i=1 both equal A_new. A group with identical rewards still gets (1/i) A_total.

    rewards [N], group_ids [N]; ``prompt_keys``: one str per sample (all samples of a group share
    it); default ``str(group id)``. Groups are visited in ascending id order.
    -> advantages [N]
    """
    state = DCPOState() if state is None else state
    rewards = as_float(rewards).detach()
    check_shapes("group_ids", group_ids, tuple(rewards.shape))
    if prompt_keys is not None and len(prompt_keys) != rewards.numel():
        raise ValueError(f"prompt_keys must have one key per sample ({rewards.numel()}), got {len(prompt_keys)}")
    inverse, num_groups = group_index(group_ids.to(rewards.device))
    ids = group_ids.tolist()
    values = rewards.tolist()
    out = [0.0] * len(values)
    for g in range(num_groups):
        members = (inverse == g).nonzero().flatten().tolist()
        key = str(prompt_keys[members[0]]) if prompt_keys is not None else str(ids[members[0]])
        group = [values[j] for j in members]
        new = RunningStat()
        new.merge(group)
        total = state.stats.setdefault(key, RunningStat())
        total.merge(group)
        i = total.visits
        for j in members:
            a_new = (values[j] - new.mean) / (new.std + eps)
            a_tot = (values[j] - total.mean) / (total.std + eps)
            sa_new = ((i - 1) / i) * a_new + (1 / i) * a_tot
            sa_tot = (1 / i) * a_new + ((i - 1) / i) * a_tot
            out[j] = sa_new if abs(sa_new) <= abs(sa_tot) else sa_tot
    return torch.tensor(out, dtype=rewards.dtype, device=rewards.device)


dcpo_sas.state_cls = DCPOState


# --------------------------------------------------------------------------- rank_ema
@dataclass
class RankEMAState:
    """EMA of the batch-mean reward and of its squared deviation (FAKER-Air ``grpo_train.py``)."""

    mean: float = 0.0
    var: float = 1e-6
    steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "steps": self.steps}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.mean, self.var, self.steps = float(d["mean"]), float(d["var"]), int(d["steps"])


def centered_rank(x: Tensor, ties: str = "average") -> Tensor:
    """Ranks of x [n] mapped to [-1, 1]: ``2 (rank / (n - 1) - 0.5)``; 0 for n = 1.

    ``ties="average"`` gives tied values their mean rank (an all-equal group maps to 0);
    ``ties="order"`` breaks ties by position (FAKER-Air's double argsort, made stable).
    """
    n = x.numel()
    if n < 2:
        return torch.zeros_like(x)
    if ties == "average":
        # mean rank of equal values = (#smaller) + (#equal - 1) / 2
        less = (x[None, :] < x[:, None]).sum(1).to(x.dtype)
        equal = (x[None, :] == x[:, None]).sum(1).to(x.dtype)
        ranks = less + (equal - 1) / 2
    elif ties == "order":
        ranks = torch.argsort(torch.argsort(x, stable=True), stable=True).to(x.dtype)
    else:
        raise UnknownNameError(f"Unknown rank_ema ties mode '{ties}'. Valid names: average, order.")
    return 2.0 * (ranks / (n - 1) - 0.5)


@ADVANTAGES.register("rank_ema")
def rank_ema(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    state: RankEMAState | None = None,
    coeff: float = 0.5,
    alpha: float = 0.05,
    ties: str = "average",
) -> Tensor:
    """FAKER-Air advantage: ``A = (1-c) centered_rank_g(R) + c (R - m) / (sqrt(v) + 1e-6)``.

    Once per call, with ``Rbar`` = mean of all N rewards: ``m <- (1-alpha) m + alpha Rbar``,
    ``v <- (1-alpha) v + alpha (Rbar - m)^2`` (m already updated), initial m=0, v=1e-6, as the
    code; the EMA term uses the updated m, v. ``centered_rank`` is taken within each group
    (see :func:`centered_rank`; c=0.5, alpha=0.05 defaults).

    rewards [N], group_ids [N] -> advantages [N]
    """
    state = RankEMAState() if state is None else state
    rewards = as_float(rewards).detach()
    check_shapes("group_ids", group_ids, tuple(rewards.shape))
    inverse, num_groups = group_index(group_ids.to(rewards.device))
    rank = torch.zeros_like(rewards)
    for g in range(num_groups):
        idx = (inverse == g).nonzero().flatten()
        rank[idx] = centered_rank(rewards[idx], ties=ties)
    batch_mean = float(rewards.mean())
    state.mean = (1.0 - alpha) * state.mean + alpha * batch_mean
    diff = batch_mean - state.mean
    state.var = (1.0 - alpha) * state.var + alpha * diff * diff
    state.steps += 1
    a_ema = (rewards - state.mean) / (math.sqrt(state.var) + 1e-6)
    return (1.0 - coeff) * rank + coeff * a_ema


rank_ema.state_cls = RankEMAState
