"""Mode-aware advantages for hybrid think-on / think-off policies: HiPO (Deng et al., arXiv 2509.23967).

The paper (abstract and model card) states the structure only: a hybrid reward with a *bias adjustment*
that keeps the policy from over-using think-on, and *mode-aware advantages* (one for the mode/judge
segment, one for the answer). The formulas in :func:`hipo` are an [UNVERIFIED] design that follows that
structure; they are not the paper's equations. Registered in ``ADVANTAGES`` as ``hipo``. See
``docs/algorithms.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpo.core._tensor import check_shapes, group_mean_std, group_sum
from mmpo.core.advantages import ADVANTAGES, _prepare, _stateless
from mmpo.errors import ConfigError

_STD_MODES = ("pop", "unb")
_STD_FLOOR = 1e-6


def _zscore(values: Tensor, mean: Tensor, sd: Tensor, eps: float) -> Tensor:
    """``(values - mean) / (sd + eps)``, 0 where ``sd`` is undefined (NaN) or below 1e-6."""
    ok = sd >= _STD_FLOOR
    return torch.where(ok, (values - mean) / torch.where(ok, sd + eps, torch.ones_like(sd)), torch.zeros_like(sd))


@ADVANTAGES.register("hipo")
@_stateless
def hipo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    mode: Tensor,
    segment_mask: Tensor,
    mask: Tensor,
    omega: float = 0.1,
    eps: float = 1e-6,
    std: str = "pop",
) -> Tensor:
    """HiPO mode-aware advantage (arXiv 2509.23967 gives the structure; these formulas are an [UNVERIFIED] design).

    Per group, with ``mode`` 1 = think-on, 0 = think-off and ``Rbar_on`` / ``Rbar_off`` the mode means of
    the raw rewards:

    1. Bias adjustment: ``r'_i = r_i + b * 1[mode_i = off and r_i > 0]``, ``b = omega * max(Rbar_on, Rbar_off)``
       (a correct think-off answer earns slightly more, so think-on must pay for its cost).
    2. Mode advantage, on ``segment_mask`` tokens (the mode/judge segment):
       ``A^mode_i = (Rbar'_{mode_i} - Rbar'_group) / (std'_group + eps)``.
    3. Answer advantage, on the other valid tokens: within-mode z-score
       ``A^ans_i = (r'_i - Rbar'_{mode_i}) / (std'_{mode_i} + eps)``.

    Any z-score whose std is below 1e-6 (or undefined: one sample with ``std="unb"``) is 0. A group with a
    single mode gets no bias (b only compares modes), so ``A^mode = 0`` and ``A^ans`` is plain GRPO of r
    with this std and eps. ``omega`` default 0.1, ``std`` default ``"pop"`` and ``eps`` default 1e-6 are
    design defaults (the reference values in the tests use ``eps=0``). Segment cells outside ``mask`` are 0.

    rewards [N], group_ids [N], mode [N] long {0, 1}, segment_mask [N, T] bool, mask [N, T] bool
    -> advantages [N, T] (0 on masked cells)
    """
    if std not in _STD_MODES:
        raise ConfigError(f"std must be one of 'pop', 'unb', got {std!r}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ConfigError(f"eps must be a number >= 0, got {eps!r}")
    if not isinstance(omega, (int, float)) or omega < 0:
        raise ConfigError(f"omega must be a number >= 0, got {omega!r}")
    rewards, inv, g = _prepare(rewards, group_ids)
    check_shapes("mode", mode, tuple(rewards.shape))
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [N, T], got shape {tuple(mask.shape)}")
    check_shapes("mask", mask, (rewards.shape[0], mask.shape[1]))
    check_shapes("segment_mask", segment_mask, tuple(mask.shape))
    mode = mode.to(rewards.device)
    if mode.numel() and not bool(((mode == 0) | (mode == 1)).all()):
        raise ValueError(f"mode must hold 1 (think-on) or 0 (think-off), got values {sorted(set(mode.tolist()))}")
    on = mode.bool()
    m = mask.to(rewards.device).bool()
    seg = segment_mask.to(rewards.device).bool() & m
    unbiased = std == "unb"
    r = rewards.to(torch.float64)

    n_on = group_sum(on.to(torch.float64), inv, g)
    n_off = group_sum((~on).to(torch.float64), inv, g)
    both = (n_on > 0) & (n_off > 0)
    mean_on = group_sum(torch.where(on, r, torch.zeros_like(r)), inv, g) / n_on.clamp_min(1)
    mean_off = group_sum(torch.where(on, torch.zeros_like(r), r), inv, g) / n_off.clamp_min(1)
    bias = torch.where(both, omega * torch.maximum(mean_on, mean_off), torch.zeros_like(mean_on))
    r_adj = r + bias[inv] * ((~on) & (r > 0)).to(torch.float64)

    g_mean, g_std, _ = group_mean_std(r_adj, inv, g, unbiased=unbiased)
    # one z-score set per (group, mode)
    sub = inv * 2 + on.long()
    s_mean, s_std, _ = group_mean_std(r_adj, sub, 2 * g, unbiased=unbiased)
    a_mode = _zscore(s_mean[sub], g_mean[inv], g_std[inv], eps)
    a_mode = torch.where(both[inv], a_mode, torch.zeros_like(a_mode))
    a_ans = _zscore(r_adj, s_mean[sub], s_std[sub], eps)
    adv = torch.where(seg, a_mode[:, None], a_ans[:, None].expand_as(seg))
    return torch.where(m, adv, torch.zeros_like(adv)).to(rewards.dtype)


hipo.inputs = ("mode", "segment_mask", "mask")
