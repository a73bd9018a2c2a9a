"""Per-token policy losses, registered in ``POLICY_LOSSES`` (PPO clip as in GRPO, DAPO arXiv 2503.14476,
GSPO 2507.18071, DCPO 2509.02333, CE-GPPO 2509.20712, ASPO 2510.06062).

Every entry: ``fn(logp [N, T], logp_old [N, T], advantages [N] or [N, T], mask [N, T] bool,
**options) -> (loss_matrix [N, T], metrics: dict[str, float])``.

``logp`` carries the gradient; ``logp_old`` and ``advantages`` are treated as constants. Cells
where ``mask`` is false are exactly 0 in ``loss_matrix`` and get no gradient. The math runs in
float32. Reduce the matrix with :func:`mmpo.core.aggregate`.

Metrics (fractions over valid tokens): ``clip_frac`` (value clipped by any rule),
``clip_frac_low`` / ``clip_frac_high`` (lower/upper ratio bound active), ``dual_clip_frac``,
``ratio_mean``, ``ratio_max``, ``ppo_kl`` (mean of ``logp_old - logp``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mmpo.core._tensor import masked_mean
from mmpo.core.registry import Registry
from mmpo.errors import ConfigError, UnknownNameError

PolicyLoss = Callable[..., tuple[Tensor, dict[str, float]]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")

LOG_RATIO_CLAMP = 20.0


def _prepare(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate shapes, cast to float32, broadcast advantages, zero the masked cells."""
    if logp.dim() != 2 or logp.shape != logp_old.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)} and mask "
            f"{tuple(mask.shape)} must all be [N, T]"
        )
    mask = mask.bool()
    adv = advantages.detach().to(torch.float32)
    if adv.dim() == 1 and adv.shape[0] == logp.shape[0]:
        adv = adv[:, None].expand(logp.shape)
    elif adv.shape != logp.shape:
        raise ValueError(f"advantages must be [N] or [N, T] = {tuple(logp.shape)}, got {tuple(adv.shape)}")
    zeros = torch.zeros(logp.shape, dtype=torch.float32, device=logp.device)
    logp = torch.where(mask, logp.to(torch.float32), zeros)
    old = torch.where(mask, logp_old.detach().to(torch.float32), zeros)
    adv = torch.where(mask, adv, zeros)
    return logp, old, adv, mask


def _clamped_log_ratio(logp: Tensor, old: Tensor) -> Tensor:
    return (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _finish(loss: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, loss, torch.zeros_like(loss))


@torch.no_grad()
def _metrics(ratio: Tensor, log_ratio: Tensor, mask: Tensor, **fracs: Tensor) -> dict[str, float]:
    """Ratio statistics plus the fraction of valid tokens where each boolean in ``fracs`` holds."""
    out = {k: float(masked_mean(v.float(), mask)) for k, v in fracs.items()}
    if "clip_frac" not in out:
        any_clip = torch.zeros_like(mask)
        for v in fracs.values():
            any_clip = any_clip | v.bool()
        out["clip_frac"] = float(masked_mean(any_clip.float(), mask))
    out["ratio_mean"] = float(masked_mean(ratio.detach(), mask))
    out["ratio_max"] = float(ratio.detach()[mask].max()) if mask.any() else 1.0
    out["ppo_kl"] = float(masked_mean(-log_ratio.detach(), mask))
    return out


def _check_dual_clip(c: float | None) -> None:
    if c is not None and c <= 1.0:
        raise ConfigError(f"dual_clip (clip_ratio_c) must be > 1.0, got {c}")


def _apply_dual_clip(
    loss: Tensor, adv: Tensor, ratio: Tensor, mask: Tensor, dual_clip: float | None
) -> tuple[Tensor, Tensor]:
    """Dual clip (verl): for A<0 the loss is at most -A*c. Returns (loss, cells where it bound)."""
    if dual_clip is None:
        return loss, torch.zeros_like(mask)
    return torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss), (adv < 0) & (ratio > dual_clip)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate, as verl ``compute_policy_loss_vanilla``.

    ``r = exp(clamp(logp - logp_old, -20, 20))``;
    ``L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``. ``eps_high=0.28`` is DAPO
    clip-higher. ``dual_clip=c`` (3.0 in verl; off by default) adds ``L = min(L, -A c)`` for A<0.
    """
    _check_dual_clip(dual_clip)
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    log_ratio = _clamped_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(pg1, pg2)
    low = (adv < 0) & (ratio < 1 - eps_low)
    high = (adv > 0) & (ratio > 1 + eps_high)
    loss, dual = _apply_dual_clip(loss, adv, ratio, mask, dual_clip)
    return _finish(loss, mask), _metrics(
        ratio, log_ratio, mask, clip_frac_low=low, clip_frac_high=high, dual_clip_frac=dual
    )


@POLICY_LOSSES.register("gspo")
def gspo(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO sequence-level ratio, as verl ``compute_policy_loss_gspo``.

    ``log s_i = (1/|o_i|) sum_t m (logp - logp_old)``; per token
    ``log s_it = sg(log s_i) + logp - sg(logp)`` clamped to <= 10, so every token of a sequence
    has the value ``s_i`` and the gradient ``s_i * grad logp``.
    ``L = max(-A s_it, -A clip(s_it, 1 - eps_low, 1 + eps_high))``. GSPO is meant to be aggregated
    with ``seq-mean-token-mean`` (``gspo.default_agg_mode``) and beta = 0.
    """
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    lengths = mask.sum(-1).clamp_min(1).to(torch.float32)
    seq_log_ratio = (logp - old).sum(-1) / lengths
    log_s = (seq_log_ratio.detach()[:, None] + logp - logp.detach()).clamp(max=10.0)
    s = torch.exp(log_s)
    loss = torch.maximum(-adv * s, -adv * s.clamp(1 - eps_low, 1 + eps_high))
    low = (adv < 0) & (s < 1 - eps_low)
    high = (adv > 0) & (s > 1 + eps_high)
    return _finish(loss, mask), _metrics(s, log_s, mask, clip_frac_low=low, clip_frac_high=high)


gspo.default_agg_mode = "seq-mean-token-mean"


def dcpo_bounds(q: Tensor, eps_low: float = 0.16, eps_high: float = 0.2, cap: float = 10.0) -> tuple[Tensor, Tensor]:
    """DCPO dynamic ratio bounds for old token probability ``q`` (any shape).

    ``lo = 0.5 + 0.5 sqrt(max(1 - 4 eps_low / q, 0))``,
    ``hi = min(0.5 + 0.5 sqrt(1 + 4 eps_high / q), cap)``. With eps 0.16/0.2: lo(1)=0.8,
    hi(1/1.2)=1.2.
    """
    q = q.clamp_min(torch.finfo(q.dtype).tiny)
    lo = 0.5 + 0.5 * torch.sqrt((1 - 4 * eps_low / q).clamp_min(0))
    hi = (0.5 + 0.5 * torch.sqrt(1 + 4 * eps_high / q)).clamp(max=cap)
    return lo, hi


@POLICY_LOSSES.register("dcpo")
def dcpo(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.16,
    eps_high: float = 0.2,
    cap: float = 10.0,
) -> tuple[Tensor, dict[str, float]]:
    """DCPO dynamic-adaptive clipping (paper §2, App. A.5-A.9).

    ``q = exp(logp_old)``; ``lo, hi = dcpo_bounds(q)``; ``L = max(-A r, -A clip(r, lo, hi))``.
    The hard cap r <= ``cap`` holds for both signs: ``hi`` is capped for A>0 and, for A<0,
    ``L = min(L, -A cap)`` (a dual clip at ``cap``). DCPO aggregates with ``otm``
    (``dcpo.default_agg_mode``).
    """
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    log_ratio = _clamped_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)
    lo, hi = dcpo_bounds(torch.exp(old), eps_low, eps_high, cap)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, lo, hi))
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * cap), loss)
    low = (adv < 0) & (ratio < lo)
    high = (adv > 0) & (ratio > hi)
    dual = (adv < 0) & (ratio > cap)
    return _finish(loss, mask), _metrics(
        ratio, log_ratio, mask, clip_frac_low=low, clip_frac_high=high, dual_clip_frac=dual
    )


dcpo.default_agg_mode = "otm"
#: its bounds come from the old token probability exp(logp_old): meaningless for log-densities
dcpo.needs_probabilities = True


@POLICY_LOSSES.register("ce_gppo")
def ce_gppo(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta1: float = 0.75,
    beta2: float = 1.0,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, dict[str, float]]:
    """CE-GPPO gradient-preserving clipping (README ``compute_gppo_loss_general_beta``).

    ``low = (r < 1-eps_low) & (A<0)``: ``L = -beta1 (1-eps_low) (r/sg(r)) A``;
    ``high = (r > 1+eps_high) & (A>0)``: ``L = -beta2 (1+eps_high) (r/sg(r)) A``; elsewhere
    ``L = -r A``. Clipped cells keep the bounded value and a gradient
    ``-beta (1 -/+ eps) A d logp``. Then dual clip ``L = min(L, -A c)`` for A<0 (c=3 as the
    README default; the released 7B script passes 10). The log-ratio is clamped to +-20.
    """
    _check_dual_clip(dual_clip)
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    log_ratio = _clamped_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)
    unit = ratio / ratio.detach()
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    loss = torch.where(
        low,
        -beta1 * (1 - eps_low) * unit * adv,
        torch.where(high, -beta2 * (1 + eps_high) * unit * adv, -ratio * adv),
    )
    loss, dual = _apply_dual_clip(loss, adv, ratio, mask, dual_clip)
    return _finish(loss, mask), _metrics(
        ratio, log_ratio, mask, clip_frac_low=low, clip_frac_high=high, dual_clip_frac=dual
    )


@POLICY_LOSSES.register("aspo")
def aspo(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float = 3.0,
) -> tuple[Tensor, dict[str, float]]:
    """ASPO asymmetric importance sampling (paper §6-7).

    1. Hard mask (as GRPO's clip): tokens with ``A<0, r<1-eps_low`` or ``A>0, r>1+eps_high`` get
       value 0 and no gradient.
    2. For A>0 the ratio is flipped: ``r_hat = pi_old pi / sg(pi)^2`` (value ``1/r``, gradient
       ``(1/r) d logp``, i.e. proportional to 1/pi), ``L = -A r_hat``. A<0 keeps ``L = -A r``.
    3. Soft dual clip on A>0: the value is ``min(r_hat, c)`` and the gradient
       ``min(r_hat, c) d logp`` (CISPO-style ``r_hat * sg(min(r_hat, c)/r_hat)``); c=3
       [UNVERIFIED, reused from dual-clip PPO].
    """
    _check_dual_clip(dual_clip)
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    log_ratio = _clamped_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)
    low = (adv < 0) & (ratio < 1 - eps_low)
    high = (adv > 0) & (ratio > 1 + eps_high)
    r_hat = torch.exp(-log_ratio.detach() + logp - logp.detach())
    scale = r_hat.detach().clamp(max=dual_clip) / r_hat.detach()
    r_hat_soft = r_hat * scale
    loss = torch.where(adv > 0, -adv * r_hat_soft, -adv * ratio)
    loss = torch.where(low | high, torch.zeros_like(loss), loss)
    soft = (adv > 0) & ~high & (r_hat.detach() > dual_clip)
    return _finish(loss, mask), _metrics(
        ratio, log_ratio, mask, clip_frac_low=low, clip_frac_high=high, dual_clip_frac=soft
    )


@POLICY_LOSSES.register("no_clip_pg")
def no_clip_pg(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    mode: str = "plain",
    clip_low: float = 0.8,
    clip_high: float = 1.2,
    weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Unclipped policy gradient (FAKER-Air, FIND).

    ``mode="plain"``: ``L = -weight A logp`` (REINFORCE; ``logp_old`` only feeds metrics).
    ``mode="clamp"``: ``L = -weight A clamp(r, clip_low, clip_high)`` (FIND: hard clamp to
    [0.8, 1.2], no min with the unclipped term, so clamped cells get no gradient).
    """
    if mode not in ("plain", "clamp"):
        raise UnknownNameError(f"Unknown no_clip_pg mode '{mode}'. Valid names: clamp, plain.")
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    log_ratio = _clamped_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)
    if mode == "plain":
        loss = -weight * adv * logp
        none = torch.zeros_like(mask)
        return _finish(loss, mask), _metrics(ratio, log_ratio, mask, clip_frac_low=none, clip_frac_high=none)
    loss = -weight * adv * ratio.clamp(clip_low, clip_high)
    return _finish(loss, mask), _metrics(
        ratio, log_ratio, mask, clip_frac_low=ratio < clip_low, clip_frac_high=ratio > clip_high
    )


def chunk_log_ratio(log_ratio: Tensor, chunk_sizes: list[int]) -> Tensor:
    """Chunk-GRPO: mean step log-ratio within each contiguous chunk.

    ``log_ratio [N, S]``, ``chunk_sizes`` with ``sum == S`` -> ``[N, K]`` where column j is the
    mean of chunk j's steps, i.e. the log of the geometric-mean ratio
    ``(prod_t r_t)^(1/cs_j)``. The map is linear, so it can also be applied to ``logp`` and
    ``logp_old`` separately and the results fed to a policy loss with a ``[N, K]`` mask.
    """
    sizes = [int(c) for c in chunk_sizes]
    if any(c <= 0 for c in sizes) or sum(sizes) != log_ratio.shape[-1]:
        raise ConfigError(
            f"chunk_sizes {sizes} must be positive and sum to the number of steps ({log_ratio.shape[-1]})"
        )
    parts = torch.split(log_ratio, sizes, dim=-1)
    return torch.stack([p.mean(-1) for p in parts], dim=-1)
