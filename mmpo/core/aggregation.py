"""Loss aggregation modes (``loss_agg_mode``; verl ``agg_loss``; DAPO arXiv 2503.14476, Dr. GRPO
2503.20783, DCPO 2509.02333)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mmpo.core.registry import Registry

AGGREGATIONS: Registry[Callable[..., Tensor]] = Registry("loss aggregation mode")


def _masked(loss_matrix: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    mask = mask.bool()
    return torch.where(mask, loss_matrix, torch.zeros_like(loss_matrix)), mask


def _seq_lengths(mask: Tensor) -> Tensor:
    return mask.sum(-1).to(torch.float32)


@AGGREGATIONS.register("token-mean")
def token_mean(loss_matrix: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """DAPO: ``sum_{i,t} m L / sum_{i,t} m`` over the batch (0 when no token is valid)."""
    lm, mask = _masked(loss_matrix, mask)
    return lm.sum() / mask.sum().clamp_min(1)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(loss_matrix: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """Original GRPO / GSPO: ``mean_i (1/|o_i|) sum_t L``; rows with no valid token are left out."""
    lm, mask = _masked(loss_matrix, mask)
    lengths = _seq_lengths(mask)
    per_seq = lm.sum(-1) / lengths.clamp_min(1)
    return per_seq.sum() / (lengths > 0).sum().clamp_min(1)


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(loss_matrix: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """``mean_i sum_t L``; rows with no valid token are left out of the mean."""
    lm, mask = _masked(loss_matrix, mask)
    lengths = _seq_lengths(mask)
    return lm.sum() / (lengths > 0).sum().clamp_min(1)


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_matrix: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """Dr. GRPO: ``sum_{i,t} m L / (N * max_len)``; ``max_len`` defaults to T.

    The divisor must not depend on the batch's lengths (pass the configured maximum completion
    length), so every token's gradient weight is ``1/(N max_len)`` whatever its sequence length.
    verl divides by T only; here N counts every row of the matrix.
    """
    lm, _ = _masked(loss_matrix, mask)
    n, t = loss_matrix.shape[0], loss_matrix.shape[-1]
    denom = n * (t if max_len is None else int(max_len))
    return lm.sum() / max(denom, 1)


@AGGREGATIONS.register("otm")
def only_token_mean(loss_matrix: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """DCPO "only token mean": ``sum_i (1/|o_i|) sum_t L`` (no division by the number of rows)."""
    lm, mask = _masked(loss_matrix, mask)
    return (lm.sum(-1) / _seq_lengths(mask).clamp_min(1)).sum()


def aggregate(loss_matrix: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """Reduce ``loss_matrix [N, T]`` over the valid cells of ``mask [N, T]`` (bool) to a scalar.

    ``mode``: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm
    (uses ``max_len``, default T), otm. Unknown modes raise UnknownNameError listing these.
    """
    fn = AGGREGATIONS.get(mode)
    if loss_matrix.shape != mask.shape:
        raise ValueError(f"loss_matrix {tuple(loss_matrix.shape)} and mask {tuple(mask.shape)} must match")
    return fn(loss_matrix, mask, max_len)
