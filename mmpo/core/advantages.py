"""Group-relative advantage estimators, registered in ``ADVANTAGES`` (GRPO: DeepSeekMath arXiv
2402.03300; Dr. GRPO 2503.20783; RLOO as in RIPT-VLA 2505.17016; BNPO 2506.02864; DCPO 2509.02333).

Every entry has the signature ``fn(rewards [N], group_ids [N], **options) -> advantages [N]``
(float). ``group_ids`` is a LongTensor of arbitrary ids (not necessarily contiguous or sorted);
samples with the same id form one group (the G rollouts of one prompt). Advantages are per
sequence; the loss broadcasts them over tokens.

Stateless entries have ``state_cls = None``. The stateful ones (``dcpo_sas``, ``rank_ema``) live
in :mod:`mmpo.core.stateful_advantages` and are registered here too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, group_index, group_mean_std, group_sum
from mmpo.core.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")


def _prepare(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, int]:
    rewards = as_float(rewards).detach()
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    check_shapes("group_ids", group_ids, tuple(rewards.shape))
    inverse, num_groups = group_index(group_ids.to(rewards.device))
    return rewards, inverse, num_groups


def _stateless(fn):
    fn.state_cls = None
    return fn


@ADVANTAGES.register("grpo")
@_stateless
def grpo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, norm_by_std: bool = True) -> Tensor:
    """GRPO outcome advantage, as verl ``compute_grpo_outcome_advantage``.

    ``A_i = (R_i - mean_g R) / (std_g R + eps)``, std **unbiased** (``torch.std``, n-1), eps 1e-6.
    ``norm_by_std=False`` gives ``A_i = R_i - mean_g R`` (Dr. GRPO). A group of one sample uses
    mean 0 and std 1 as verl does (so ``A = R / (1 + eps)``, or ``R`` without std).

    rewards [N], group_ids [N] -> advantages [N]
    """
    rewards, inv, g = _prepare(rewards, group_ids)
    mean, std, count = group_mean_std(rewards, inv, g, unbiased=True)
    single = count < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    centered = rewards - mean[inv]
    return centered / (std[inv] + eps) if norm_by_std else centered


@ADVANTAGES.register("drgrpo")
@_stateless
def drgrpo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO: ``A_i = R_i - mean_g R`` (no std). Singleton groups keep R (verl's mean 0).

    rewards [N], group_ids [N] -> advantages [N]
    """
    return grpo(rewards, group_ids, norm_by_std=False)


@ADVANTAGES.register("batch_std")
@_stateless
def batch_std(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-4) -> Tensor:
    """Group mean, batch std (TRL ``scale_rewards="batch"``, Lite-PPO).

    ``A_i = (R_i - mean_g R) / (std_batch R + eps)`` with the **unbiased** std of all N rewards
    and eps 1e-4, as TRL's ``rewards.std()`` / ``+ 1e-4``.

    rewards [N], group_ids [N] -> advantages [N]
    """
    rewards, inv, g = _prepare(rewards, group_ids)
    mean, _, _ = group_mean_std(rewards, inv, g)
    std = rewards.std() if rewards.numel() > 1 else rewards.new_tensor(0.0)
    return (rewards - mean[inv]) / (std + eps)


@ADVANTAGES.register("global_std")
@_stateless
def global_std(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-4, adv_clip_max: float = 5.0) -> Tensor:
    """Flow-GRPO per-prompt tracker with ``global_std=True``, then clipping.

    ``A_i = clip((R_i - mean_g R) / (std_all R + eps), -adv_clip_max, adv_clip_max)``. The std is
    over all N rewards and **biased** (``np.std``, divide by N), as ``flow_grpo/stat_tracking.py``;
    eps 1e-4, ``adv_clip_max`` 5 (``train.adv_clip_max``).

    rewards [N], group_ids [N] -> advantages [N]
    """
    rewards, inv, g = _prepare(rewards, group_ids)
    mean, _, _ = group_mean_std(rewards, inv, g)
    std = rewards.std(unbiased=False)
    adv = (rewards - mean[inv]) / (std + eps)
    return adv.clamp(-adv_clip_max, adv_clip_max)


@ADVANTAGES.register("rloo")
@_stateless
def rloo(rewards: Tensor, group_ids: Tensor, *, rloo_over_all_rollouts: bool = False) -> Tensor:
    """REINFORCE leave-one-out (RIPT-VLA ``rl_optimizer.py``).

    ``A_k = R_k - (sum_{j != k} R_j) / (K - 1)`` within each group; no std.
    ``rloo_over_all_rollouts=True`` pools all N rollouts into one group (ids ignored). A group of
    one sample has no leave-one-out baseline; its advantage is 0 (RIPT divides by zero there).

    rewards [N], group_ids [N] -> advantages [N]
    """
    rewards, inv, g = _prepare(rewards, group_ids)
    if rloo_over_all_rollouts:
        inv, g = torch.zeros_like(inv), 1
    total = group_sum(rewards, inv, g)[inv]
    count = group_sum(torch.ones_like(rewards), inv, g)[inv]
    baseline = (total - rewards) / (count - 1).clamp_min(1)
    return torch.where(count > 1, rewards - baseline, torch.zeros_like(rewards))


def _beta_log_pdf(p: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """log Beta(p; alpha, beta), with 0*log(0) = 0 at the edges (alpha or beta = 1)."""
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    return torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm


@ADVANTAGES.register("bnpo")
@_stateless
def bnpo(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    min_value: float = 0.0,
    max_value: float = 1.0,
    max_weight: float = 1e6,
    decompose: bool = False,
    components: Tensor | None = None,
    singleton: str = "zero",
) -> Tensor:
    """Beta-normalized advantage (BNPO, arXiv 2506.02864, ``recipe/bnpo/src/bnpo_ray_trainer.py``).

    Rewards are rescaled to [0, 1] with ``(R - min_value) / (max_value - min_value)``;
    ``p_q`` = group mean (0 for a one-sample group, as the code). Over the G group means:
    ``mu`` = mean, ``v`` = unbiased variance (mu=0, v=1 when G=1, as the code);
    ``a = (mu(1-mu)/v - 1) mu``, ``b = (mu(1-mu)/v - 1)(1-mu)``, ``alpha = max(1, 1+a/3)``,
    ``beta = max(1, 1+b/3)``; ``A = clamp(1/BetaPDF(p_q; alpha, beta), 0, max_weight) * (R - p_q)``.
    When v < 1e-8 (e.g. all groups have the same mean) the code divides by zero; here alpha=beta=1
    then (weight 1, plain REINFORCE with the group-mean baseline).

    ``singleton="zero"`` (default) gives A = 0 to the rows of a one-sample group. This deviates from
    the released code, where p = 0 there and the weight can reach ``max_weight`` (A up to 1e6 * R);
    ``singleton="code"`` reproduces that. Either way the group still enters the Beta fit with p = 0.

    ``decompose=True`` (the paper's advantage decomposition for multi-part rewards): ``components [N, M]``
    (each column one reward component, rescaled with the same min/max) is required and ``rewards`` is
    not used; each component gets its own BNPO advantage (its own p_q, mu, v, alpha, beta) and the M
    advantages are averaged.

    rewards [N], group_ids [N] (, components [N, M]) -> advantages [N]
    """
    from mmpo.errors import ConfigError

    if singleton not in ("code", "zero"):
        raise ConfigError(f"bnpo: singleton must be 'code' or 'zero', got {singleton!r}")
    rewards, inv, g = _prepare(rewards, group_ids)
    if decompose:
        if components is None:
            raise ConfigError("bnpo: decompose=True needs the 'components' input [N, M] (got components=None)")
        comps = as_float(components).detach().to(rewards.device)
        if comps.dim() != 2 or comps.shape[0] != rewards.shape[0] or comps.shape[1] < 1:
            raise ValueError(f"components must have shape [N={rewards.shape[0]}, M>=1], got {tuple(comps.shape)}")
        columns = list(comps.unbind(dim=1))
    else:
        columns = [rewards]
    out = []
    for column in columns:
        scores = (column - min_value) / (max_value - min_value)
        mean, _, count = group_mean_std(scores, inv, g)
        p = torch.where(count < 2, torch.zeros_like(mean), mean)
        if p.min() < 0 or p.max() > 1:
            raise ValueError(
                "bnpo: group mean rewards must lie in [0, 1] after rescaling; "
                f"set min_value/max_value (now {min_value}, {max_value})"
            )
        if g > 1:
            mu, var = p.mean(), p.var()
        else:
            mu, var = p.new_tensor(0.0), p.new_tensor(1.0)
        if float(var) >= 1e-8:
            k = mu * (1 - mu) / var - 1
            alpha = torch.clamp(1 + k * mu / 3, min=1.0)
            beta = torch.clamp(1 + k * (1 - mu) / 3, min=1.0)
        else:
            alpha = beta = p.new_tensor(1.0)
        pdf = torch.exp(_beta_log_pdf(p, alpha, beta))
        weight = torch.clamp(1.0 / pdf, min=0.0, max=max_weight)
        adv = weight[inv] * (scores - p[inv])
        if singleton == "zero":
            adv = torch.where(count[inv] < 2, torch.zeros_like(adv), adv)
        out.append(adv)
    return out[0] if len(out) == 1 else torch.stack(out).mean(dim=0)


bnpo.inputs = lambda opts: ("components",) if opts.get("decompose") else ()
bnpo.input_names = ("components",)  # every input it may read (the trainer passes, never the config)


@ADVANTAGES.register("flat_batch")
@_stateless
def flat_batch(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Whole-buffer normalization (ScreenExplorer ``compute_group_advantages``).

    ``A = (R - mean R) / std R`` over all N rewards, group ids ignored; std unbiased
    (``torch.std``) and replaced by 1 when it is 0 (or undefined for N=1), as the code.

    rewards [N], group_ids [N] -> advantages [N]
    """
    rewards, _, _ = _prepare(rewards, group_ids)
    std = rewards.std() if rewards.numel() > 1 else rewards.new_tensor(0.0)
    if not math.isfinite(float(std)) or float(std) <= 0:
        std = rewards.new_tensor(1.0)
    return (rewards - rewards.mean()) / std
