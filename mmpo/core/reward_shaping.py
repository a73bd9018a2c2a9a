"""Group-conditional reward shaping, registered in ``GROUP_FILTERS`` next to DAPO's
``soft_overlong_punishment``: ``conciser_length`` (ConciseR's L-GRPO stage, arXiv 2505.21178).
See ``docs/algorithms.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, group_index, group_sum
from mmpo.core.sampling import GROUP_FILTERS
from mmpo.errors import ConfigError


@GROUP_FILTERS.register("conciser_length")
def conciser_length(
    rewards: Tensor,
    lengths: Tensor,
    group_ids: Tensor,
    *,
    step: int,
    start_step: int,
    max_len: float,
    alpha: float = 1.0,
    r_thr: float = 0.0,
) -> Tensor:
    """ConciseR L-GRPO length reward (arXiv 2505.21178): shaped rewards to use instead of ``rewards``.

    From ``step >= start_step`` (stage 2; earlier steps are stage 1, GRPO++, and return the rewards
    unchanged), in a group where **every** reward is ``> r_thr`` (all rollouts correct, the
    paper's gate), ``r_i = 1 + alpha * (1 - L_i / max_len)``: shorter correct answers earn more.
    Other groups keep their rewards. The bonus formula and ``alpha`` = 1 are [UNVERIFIED] design
    choices; the gate and the two stages are the paper's. Lengths above ``max_len`` count as
    ``max_len`` (bonus 0), so the shaped reward stays in ``[1, 1 + alpha]``.

    With a std-normalised GRPO, alpha cancels inside an all-correct group. In stage 2 a dynamic
    sampling filter must keep all-correct groups unless their lengths (and so rewards) are equal.

    rewards [N], lengths [N] (valid units per row), group_ids [N] -> shaped rewards [N]
    """
    if int(start_step) != start_step or start_step < 0:
        raise ConfigError(f"conciser_length: start_step must be an integer >= 0, got {start_step!r}")
    if not (math.isfinite(max_len) and max_len > 0):
        raise ConfigError(f"conciser_length: max_len must be a finite number > 0, got {max_len!r}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ConfigError(f"conciser_length: alpha must be a finite number >= 0, got {alpha!r}")
    rewards = as_float(rewards).detach()
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    check_shapes("lengths", lengths, tuple(rewards.shape))
    check_shapes("group_ids", group_ids, tuple(rewards.shape))
    if step < start_step:
        return rewards.clone()
    lens = as_float(lengths).detach().to(device=rewards.device, dtype=rewards.dtype)
    if bool((lens < 0).any()) or not bool(torch.isfinite(lens).all()):
        raise ValueError("conciser_length: lengths must be finite and >= 0")
    inv, g = group_index(group_ids.to(rewards.device))
    wrong = group_sum((~(rewards > r_thr)).to(rewards.dtype), inv, g)
    all_correct = (wrong == 0)[inv]
    bonus = 1.0 + alpha * (1.0 - lens.clamp(max=max_len) / max_len)
    return torch.where(all_correct, bonus, rewards)


conciser_length.state_cls = None

__all__ = ["conciser_length"]
