"""KL estimators (J. Schulman, "Approximating KL Divergence"; verl ``kl_penalty_forward`` / ``kl_penalty``).

Token estimators: ``KL_ESTIMATORS.get(name)(logp [N, T], logp_ref [N, T]) -> [N, T]`` with
``d = logp - logp_ref``. They do not mask; aggregate with the response mask. ``logp_ref`` is a
constant (detached). ``gaussian`` has its own signature (see :func:`gaussian_kl`).
Schedules for the coefficient beta live in :mod:`mmpo.core.schedules`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mmpo.core.registry import Registry

KL_ESTIMATORS: Registry[Callable[..., Tensor]] = Registry("KL estimator")


def _diff(logp: Tensor, logp_ref: Tensor) -> Tensor:
    if logp.shape != logp_ref.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_ref {tuple(logp_ref.shape)} must match")
    return logp.float() - logp_ref.detach().float()


@KL_ESTIMATORS.register("k1", "kl")
def k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """``d``: unbiased value of KL(pi||ref) under samples of pi; its gradient is not the KL's."""
    return _diff(logp, logp_ref)


@KL_ESTIMATORS.register("abs")
def abs_kl(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """``|d|``."""
    return _diff(logp, logp_ref).abs()


@KL_ESTIMATORS.register("k2", "mse")
def k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """``0.5 d^2``; its gradient ``d * grad logp`` is the reverse-KL gradient."""
    return 0.5 * _diff(logp, logp_ref).square()


@KL_ESTIMATORS.register("k3", "low_var_kl")
def k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """``exp(-d) + d - 1`` with ``-d`` clamped to [-20, 20] and the result to [-10, 10] (verl)."""
    neg = (-_diff(logp, logp_ref)).clamp(-20.0, 20.0)
    return (torch.exp(neg) - neg - 1).clamp(-10.0, 10.0)


def _straight_through(forward: Tensor, logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Value of ``forward``, gradient of k2."""
    backward = k2(logp, logp_ref)
    return backward - backward.detach() + forward.detach()


@KL_ESTIMATORS.register("k1+", "kl+")
def k1_plus(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Straight-through: value of k1, gradient of k2 (``d * grad logp``)."""
    return _straight_through(k1(logp, logp_ref), logp, logp_ref)


@KL_ESTIMATORS.register("k3+", "low_var_kl+")
def k3_plus(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Straight-through: value of k3, gradient of k2 (``d * grad logp``)."""
    return _straight_through(k3(logp, logp_ref), logp, logp_ref)


@KL_ESTIMATORS.register("gaussian")
def gaussian_kl(mean: Tensor, mean_ref: Tensor, sigma: float | Tensor) -> Tensor:
    """Closed-form KL between Gaussians with a shared std: ``(mean - mean_ref)^2 / (2 sigma^2)``.

    ``mean``, ``mean_ref`` [N, T, *D]; ``sigma`` a float or a tensor broadcastable to
    ``mean`` (e.g. [N, T, 1, ...] per step) or to [N, T]. The squared error is **averaged** over
    the trailing dims D (as Flow-GRPO's ``.mean(dim=(1, 2, 3)) / (2 std^2)``) -> [N, T].
    With no trailing dims the result is elementwise.
    """
    if mean.shape != mean_ref.shape or mean.dim() < 2:
        raise ValueError(f"mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must match and be [N, T, ...]")
    sq = (mean.float() - mean_ref.detach().float()).square()
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=mean.device)
    if sigma_t.dim() > 2:
        per = sq / (2 * sigma_t.square())
        return per.flatten(2).mean(-1) if per.dim() > 2 else per
    per_step = sq.flatten(2).mean(-1) if sq.dim() > 2 else sq
    return per_step / (2 * sigma_t.square())


gaussian_kl.signature = "(mean [N, T, *D], mean_ref [N, T, *D], sigma) -> [N, T]"


def kl_to_reward(rewards: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """KL subtracted from the reward: ``rewards [N] - beta * sum_t mask * kl [N, T]`` -> [N].

    Used for the ``kl_in_reward`` placement (before the advantage estimator).
    """
    if kl.shape != mask.shape or kl.shape[0] != rewards.shape[0]:
        raise ValueError(f"rewards {tuple(rewards.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)} do not fit")
    per_seq = torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum(-1)
    return rewards - beta * per_seq
