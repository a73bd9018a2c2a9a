"""HAPO, Heterogeneous Adaptive Policy Optimization (Liu et al., arXiv 2509.16591; code
starriver030515/HAPO, ``core_algos.py``). See ``docs/algorithms.md``.

Pieces (pure tensor functions; the trainers wire them):

- :func:`hapo_normalize`: the entropy normalisation ``h_hat`` in [-1, 1] and its 4-float state
  :class:`HapoEntropyStats` (pivot quantile of log-entropies, RMS around the pivot, one scale per sign);
- :func:`apply_hapo_stats` + :func:`adaptive_temperature`: adaptive temperature sampling
  ``T = T0 (1 + tau h_hat)`` with the previous step's statistics;
- ``ADVANTAGES["hapo_tlga"]``: token-level group average advantage (length-weighted group statistics,
  GRPO fallback);
- ``POLICY_LOSSES["hapo"]``: asymmetric adaptive clipping + differential advantage redistribution +
  dual clip.

``sign_mode``: the released code multiplies non-positive ``h`` by ``1/neg_min`` (a negative number), so
every token gets ``h_hat >= 0`` (``"released_code"``); ``"intended"`` (default) keeps the sign
(``h_hat = h / |neg_min|``), so low-entropy tokens get ``h_hat < 0``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, group_index, group_sum, masked_mean
from mmpo.core.advantages import ADVANTAGES, grpo
from mmpo.core.losses import (
    POLICY_LOSSES,
    _apply_dual_clip,
    _check_dual_clip,
    _clamped_log_ratio,
    _finish,
    _metrics,
    _prepare,
)
from mmpo.errors import ConfigError

SIGN_MODES = ("intended", "released_code")
_FLOOR = 1e-8


def _check_sign_mode(sign_mode: str) -> None:
    if sign_mode not in SIGN_MODES:
        raise ConfigError(f"hapo sign_mode must be one of {', '.join(SIGN_MODES)}, got {sign_mode!r}")


@dataclass
class HapoEntropyStats:
    """HAPO entropy-normalisation state (4 floats; checkpoint it: the sampler of the next step uses it).

    ``mu``: pivot of the log-entropies; ``s``: RMS of ``log H - mu`` (floored at 1e-4);
    ``scale_pos = 1 / pos_max`` (> 0); ``scale_neg = 1 / neg_min`` (< 0, as the code stores it);
    ``ready``: False until the first statistics exist (then the sampler uses the base temperature).
    """

    mu: float = 0.0
    s: float = 1.0
    scale_pos: float = 1.0
    scale_neg: float = -1.0
    ready: bool = False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.mu = float(d["mu"])
        self.s = float(d["s"])
        self.scale_pos = float(d["scale_pos"])
        self.scale_neg = float(d["scale_neg"])
        self.ready = bool(d["ready"])


def _map(h: Tensor, scale_pos: Tensor | float, scale_neg: Tensor | float, sign_mode: str) -> Tensor:
    """``h`` -> ``h_hat``: positive ``h`` times ``scale_pos``; non-positive times ``-scale_neg``
    (intended) or ``scale_neg`` (released code)."""
    neg = -scale_neg if sign_mode == "intended" else scale_neg
    return torch.where(h > 0, h * scale_pos, h * neg)


def hapo_normalize(
    entropy: Tensor, mask: Tensor | None = None, pivot: float = 0.8, sign_mode: str = "intended"
) -> tuple[Tensor, HapoEntropyStats]:
    """HAPO ``compute_entropy_h``: ``entropy [...]``, ``mask [...]`` -> ``(h_hat [...], stats)``.

    Over the valid set S (``mask``; all entries when None): ``l = log(max(H, 1e-8))``;
    ``mu`` = ``l`` sorted at index ``round(pivot (|S| - 1))`` (nearest, Python round-half-to-even;
    0 when S is empty); ``s = sqrt(max(sum_S (l - mu)^2 / max(|S|, 1), 1e-8))`` (RMS around the pivot,
    not a std); ``h = (l - mu) / s``; ``pos_max = max(h > 0 over S)`` floored at 1e-8,
    ``neg_min = min(h < 0 over S)`` capped at -1e-8; ``h_hat = h / pos_max`` for ``h > 0``, else
    ``h / |neg_min|`` (intended, range [-1, 1]) or ``h / neg_min`` (released_code, range [0, 1]).
    Cells outside ``mask`` are 0 in ``h_hat``. A single valid token gives ``h_hat = 0``.
    """
    _check_sign_mode(sign_mode)
    if not 0.0 <= pivot <= 1.0:
        raise ConfigError(f"hapo pivot (entropy_pivot) must be in [0, 1], got {pivot}")
    ent = as_float(entropy).detach().to(torch.float32)
    mask = torch.ones_like(ent, dtype=torch.bool) if mask is None else mask.to(ent.device).bool()
    check_shapes("mask", mask, tuple(ent.shape))
    ell = torch.log(ent.clamp_min(_FLOOR))
    valid = ell[mask]
    n = int(valid.numel())
    if n:
        mu = torch.sort(valid).values[round(pivot * (n - 1))]
        mu = torch.nan_to_num(mu, nan=0.0)
    else:
        mu = ell.new_tensor(0.0)
    d = ell - mu
    var = torch.where(mask, d * d, torch.zeros_like(d)).sum() / max(n, 1)
    s = var.clamp_min(_FLOOR).sqrt()
    h = d / s
    pos_max = torch.where(mask & (h > 0), h, torch.zeros_like(h)).max().clamp_min(_FLOOR) if n else h.new_tensor(_FLOOR)
    neg_min = (
        torch.where(mask & (h < 0), h, torch.zeros_like(h)).min().clamp_max(-_FLOOR) if n else h.new_tensor(-_FLOOR)
    )
    scale_pos, scale_neg = 1.0 / pos_max, 1.0 / neg_min
    h_hat = torch.where(mask, _map(h, scale_pos, scale_neg, sign_mode), torch.zeros_like(h))
    stats = HapoEntropyStats(float(mu), float(s), float(scale_pos), float(scale_neg), ready=True)
    return h_hat, stats


def apply_hapo_stats(entropy: Tensor, stats: HapoEntropyStats, sign_mode: str = "intended") -> Tensor:
    """Map new entropies with stored statistics (the sampler's h_hat): ``entropy [...] -> h_hat [...]``.

    ``h = (log(max(H, 1e-8)) - mu) / s``, mapped as :func:`hapo_normalize`, then clamped to [-1, 1].
    Before the first statistics (``stats.ready`` False) every ``h_hat`` is 0, i.e. base temperature.
    """
    _check_sign_mode(sign_mode)
    ent = as_float(entropy).detach().to(torch.float32)
    if not stats.ready:
        return torch.zeros_like(ent)
    h = (torch.log(ent.clamp_min(_FLOOR)) - stats.mu) / stats.s
    return _map(h, stats.scale_pos, stats.scale_neg, sign_mode).clamp(-1.0, 1.0)


def adaptive_temperature(h_hat: Tensor | float, t0: float = 1.0, tau: float = 0.05) -> Tensor | float:
    """HAPO adaptive sampling temperature ``T = t0 (1 + tau clamp(h_hat, -1, 1))``.

    ``h_hat`` is a tensor of any shape (-> same shape) or a float (-> float). Defaults: ``t0 = 1``,
    ``tau`` (``temperature_tau``) = 0.05 as the recipe.
    """
    if t0 <= 0:
        raise ConfigError(f"hapo base temperature t0 must be > 0, got {t0}")
    if isinstance(h_hat, Tensor):
        return t0 * (1.0 + tau * h_hat.to(torch.float32).clamp(-1.0, 1.0))
    return t0 * (1.0 + tau * min(max(float(h_hat), -1.0), 1.0))


@ADVANTAGES.register("hapo_tlga")
def hapo_tlga(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    lengths: Tensor,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    fallback: float | None = 5.0,
) -> Tensor:
    """HAPO token-level group average advantage (``compute_hapo_outcome_advantage``).

    Per group, every valid token carries its response's reward: ``mu_g = sum L_i r_i / sum L_i``,
    ``sigma_g = sqrt(sum L_i (r_i - mu_g)^2 / sum L_i)`` (population), ``A_i = (r_i - mu_g) /
    (sigma_g + eps)`` (``r_i - mu_g`` when ``norm_by_std`` is False). If any ``|A_i| >= fallback``
    in a group, the whole group takes verl GRPO advantages instead (unbiased std, ``eps``, singleton
    -> mean 0 std 1); ``fallback=None`` disables that. A group whose lengths are all 0 weights its
    rows equally (it has no token to train). An all-equal group gets A = 0.

    rewards [N], group_ids [N], lengths [N] (valid tokens per row) -> advantages [N]
    """
    rewards = as_float(rewards).detach().to(torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    check_shapes("group_ids", group_ids, tuple(rewards.shape))
    check_shapes("lengths", lengths, tuple(rewards.shape))
    if fallback is not None and fallback <= 0:
        raise ConfigError(f"hapo_tlga fallback must be > 0 or None, got {fallback}")
    weight = as_float(lengths).detach().to(device=rewards.device, dtype=torch.float32)
    if bool((weight < 0).any()):
        raise ValueError("hapo_tlga: lengths must be >= 0")
    inv, g = group_index(group_ids.to(rewards.device))
    total = group_sum(weight, inv, g)
    weight = torch.where(total[inv] > 0, weight, torch.ones_like(weight))
    total = group_sum(weight, inv, g)
    mean = group_sum(weight * rewards, inv, g) / total
    centered = rewards - mean[inv]
    var = group_sum(weight * centered**2, inv, g) / total
    adv = centered / (var.sqrt()[inv] + eps) if norm_by_std else centered
    if fallback is None:
        return adv
    big = group_sum((adv.abs() >= fallback).to(torch.float32), inv, g) > 0
    return torch.where(big[inv], grpo(rewards, group_ids, eps=eps, norm_by_std=norm_by_std), adv)


hapo_tlga.inputs = ("lengths",)
hapo_tlga.state_cls = None


def hapo_loss_from_h(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    h_hat: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_alpha: float = 1.0,
    adv_beta: float = 1.0,
    dual_clip: float | None = 10.0,
    adaptive_clip: bool = True,
    adaptive_advantage: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """The HAPO clipped loss for a given ``h_hat [N, T]`` -> ``(loss [N, T], metrics)``.

    ``adaptive_clip``: ``eps_low(t) = eps_low (1 - alpha_c h_hat)`` where ``h_hat <= 0``,
    ``eps_high(t) = eps_high (1 + alpha_c h_hat)`` where ``h_hat > 0`` (else the base values).
    ``adaptive_advantage``: ``A_ent = A (1 + beta h_hat)``; neutral zone ``Z = (1 - eps_low(t)/2,
    1 + eps_high(t)/2)`` (open); ``h_hat > 0``: ``A`` inside Z, ``A_ent`` outside; ``h_hat <= 0``:
    ``A_ent`` inside Z, ``A`` outside. Then ``L = max(-A r, -A clip(r, 1 - eps_low(t), 1 + eps_high(t)))``
    and, for A < 0, ``L = min(L, -A dual_clip)`` (None disables). ``r = exp(logp - logp_old)``, log-ratio
    clamped to +-20. Metrics add ``redistributed_frac`` (tokens using ``A_ent``), ``h_hat_mean``,
    ``eps_low_mean``, ``eps_high_mean``.
    """
    _check_dual_clip(dual_clip)
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    check_shapes("h_hat", h_hat, tuple(logp.shape))
    h = torch.where(mask, h_hat.detach().to(device=logp.device, dtype=torch.float32), torch.zeros_like(logp))
    log_ratio = _clamped_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)
    lo_eps = torch.full_like(h, eps_low)
    hi_eps = torch.full_like(h, eps_high)
    if adaptive_clip:
        lo_eps = torch.where(h <= 0, eps_low * (1 - clip_alpha * h), lo_eps)
        hi_eps = torch.where(h > 0, eps_high * (1 + clip_alpha * h), hi_eps)
    redistributed = torch.zeros_like(mask)
    if adaptive_advantage:
        r = ratio.detach()
        in_zone = (r > 1 - lo_eps / 2) & (r < 1 + hi_eps / 2)
        redistributed = torch.where(h > 0, ~in_zone, in_zone) & mask
        adv = torch.where(redistributed, adv * (1 + adv_beta * h), adv)
    lower, upper = 1 - lo_eps, 1 + hi_eps
    loss = torch.maximum(-adv * ratio, -adv * torch.minimum(torch.maximum(ratio, lower), upper))
    low = (adv < 0) & (ratio < lower)
    high = (adv > 0) & (ratio > upper)
    loss, dual = _apply_dual_clip(loss, adv, ratio, mask, dual_clip)
    metrics = _metrics(ratio, log_ratio, mask, clip_frac_low=low, clip_frac_high=high, dual_clip_frac=dual)
    metrics.update(
        redistributed_frac=float(masked_mean(redistributed.float(), mask)),
        h_hat_mean=float(masked_mean(h, mask)),
        eps_low_mean=float(masked_mean(lo_eps, mask)),
        eps_high_mean=float(masked_mean(hi_eps, mask)),
    )
    return _finish(loss, mask), metrics


@POLICY_LOSSES.register("hapo")
def hapo(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    entropy: Tensor,
    pivot: float = 0.8,
    sign_mode: str = "intended",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_alpha: float = 1.0,
    adv_beta: float = 1.0,
    dual_clip: float | None = 10.0,
    adaptive_clip: bool = True,
    adaptive_advantage: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """HAPO policy loss (arXiv 2509.16591, ``compute_policy_loss``) -> ``(loss [N, T], metrics)``.

    ``h_hat = hapo_normalize(entropy, mask, pivot, sign_mode)`` from the **current** forward's
    entropies ``[N, T]`` of the tokens passed in, then :func:`hapo_loss_from_h`. As in the released code
    the statistics are those of this micro-batch, so they depend on how the batch is split.
    Defaults follow the recipe (``clip_ratio_c = 10``); see :func:`hapo_loss_from_h`.
    """
    h_hat, _ = hapo_normalize(entropy, mask, pivot, sign_mode)
    return hapo_loss_from_h(
        logp,
        logp_old,
        advantages,
        mask,
        h_hat,
        eps_low=eps_low,
        eps_high=eps_high,
        clip_alpha=clip_alpha,
        adv_beta=adv_beta,
        dual_clip=dual_clip,
        adaptive_clip=adaptive_clip,
        adaptive_advantage=adaptive_advantage,
    )


hapo.inputs = ("entropy",)
hapo.state_cls = None

__all__ = [
    "HapoEntropyStats",
    "adaptive_temperature",
    "apply_hapo_stats",
    "hapo",
    "hapo_loss_from_h",
    "hapo_normalize",
    "hapo_tlga",
]
