"""HCPO's two-branch loss (HiconAgent, arXiv 2512.01763): the same responses and group advantages
scored by a compressed and an uncompressed branch of one policy.

Per token (all ``[N, T]``, masked and aggregated by the caller)::

    L = PG_clip(pi_c; ratio vs pi_c,old)                 # the configured policy loss
      + PG(pi_u; ratio = exp(logp_u - sg(logp_u)) = 1)     # value -A, gradient -A grad logp_u
      + beta * [ KL(pi_c || pi_ref) + KL(pi_u || pi_ref) + alignment_coef * KL(pi_c || sg(pi_u)) ]

The last term (the history-enhanced alignment loss, coefficient 10 in HiconAgent) pulls the
compressed branch towards the full-history one; ``sg`` = stop gradient. Old log-probs come from the
compressed branch (it is the one that samples); ``KL`` is a token estimator (k3 by default). Without
reference log-probs the two reference terms are left out, the alignment term stays.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from mmpo.core.kl import KL_ESTIMATORS
from mmpo.core.losses import POLICY_LOSSES


def hcpo_loss(
    logp_c: Tensor,
    logp_u: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.01,
    alignment_coef: float = 10.0,
    logp_ref: Tensor | None = None,
    loss: str | Callable[..., tuple[Tensor, dict[str, float]]] = "ppo_clip",
    loss_options: dict[str, Any] | None = None,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, float]]:
    """Per-token HCPO loss ``[N, T]`` (zero where ``mask`` is 0) and metrics.

    logp_c / logp_u ``[N, T]``: log-probs under the compressed / uncompressed branch (with grad);
    logp_old ``[N, T]``: the compressed branch's at sampling time; advantages ``[N]`` or ``[N, T]``;
    logp_ref ``[N, T]`` or None. Metrics: ``pg_c``, ``pg_u``, ``kl_c``, ``kl_u``, ``kl_align``
    (masked token means) and the compressed branch's clip statistics.
    """
    loss_fn = POLICY_LOSSES.get(loss) if isinstance(loss, str) else loss
    kl = KL_ESTIMATORS.get(kl_estimator)
    m = mask.to(logp_c.device).float()
    pg_c, metrics = loss_fn(logp_c, logp_old, advantages, mask, **(loss_options or {}))
    pg_u = _unit_ratio_pg(logp_u, advantages, m)
    kl_align = kl(logp_c, logp_u.detach()) * m
    total = pg_c + pg_u + beta * alignment_coef * kl_align
    n = m.sum().clamp(min=1.0)
    out = dict(metrics)
    out.update(
        pg_c=float((pg_c.detach() * m).sum() / n),
        pg_u=float((pg_u.detach() * m).sum() / n),
        kl_align=float(kl_align.detach().sum() / n),
    )
    if logp_ref is not None:
        kl_c = kl(logp_c, logp_ref) * m
        kl_u = kl(logp_u, logp_ref) * m
        total = total + beta * (kl_c + kl_u)
        out.update(kl_c=float(kl_c.detach().sum() / n), kl_u=float(kl_u.detach().sum() / n))
    return total * m, out


def _unit_ratio_pg(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``-A * exp(logp - sg(logp))`` ``[N, T]``: value ``-A``, gradient ``-A grad logp``."""
    adv = advantages.to(logp.device).float()
    adv = adv[:, None] if adv.dim() == 1 else adv
    return -adv * torch.exp(logp.float() - logp.detach().float()) * mask


__all__ = ["hcpo_loss"]
