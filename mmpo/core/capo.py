"""CAPO, Curvature-Aware Policy Optimization (Melo, Abate, Gal, arXiv 2510.00819). See
``docs/algorithms.md``.

What the paper states: policy-gradient updates are tracked with a (last-layer) curvature model, the
samples that would make the update unstable are **masked out** of the loss (< 8 % of tokens).
What is a design choice here, not the paper's method: the curvature *scorer* :func:`curvature_kl`
(an [UNVERIFIED] proxy: the KL that one token's SGD step on the LM head would cause, under the softmax
Fisher metric) and the threshold rule of the ``capo`` filter (batch 0.95 quantile and/or an absolute
``delta``).

Use: compute ``kl_hat [N, T]`` in the old-logprob pass, ``keep = GROUP_FILTERS["capo"](kl_hat, mask)``,
then train on ``mask & keep``. Rejected tokens leave the loss *and* its aggregation denominator (a
token-mean over the kept tokens); when every token is rejected the aggregated loss is 0 with zero
gradient (``mmpo.core.aggregate`` divides by ``max(count, 1)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes
from mmpo.core.sampling import GROUP_FILTERS
from mmpo.errors import ConfigError

GRANULARITIES = ("token", "sequence")
SEQ_REDUCES = ("sum", "max")


def curvature_kl(
    pi_y: Tensor,
    sum_p2: Tensor,
    sum_p3: Tensor,
    hidden_sq: Tensor,
    advantages: Tensor,
    ratio: Tensor | None,
    lr: float,
) -> Tensor:
    """Predicted policy shift of one token's update [UNVERIFIED proxy, see module doc] -> ``kl_hat [N, T]``.

    Inputs per position (old policy ``pi = softmax(z)`` at the position, sampled token ``y``, LM-head
    input ``phi``): ``pi_y [N, T]`` = ``pi(y)``; ``sum_p2 [N, T]`` = ``sum_v pi_v^2``; ``sum_p3 [N, T]`` =
    ``sum_v pi_v^3`` (both over the whole vocabulary, ``y`` included); ``hidden_sq [N, T]`` =
    ``||phi||^2``; ``advantages [N]`` or ``[N, T]``; ``ratio [N, T]`` or None (= 1, on-policy); ``lr`` the
    optimiser's step size.

    The token loss ``-A rho log pi(y)`` has logit gradient ``g = -A rho u`` with ``u = e_y - pi``; an SGD
    step on the head moves the logits by ``dz = -lr ||phi||^2 g``; the predicted KL is
    ``0.5 dz^T (diag(pi) - pi pi^T) dz = 0.5 (lr ||phi||^2 A rho)^2 q`` with the closed form (no
    vocabulary needed) ``q = sum_v pi_v u_v^2 - (sum_v pi_v u_v)^2``,
    ``sum_v pi_v u_v = pi_y - sum_p2``, ``sum_v pi_v u_v^2 = pi_y (1 - pi_y)^2 + sum_p3 - pi_y^3``.
    Computed in float64, ``q`` clamped at 0 against rounding; returns float32.
    """
    pi_y64 = as_float(pi_y).detach().to(torch.float64)
    shape = tuple(pi_y64.shape)
    if len(shape) != 2:
        raise ValueError(f"pi_y must be [N, T], got {shape}")
    for name, x in (("sum_p2", sum_p2), ("sum_p3", sum_p3), ("hidden_sq", hidden_sq)):
        check_shapes(name, x, shape)
    adv = as_float(advantages).detach().to(device=pi_y64.device, dtype=torch.float64)
    if adv.dim() == 1 and adv.shape[0] == shape[0]:
        adv = adv[:, None].expand(shape)
    check_shapes("advantages", adv, shape)
    rho = torch.ones_like(pi_y64) if ratio is None else as_float(ratio).detach().to(pi_y64.device, torch.float64)
    check_shapes("ratio", rho, shape)
    p2 = as_float(sum_p2).detach().to(pi_y64.device, torch.float64)
    p3 = as_float(sum_p3).detach().to(pi_y64.device, torch.float64)
    first = pi_y64 - p2
    second = pi_y64 * (1 - pi_y64) ** 2 + p3 - pi_y64**3
    q = (second - first**2).clamp_min(0.0)
    scale = lr * as_float(hidden_sq).detach().to(pi_y64.device, torch.float64) * adv * rho
    return (0.5 * scale**2 * q).to(torch.float32)


def _linear_quantile(values: Tensor, q: float) -> Tensor:
    """``q``-quantile of a 1-D tensor, linear interpolation (``torch.quantile``'s rule, any size)."""
    ordered = torch.sort(values).values
    pos = q * (values.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, values.numel() - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


@GROUP_FILTERS.register("capo", "capo_curvature")
def capo(
    kl_hat: Tensor,
    mask: Tensor,
    *,
    delta: float | None = None,
    quantile: float | None = 0.95,
    granularity: str = "token",
    seq_reduce: str = "sum",
) -> Tensor:
    """CAPO curvature masking (arXiv 2510.00819): reject tokens or rows whose predicted shift is too large.

    ``kl_hat [N, T]`` (e.g. :func:`curvature_kl`), ``mask [N, T]`` -> ``keep [N, T]`` bool (a subset of
    ``mask``). Score: ``kl_hat`` per valid token (``granularity="token"``) or, per row with a valid token,
    ``sum_t`` / ``max_t`` of it (``"sequence"``, ``seq_reduce``; a rejected row loses every token).
    Threshold [UNVERIFIED rule]: ``max(delta, q-quantile of the batch's scores)`` when both are given,
    either one alone otherwise (``quantile=None`` for an absolute ``delta``); reject where
    ``score > threshold``. The default (0.95 quantile) rejects at most ~5 % even when updates are safe;
    prefer adding an absolute ``delta``. Train on the returned mask: rejected tokens also leave the
    aggregation denominator.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"capo granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if seq_reduce not in SEQ_REDUCES:
        raise ConfigError(f"capo seq_reduce must be one of {', '.join(SEQ_REDUCES)}, got {seq_reduce!r}")
    if delta is None and quantile is None:
        raise ConfigError("capo needs delta or quantile (both are None)")
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"capo quantile must be in [0, 1], got {quantile}")
    if delta is not None and delta < 0:
        raise ConfigError(f"capo delta must be >= 0, got {delta}")
    mask = mask.bool()
    kl = as_float(kl_hat).detach().to(device=mask.device, dtype=torch.float32)
    check_shapes("kl_hat", kl, tuple(mask.shape))
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    if granularity == "token":
        score, scored = kl, mask
    else:
        reduced = kl.sum(-1) if seq_reduce == "sum" else kl.max(-1).values
        score, scored = reduced, mask.any(-1)
    if not bool(scored.any()):
        return mask.clone()
    threshold = float("-inf")
    if quantile is not None:
        threshold = float(_linear_quantile(score[scored], quantile))
    if delta is not None:
        threshold = max(threshold, float(delta))
    keep = ~(score > threshold)
    return mask & (keep if granularity == "token" else keep[:, None])


capo.state_cls = None

__all__ = ["capo", "curvature_kl"]
