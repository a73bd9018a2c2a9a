"""Small tensor helpers shared by the core modules (masked reductions, group bookkeeping)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_float(x: Tensor) -> Tensor:
    """``x`` as a floating tensor (integers and bools become float32; float dtypes are kept)."""
    return x if torch.is_floating_point(x) else x.to(torch.float32)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is true; masked cells never leak NaN/inf."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the true cells of ``mask``; 0 when the mask is empty."""
    mask = mask.bool()
    return masked_sum(values, mask) / mask.sum().clamp_min(1)


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids [N] to ``(inverse [N] in 0..G-1, G)``.

    Groups are numbered in ascending id order; ids need not be contiguous or sorted.
    """
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [N], got shape {tuple(group_ids.shape)}")
    uniq, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
    return inverse, int(uniq.numel())


def group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Per-group sum: ``out[g] = sum_{i: inverse[i]=g} values[i]`` -> [G]."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, inverse, values)


def group_mean_std(
    values: Tensor, inverse: Tensor, num_groups: int, unbiased: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group ``(mean [G], std [G], count [G])``.

    ``unbiased=True`` divides by n-1 like ``torch.std`` (NaN for n=1, as torch.std; callers
    decide what a singleton means); ``unbiased=False`` divides by n like ``np.std``.
    """
    count = group_sum(torch.ones_like(values), inverse, num_groups)
    mean = group_sum(values, inverse, num_groups) / count
    sq = group_sum((values - mean[inverse]) ** 2, inverse, num_groups)
    denom = count - 1 if unbiased else count
    std = torch.sqrt(sq / denom)
    return mean, std, count


def check_shapes(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError naming ``name`` when ``tensor`` does not have ``shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
