"""Advantage estimators driven by an external signal, registered in ``ADVANTAGES``:
``spectral_po`` (AI-judge partial credit for all-negative groups, arXiv 2505.11595) and
``grpo_scaling`` / ``dr_irl_scaling`` (difficulty-scaled GRPO of DR-IRL, arXiv 2503.18991).

The judge scores, demonstration rewards and data hardness are computed outside the tensor core;
these functions take them as per-row tensors. See ``docs/algorithms.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, group_index, group_mean_std, group_sum
from mmpo.core.advantages import ADVANTAGES, _prepare
from mmpo.errors import ConfigError


def _std_mode(fn_name: str, std: str) -> bool:
    """``True`` for unbiased std; ConfigError for anything but ``pop`` / ``unb``."""
    if std not in ("pop", "unb"):
        raise ConfigError(f"{fn_name}: std must be 'pop' or 'unb', got {std!r}")
    return std == "unb"


def _group_zscore(rewards: Tensor, inv: Tensor, g: int, *, unbiased: bool, eps: float, norm_by_std: bool) -> Tensor:
    """``(r - mean_g r) / (std_g r + eps)`` (or ``r - mean_g r``); a one-sample group uses mean 0,
    std 1 as verl's GRPO does. -> [N]"""
    mean, std, count = group_mean_std(rewards, inv, g, unbiased=unbiased)
    single = count < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    centered = rewards - mean[inv]
    return centered / (std[inv] + eps) if norm_by_std else centered


# --------------------------------------------------------------------------- spectral_po
def all_negative_groups(rewards: Tensor, group_ids: Tensor, r_thr: float = 0.0) -> Tensor:
    """Rows whose group has no correct response (every ``r <= r_thr``): the rows to send to the judge.

    rewards [N], group_ids [N] -> [N] bool
    """
    rewards = as_float(rewards).detach()
    check_shapes("group_ids", group_ids, tuple(rewards.shape))
    inv, g = group_index(group_ids.to(rewards.device))
    positives = group_sum((rewards > r_thr).to(rewards.dtype), inv, g)
    return (positives == 0)[inv]


@ADVANTAGES.register("spectral_po")
def spectral_po(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    judge_scores: Tensor,
    kappa: float = 0.5,
    r_thr: float = 0.0,
    base: str = "grpo",
    eps: float = 1e-6,
    std: str = "unb",
) -> Tensor:
    """Spectral Policy Optimization: judge partial credit for all-negative groups (arXiv 2505.11595).

    In a group where every ``r_i <= r_thr`` (see :func:`all_negative_groups`), ``r_i <- kappa *
    judge_i``; a NaN judge score keeps the original reward, and other groups are untouched. Then
    the base estimator: ``grpo`` ``(r - mean_g r) / (std_g r + eps)`` with ``std`` ``unb`` (n-1,
    verl) or ``pop`` (n), or ``drgrpo`` ``r - mean_g r``; a one-sample group uses mean 0, std 1.
    The trigger (all-negative groups, AI feedback) is the paper's; the rewrite ``kappa * judge``
    and ``kappa`` = 0.5 are [UNVERIFIED] design choices. With a z-score base, kappa cancels
    inside a judged group.

    rewards [N], group_ids [N], judge_scores [N] in [0, 1] (NaN = not judged) -> advantages [N]
    """
    unbiased = _std_mode("spectral_po", std)
    if base not in ("grpo", "drgrpo"):
        raise ConfigError(f"spectral_po: base must be 'grpo' or 'drgrpo', got {base!r}")
    if not (math.isfinite(kappa) and kappa > 0):
        raise ConfigError(f"spectral_po: kappa must be a finite number > 0, got {kappa!r}")
    rewards, inv, g = _prepare(rewards, group_ids)
    check_shapes("judge_scores", judge_scores, tuple(rewards.shape))
    judge = as_float(judge_scores).detach().to(device=rewards.device, dtype=rewards.dtype)
    judged = ~torch.isnan(judge)
    if bool(((judge < 0) | (judge > 1))[judged].any()):
        raise ValueError("spectral_po: judge_scores must lie in [0, 1] (NaN = not judged)")
    use = all_negative_groups(rewards, group_ids.to(rewards.device), r_thr) & judged
    shaped = torch.where(use, kappa * torch.nan_to_num(judge), rewards)
    return _group_zscore(shaped, inv, g, unbiased=unbiased, eps=eps, norm_by_std=base == "grpo")


spectral_po.state_cls = None
spectral_po.inputs = ("judge_scores",)


# --------------------------------------------------------------------------- grpo_scaling
@ADVANTAGES.register("grpo_scaling", "dr_irl_scaling")
def grpo_scaling(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    data_hardness: Tensor,
    demo_reward: Tensor,
    lambda_d: float = 1.0,
    lambda_m: float = 1.0,
    scale_min: float = 1.0,
    scale_max: float = 3.0,
    std: str = "pop",
    eps: float = 1e-6,
) -> Tensor:
    """Difficulty-scaled GRPO advantages (after DR-IRL's GRPO-S, arXiv 2503.18991).

    **[UNVERIFIED] design.** Only the abstract was available: rewards are scaled by task
    difficulty from data-level hardness (text-encoder similarity) and model-level responsiveness
    (reward gaps). The formulas and defaults below are this library's choices, not the paper's:

    ``A_i = s * (r_i - mean_g r) / (std_g r + eps)`` (``std`` ``pop`` or ``unb``; a one-sample
    group uses mean 0, std 1), with ``s = clamp(1 + lambda_d h_d + lambda_m h_m, scale_min,
    scale_max)``, ``h_d`` = ``data_hardness`` of the row and
    ``h_m = clamp((demo_reward - mean_g r) / (|demo_reward| + 1e-6), 0, 1)``. A row without a
    demonstration (``demo_reward`` NaN) gets ``h_d = h_m = 0``; a NaN hardness counts as 0.
    The scale multiplies the *advantages*: scaling a group's rewards by a constant before the
    z-score would cancel.

    rewards [N], group_ids [N], data_hardness [N] in [0, 1], demo_reward [N] (NaN = none; both
    the same for every row of a prompt) -> advantages [N]
    """
    unbiased = _std_mode("grpo_scaling", std)
    for name, value in (("lambda_d", lambda_d), ("lambda_m", lambda_m)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"grpo_scaling: {name} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(scale_min) and math.isfinite(scale_max) and 0 <= scale_min <= scale_max):
        raise ConfigError(f"grpo_scaling: need 0 <= scale_min <= scale_max, got {scale_min!r}, {scale_max!r}")
    rewards, inv, g = _prepare(rewards, group_ids)
    check_shapes("data_hardness", data_hardness, tuple(rewards.shape))
    check_shapes("demo_reward", demo_reward, tuple(rewards.shape))
    h_d = as_float(data_hardness).detach().to(device=rewards.device, dtype=rewards.dtype)
    demo = as_float(demo_reward).detach().to(device=rewards.device, dtype=rewards.dtype)
    if bool(((h_d < 0) | (h_d > 1)).any()):
        raise ValueError("grpo_scaling: data_hardness must lie in [0, 1] (NaN = unknown)")
    has_demo = ~torch.isnan(demo)
    h_d = torch.where(has_demo, torch.nan_to_num(h_d), torch.zeros_like(h_d))
    mean, _, _ = group_mean_std(rewards, inv, g)
    gap = (demo - mean[inv]) / (demo.abs() + 1e-6)
    h_m = torch.where(has_demo, torch.nan_to_num(gap).clamp(0.0, 1.0), torch.zeros_like(gap))
    scale = (1.0 + lambda_d * h_d + lambda_m * h_m).clamp(scale_min, scale_max)
    return scale * _group_zscore(rewards, inv, g, unbiased=unbiased, eps=eps, norm_by_std=True)


grpo_scaling.state_cls = None
grpo_scaling.inputs = ("data_hardness", "demo_reward")

__all__ = ["all_negative_groups", "grpo_scaling", "spectral_po"]
