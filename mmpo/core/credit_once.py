"""Credit once: the replicated-rows policy loss of a tree rollout, computed on unique tokens.

A tree rollout materialised as replicated rows (one row per leaf) holds every token of a shared node
once per row through it. The replicated loss (``ppo_clip`` per cell, then ``aggregate``, plus KL and
entropy terms) counts each copy. All copies of a unique token u have the same context, so the same
ratio ``rho_u = exp(logp_u - logp_old_u)``, and the clipped surrogate factorises by the sign of each
copy's advantage. With ``R(u)`` the rows holding u, ``c_r`` the row's aggregation coefficient
(:func:`row_coefficients`) and ``A_{r,u}`` the row's advantage at u:

- ``P(u) = sum_{r in R(u), A>0} c_r A_{r,u}``, ``N(u) = sum_{r in R(u), A<0} c_r A_{r,u}``, ``W(u) = sum c_r``;
- ``loss = sum_u [-P(u) g+(rho_u) - N(u) g-(rho_u) + beta_KL W_KL(u) kl_u - beta_H W(u) H_u]``;
- ``g+(rho) = min(rho, 1 + eps_high)`` (gradient-preserving option: value the same, gradient
  ``(1 + eps_high) grad log pi`` where ``rho > 1 + eps_high``, GPPO "only higher" as agentic AEPO, arXiv
  2510.14545), ``g-(rho) = min(max(rho, 1 - eps_low), c_dual)`` (no ``c_dual`` without dual clip).

This equals the replicated loss in value and gradient (``docs/algorithms.md``). Advantages must never be
summed over copies before clipping: ``-(sum A) clip(rho)`` is a different loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes
from mmpo.core.aggregation import AGGREGATIONS
from mmpo.core.losses import LOG_RATIO_CLAMP, _check_dual_clip
from mmpo.errors import ConfigError


def unique_tokens(token_node: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Find the shared tokens of replicated rows.

    Two valid cells are the same unique token when they have the same node id and the same offset within
    that node (offsets count every token of the node in the row, masked or not; a node's tokens are
    contiguous in a row). A valid cell with node id -1 is a unique token of its own. Unique ids are
    numbered in order of first occurrence (row-major).

    token_node [N, T] long, mask [N, T] bool -> (uid [N, T] long, -1 on masked cells;
    first [U] long: flat index ``i * T + t`` of each unique token's first cell, so
    ``x.flatten()[first]`` picks one copy of each)
    """
    if token_node.dim() != 2:
        raise ValueError(f"token_node must be 2-D [N, T], got shape {tuple(token_node.shape)}")
    check_shapes("mask", mask, tuple(token_node.shape))
    n, t = token_node.shape
    tn = token_node.long()
    mask = mask.bool().to(tn.device)
    device = tn.device
    idx = torch.arange(t, device=device).expand(n, t)
    starts = torch.ones_like(tn, dtype=torch.bool)
    starts[:, 1:] = tn[:, 1:] != tn[:, :-1]
    node_starts = starts & (tn >= 0)
    rows, cols = torch.nonzero(node_starts, as_tuple=True)
    pairs = torch.stack([rows, tn[rows, cols]], dim=1)
    if pairs.shape[0] and torch.unique(pairs, dim=0).shape[0] != pairs.shape[0]:
        raise ValueError("token_node: a node's tokens must be contiguous in a row (a node id reappears later)")
    run_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    offset = idx - run_start
    flat = torch.arange(n * t, device=device).view(n, t)
    key_node = torch.where(tn >= 0, tn, -(flat + 1))  # a cell without a node is unique
    key_off = torch.where(tn >= 0, offset, torch.zeros_like(offset))
    uid = torch.full((n, t), -1, dtype=torch.long, device=device)
    if not bool(mask.any()):
        return uid, torch.zeros(0, dtype=torch.long, device=device)
    keys = torch.stack([key_node[mask], key_off[mask]], dim=1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    u = int(inverse.max()) + 1
    first = torch.full((u,), n * t, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, flat[mask], reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(u, device=device)
    uid[mask] = rank[inverse]
    return uid, first[order]


def row_coefficients(mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """Per-row weight ``c_r`` of a token's loss under ``aggregate(loss, mask, mode)``: the aggregated loss is
    ``sum_r c_r sum_t m L``. Counts are over the *replicated* rows (a shared token once per row).

    token-mean ``1/N_tok``; seq-mean-token-mean ``1/(N_rows L_r)``; seq-mean-token-sum ``1/N_rows``
    (``N_rows`` = rows with a valid token, ``L_r`` = the row's valid tokens); seq-mean-token-sum-norm
    ``1/(N max_len)`` (``max_len`` defaults to T); otm ``1/L_r``. Rows without a valid token get 0 (or
    their value never matters).

    mask [N, T] bool -> [N] float32
    """
    AGGREGATIONS.get(mode)  # an unknown mode raises UnknownNameError (a ConfigError) listing the valid ones
    mask = mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [N, T], got shape {tuple(mask.shape)}")
    n, t = mask.shape
    lengths = mask.sum(-1).to(torch.float32)
    has = (lengths > 0).to(torch.float32)
    rows = has.sum().clamp_min(1)
    if mode == "token-mean":
        return has / lengths.sum().clamp_min(1)
    if mode == "seq-mean-token-mean":
        return has / (rows * lengths.clamp_min(1))
    if mode == "seq-mean-token-sum":
        return has / rows
    if mode == "seq-mean-token-sum-norm":
        return torch.full((n,), 1.0 / max(n * (t if max_len is None else int(max_len)), 1), device=mask.device)
    if mode == "otm":
        return has / lengths.clamp_min(1)
    raise ConfigError(f"credit once: aggregation mode {mode!r} has no per-row coefficients")


def _advantage_matrix(advantages: Tensor, shape: tuple[int, int]) -> Tensor:
    adv = as_float(advantages).detach()
    if adv.dim() == 1 and adv.shape[0] == shape[0]:
        adv = adv[:, None].expand(shape)
    if tuple(adv.shape) != tuple(shape):
        raise ValueError(f"advantages must be [N] or [N, T] = {tuple(shape)}, got {tuple(adv.shape)}")
    return adv


def merged_weights(
    uid: Tensor, advantages: Tensor, mask: Tensor, coef: Tensor, num_unique: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Merged weights of every unique token: ``P(u) = sum_{A>0} c_r A``, ``N(u) = sum_{A<0} c_r A``,
    ``W(u) = sum c_r`` over the valid cells of u (float64).

    uid [N, T] (from :func:`unique_tokens`), advantages [N] or [N, T], mask [N, T], coef [N]
    -> (P [U], N [U], W [U])
    """
    check_shapes("mask", mask, tuple(uid.shape))
    check_shapes("coef", coef, (uid.shape[0],))
    mask = mask.bool()
    if bool((mask & (uid < 0)).any()):
        raise ValueError("uid is -1 on a valid cell: build uid with unique_tokens(token_node, mask) on this mask")
    adv = _advantage_matrix(advantages, tuple(uid.shape)).to(torch.float64)
    u = int(uid.max()) + 1 if num_unique is None else int(num_unique)
    u = max(u, 0)
    c = as_float(coef).detach().to(torch.float64)[:, None].expand(uid.shape)
    ids = uid[mask]
    ca = (c * adv)[mask]
    zeros = torch.zeros(u, dtype=torch.float64, device=uid.device)
    pos = zeros.index_add(0, ids, torch.where(ca > 0, ca, torch.zeros_like(ca)))
    neg = zeros.index_add(0, ids, torch.where(ca < 0, ca, torch.zeros_like(ca)))
    weight = zeros.index_add(0, ids, c[mask])
    return pos, neg, weight


def credit_once_loss(
    logp_unique: Tensor,
    logp_old_unique: Tensor,
    uid: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    mode: str = "token-mean",
    coef: Tensor | None = None,
    max_len: int | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    preserve_high_grad: bool = False,
    kl_unique: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_row_weights: Tensor | None = None,
    entropy_unique: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> Tensor:
    """The replicated-rows loss, computed once per unique token (value and gradient equal).

    Equals ``aggregate(ppo_clip(logp, logp_old, A, mask, eps_low, eps_high, dual_clip), mask, mode)
    + kl_coef * aggregate(kl * s_r, mask, mode) - entropy_coef * aggregate(H, mask, mode)`` on the replicated
    rows ``logp = logp_unique[uid]``:
    ``loss = sum_u [-P(u) g+(rho_u) - N(u) g-(rho_u) + kl_coef W_KL(u) kl_u - entropy_coef W(u) H_u]`` with
    ``rho_u = exp(clamp(logp_u - logp_old_u, -20, 20))``, ``g+ = min(rho, 1 + eps_high)``,
    ``g- = min(max(rho, 1 - eps_low), dual_clip)`` and P, N, W from :func:`merged_weights`
    (``W_KL = sum c_r s_r`` with ``s_r = kl_row_weights``). ``coef`` [N] overrides the coefficients of
    ``mode`` (:func:`row_coefficients`). ``preserve_high_grad=True`` keeps the value of ``g+`` but gives
    it the gradient ``(1 + eps_high) grad log pi`` where ``rho > 1 + eps_high`` (GPPO "only higher",
    agentic AEPO arXiv 2510.14545: the replicated ``ce_gppo`` with beta1=0, beta2=1 in gradient).

    logp_unique [U] (with grad), logp_old_unique [U], uid [N, T] long, advantages [N] or [N, T],
    mask [N, T] bool; kl_unique / entropy_unique [U] (with grad where they have one) -> scalar
    """
    _check_dual_clip(dual_clip)
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value and math.isfinite(value)):
            raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    if logp_unique.dim() != 1:
        raise ValueError(f"logp_unique must be 1-D [U], got shape {tuple(logp_unique.shape)}")
    u = logp_unique.shape[0]
    check_shapes("logp_old_unique", logp_old_unique, (u,))
    mask = mask.bool()
    if coef is None:
        coef = row_coefficients(mask, mode, max_len)
    pos, neg, weight = merged_weights(uid, advantages, mask, coef, num_unique=u)
    pos, neg = pos.to(torch.float32), neg.to(torch.float32)
    logp = logp_unique.to(torch.float32)
    log_ratio = (logp - logp_old_unique.detach().to(torch.float32)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    high = 1.0 + eps_high
    if preserve_high_grad:
        g_pos = torch.where(ratio > high, high * ratio / ratio.detach(), ratio)
    else:
        g_pos = torch.clamp(ratio, max=high)
    g_neg = torch.clamp(ratio, min=1.0 - eps_low)
    if dual_clip is not None:
        g_neg = torch.clamp(g_neg, max=dual_clip)
    loss = (-pos * g_pos - neg * g_neg).sum()
    if kl_unique is not None and kl_coef:
        check_shapes("kl_unique", kl_unique, (u,))
        kl_weight = weight
        if kl_row_weights is not None:
            check_shapes("kl_row_weights", kl_row_weights, (uid.shape[0],))
            scaled = as_float(coef).detach() * as_float(kl_row_weights).detach().to(coef.device)
            _, _, kl_weight = merged_weights(uid, torch.zeros_like(scaled), mask, scaled, num_unique=u)
        loss = loss + kl_coef * (kl_weight.to(torch.float32) * kl_unique.to(torch.float32)).sum()
    if entropy_unique is not None and entropy_coef:
        check_shapes("entropy_unique", entropy_unique, (u,))
        loss = loss - entropy_coef * (weight.to(torch.float32) * entropy_unique.to(torch.float32)).sum()
    return loss


__all__ = ["credit_once_loss", "merged_weights", "row_coefficients", "unique_tokens"]
