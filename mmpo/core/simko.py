"""SimKO, Simple Pass@K Optimization (Peng et al., arXiv 2510.14807; code CLR-Lab/SimKO,
``compute_policy_loss_simko``). See ``docs/algorithms.md``.

SimKO is a policy loss only (advantages are plain GRPO). At *forking tokens* (per row, the tokens whose
entropy is strictly above the row's ``tau`` quantile):

- rows of verified-correct responses spread a share ``alpha`` of the positive gradient uniformly over
  the current top-K candidates (top-K "label smoothing" through a mixed ratio whose value equals the
  plain ratio);
- rows with a negative advantage push the sampled token down harder (``A <- lambda A``) where it is the
  current argmax.

The loss value is exactly PPO-clip's; only the gradient changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, masked_mean
from mmpo.core.losses import (
    LOG_RATIO_CLAMP,
    POLICY_LOSSES,
    _clamped_log_ratio,
    _finish,
    _metrics,
    _prepare,
)
from mmpo.errors import ConfigError


def row_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile of the valid entries, linear interpolation (as ``torch.quantile``).

    ``x [N, T]`` float, ``mask [N, T]`` bool -> ``theta [N]`` float32. A row with no valid entry uses
    all T entries (SimKO ``row_quantile_masked``). With n values sorted ascending the quantile is
    ``s[lo] + (pos - lo) (s[lo+1] - s[lo])`` with ``pos = q (n - 1)``, ``lo = floor(pos)``.
    """
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"tau (entropy quantile) must be in [0, 1], got {q}")
    check_shapes("mask", mask, tuple(x.shape))
    x = as_float(x).detach().to(torch.float32)
    n_rows, t = x.shape
    if t == 0:
        return x.new_zeros(n_rows)
    mask = mask.bool()
    count = mask.sum(-1)
    empty = count == 0
    use = mask | empty[:, None]
    count = torch.where(empty, torch.full_like(count, t), count)
    # invalid cells sort to the end of their row
    ordered = torch.sort(torch.where(use, x, torch.full_like(x, float("inf"))), dim=-1).values
    pos = q * (count - 1).to(torch.float32)
    lo = pos.floor().long().clamp(0, t - 1)
    hi = torch.minimum(lo + 1, count - 1).clamp(0, t - 1)
    frac = pos - lo.to(torch.float32)
    s_lo = ordered.gather(1, lo[:, None])[:, 0]
    s_hi = ordered.gather(1, hi[:, None])[:, 0]
    return torch.where(frac > 0, s_lo + frac * (s_hi - s_lo), s_lo)


def forking_mask(entropy: Tensor, mask: Tensor, tau: float = 0.8) -> Tensor:
    """SimKO forking tokens: ``w[i, t] = 1[H[i, t] > theta_i]`` (strict), ``theta = row_quantile(H, mask, tau)``.

    ``entropy [N, T]``, ``mask [N, T]`` -> ``w [N, T]`` bool. ``w`` is not restricted to ``mask`` (as in
    the code, AND it with the mask where it matters); a row with no valid token takes its threshold
    over all T entries. ``tau = 1`` selects nothing (nothing is strictly above the maximum); a row of
    equal entropies has no forking token.
    """
    theta = row_quantile(entropy, mask, tau)
    return as_float(entropy).detach().to(torch.float32) > theta[:, None]


@POLICY_LOSSES.register("simko")
def simko(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    topk_logp: Tensor,
    old_topk_logp: Tensor,
    is_top1: Tensor,
    entropy: Tensor,
    rewards: Tensor,
    top_k: int = 3,
    mix_topk_coef: float = 0.01,
    tau: float = 0.8,
    neg_top1_scale: float = 1.1,
    eps: float = 0.2,
    r_thr: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """SimKO loss (arXiv 2510.14807, ``compute_policy_loss_simko``) -> ``(loss [N, T], metrics)``.

    Inputs: ``logp, logp_old, mask [N, T]``; ``advantages [N]`` or ``[N, T]``; ``topk_logp [N, T, K]``
    (current log-probs of the current top-K tokens, ranked, with grad); ``old_topk_logp [N, T, K]``
    (pi_old's own top-K, paired by rank as the code does); ``is_top1 [N, T]`` (sampled token is the
    current argmax); ``entropy [N, T]`` (current forward, detached); ``rewards [N]``.

    With ``w = forking_mask(entropy, mask, tau)``, ``rho = exp(logp - logp_old)`` (log-ratio clamped to
    +-20) and ``rho_k = exp(topk_logp_k - old_topk_logp_k)``:

    - positive rows (``reward > r_thr``; the code's ``reward == 1`` generalised to any reward scale):
      ``rho~ = (1 - alpha w) rho + (alpha w / K) sum_k sg(rho / rho_k) rho_k``, with ``sg(rho / rho_k)``
      computed in log space (``exp(sg(log rho - log rho_k) + log rho_k)``), so its value is exactly
      ``rho`` and its gradient ``rho [(1 - alpha w) dlogp + (alpha w / K) sum_k dtopk_logp_k]``;
    - negative rows (advantage summed over valid t < 0): ``A <- neg_top1_scale A`` where
      ``is_top1 & w``;
    - ``L = max(-A rho~, -A clip(rho~, 1 - eps, 1 + eps))``; clipped cells get no gradient at all.

    ``top_k`` must equal ``topk_logp.shape[-1]`` (``simko.topk_option``). Metrics add ``forking_frac``,
    ``pos_token_frac`` and ``neg_top1_frac`` (fractions of valid tokens).
    """
    if top_k < 1 or topk_logp.dim() != 3 or topk_logp.shape[-1] != top_k:
        raise ConfigError(f"simko: top_k={top_k} must be >= 1 and equal topk_logp.shape[-1] ({tuple(topk_logp.shape)})")
    if not 0.0 <= mix_topk_coef <= 1.0:
        raise ConfigError(f"simko: mix_topk_coef must be in [0, 1], got {mix_topk_coef}")
    if eps <= 0:
        raise ConfigError(f"simko: eps must be > 0, got {eps}")
    logp, old, adv, mask = _prepare(logp, logp_old, advantages, mask)
    n, t = logp.shape
    check_shapes("topk_logp", topk_logp, (n, t, top_k))
    check_shapes("old_topk_logp", old_topk_logp, (n, t, top_k))
    check_shapes("is_top1", is_top1, (n, t))
    check_shapes("entropy", entropy, (n, t))
    check_shapes("rewards", rewards, (n,))
    w = forking_mask(entropy, mask, tau) & mask
    log_ratio = _clamped_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)

    m3 = mask[..., None].expand(n, t, top_k)
    zeros3 = torch.zeros((n, t, top_k), dtype=torch.float32, device=logp.device)
    topk = torch.where(m3, topk_logp.to(torch.float32), zeros3)
    old_topk = torch.where(m3, old_topk_logp.detach().to(torch.float32), zeros3)
    log_ratio_k = (topk - old_topk).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # value exp(log_ratio) = rho for every k, gradient rho * d log_ratio_k
    mixed_k = torch.exp((log_ratio.detach()[..., None] - log_ratio_k.detach()) + log_ratio_k)
    share = mix_topk_coef * w.to(torch.float32)
    mixed = (1.0 - share) * ratio + (share / top_k) * mixed_k.sum(-1)

    positive = (as_float(rewards).detach().to(logp.device) > r_thr)[:, None] & mask
    rho = torch.where(positive, mixed, ratio)
    negative = (adv.sum(-1) < 0)[:, None]
    scaled = negative & is_top1.to(logp.device).bool() & w
    adv = torch.where(scaled, adv * neg_top1_scale, adv)

    loss = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps))
    low = (adv < 0) & (rho < 1 - eps)
    high = (adv > 0) & (rho > 1 + eps)
    metrics = _metrics(rho, log_ratio, mask, clip_frac_low=low, clip_frac_high=high)
    metrics.update(
        forking_frac=float(masked_mean(w.float(), mask)),
        pos_token_frac=float(masked_mean(positive.float(), mask)),
        neg_top1_frac=float(masked_mean(scaled.float(), mask)),
    )
    return _finish(loss, mask), metrics


simko.inputs = ("topk_logp", "old_topk_logp", "is_top1", "entropy", "rewards")
simko.topk_option = "top_k"
simko.state_cls = None

__all__ = ["forking_mask", "row_quantile", "simko"]
